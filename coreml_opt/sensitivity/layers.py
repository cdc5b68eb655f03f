"""The layers a sweep compresses: the compressible weights of the BN-folded model, named both ways.

A layer is one weight tensor, named by its torch parameter path and by the Core ML const that
conversion gives it (``features.3.weight`` -> ``features_3_weight_to_fp16``). Weights shared by
several modules (tied embeddings) are one layer whose ``aliases`` list the other paths: Core ML
stores them once, so they must take one spec.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.convert import const_name
from ..simulate.apply import WEIGHT_MODULES, weight_readers
from ..model.precision import fp16_copy  # noqa: F401  (re-exported: sweeps and plans use it from here)
from ..storage import predicted_bytes

DEFAULT_WEIGHT_THRESHOLD = 2048


@dataclass(frozen=True)
class Layer:
    """One compressible weight (or a group of tied ones) of the folded model."""

    layer: str  # torch parameter path, e.g. "features.3.weight"
    coreml_name: str  # e.g. "features_3_weight_to_fp16"
    op_type: str  # spec.reader_key of the modules reading it: "conv", "conv(groups=960)", "gather+linear"
    shape: tuple[int, ...]
    params: int
    fp16_bytes: int
    aliases: tuple[str, ...] = field(default_factory=tuple)
    precision: str = "fp16"  # the stored float type: "fp32" for a package converted with FLOAT32 compute precision

    def to_dict(self) -> dict:
        out = {"layer": self.layer, "coreml_name": self.coreml_name, "op_type": self.op_type,
               "shape": list(self.shape), "params": self.params, "fp16_bytes": self.fp16_bytes}
        if self.aliases:
            out["aliases"] = list(self.aliases)
        if self.precision != "fp16":
            out["precision"] = self.precision
        return out


def find_layers(model: nn.Module, weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD,
                include_all: bool = False, ios18_ops: bool = True) -> list[Layer]:
    """Compressible conv/linear/embedding weights (ndim >= 2, > ``weight_threshold`` elements), in model order;
    the projections of ``nn.MultiheadAttention`` count as linear weights (Core ML reads them with `linear`)."""
    by_tensor: dict[int, list[tuple[str, nn.Module]]] = {}
    order: list[int] = []
    for module_path, module in model.named_modules(remove_duplicate=False):
        for attr in _weight_attrs(module):
            weight = getattr(module, attr, None)
            if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
                continue
            key = id(weight)
            if key not in by_tensor:
                by_tensor[key] = []
                order.append(key)
            path = f"{module_path}.{attr}" if module_path else attr
            if path not in [p for p, _ in by_tensor[key]]:
                by_tensor[key].append((path, module))
    layers = []
    for key in order:
        (path, module), *rest = by_tensor[key]
        weight = getattr(module, path.rpartition(".")[2])
        if not include_all and weight.numel() <= weight_threshold:
            continue
        op_type = weight_readers(model, weight)
        shape = tuple(int(d) for d in weight.shape)
        layers.append(Layer(path, const_name(path), op_type, shape, int(weight.numel()),
                            predicted_bytes("none", shape, op_type, ios18_ops=ios18_ops),
                            tuple(p for p, _ in rest)))
    return layers


# nn.MultiheadAttention keeps its projections as bare parameters that F.linear reads: Core ML stores each as a
# `linear` weight const (in_proj_weight (3E, E) when q/k/v share the input size, else q/k/v_proj_weight).
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _weight_attrs(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module``'s own attributes that Core ML stores as conv/linear/gather weight consts."""
    if isinstance(module, WEIGHT_MODULES):
        return ("weight",)
    if isinstance(module, nn.MultiheadAttention):  # out_proj is an nn.Linear, found as a module of its own
        return _MHA_WEIGHTS
    return ()


def identical_weights(model: nn.Module, layers: list[Layer]) -> tuple[str, str] | None:
    """The first two layers whose fp16 weights are equal in shape and every value, or None.

    coremltools' ``const_deduplication`` pass stores such weights as one const (100 elements or more), so the
    package has one weight where the sweep would see two (cloned, untrained stacks: nn.TransformerEncoder
    deep-copies its layer)."""
    seen: dict[tuple, str] = {}
    for layer in layers:
        weight = model.get_parameter(layer.layer).detach().to(torch.float16).contiguous().cpu()
        key = (tuple(weight.shape), hashlib.sha256(weight.reshape(-1).view(torch.uint8).numpy().tobytes()).digest())
        if key in seen:
            return seen[key], layer.layer
        seen[key] = layer.layer
    return None


def model_hash(model: nn.Module) -> str:
    """sha256 of the model class and every parameter/buffer (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__};".encode())
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{list(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()

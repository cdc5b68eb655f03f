"""Put simulated weights into a torch model for a trial, and restore it bit-identically after."""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn

from ..errors import PlanError
from ..spec import Spec, parse_spec, reader_key
from .cache import SimCache, default_cache
from .core import SimResult
from .finite import NonFiniteWeightError

_OP_TYPES: tuple[tuple[type, str], ...] = (
    (nn.modules.conv._ConvTransposeNd, "conv_transpose"),
    (nn.modules.conv._ConvNd, "conv"),
    (nn.Linear, "linear"),
    (nn.Embedding, "gather"),
)


WEIGHT_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)


def infer_op_type(module: nn.Module) -> str:
    """The Core ML op that consumes a module's weight after conversion (Linear -> linear, ...)."""
    for cls, op_type in _OP_TYPES:
        if isinstance(module, cls):
            return op_type
    return "linear"


def weight_readers(model: nn.Module, weight: torch.Tensor) -> str:
    """``spec.reader_key`` of every conv/linear/embedding module of ``model`` holding ``weight`` (tied
    weights have several; grouped convs add their groups), as coremltools' skip rules see it after conversion."""
    found = [(infer_op_type(m), getattr(m, "groups", 1)) for m in model.modules()
             if isinstance(m, WEIGHT_MODULES) and getattr(m, "weight", None) is weight]
    return reader_key(found)


def _parameter(model: nn.Module, path: str) -> tuple[nn.Parameter, nn.Module]:
    module_path, _, _ = path.rpartition(".")
    try:
        return model.get_parameter(path), model.get_submodule(module_path) if module_path else model
    except AttributeError:
        raise PlanError(f"layer {path!r}", "is not a parameter of the model",
                        "use a path from model.named_parameters(), e.g. 'features.0.weight'") from None


@contextlib.contextmanager
def apply_plan(model: nn.Module, assignments: Mapping[str, Spec | str], op_types: Mapping[str, str] | None = None,
               kmeans: str = "exact", cache: SimCache | None = None,
               precision: str = "fp16") -> Iterator[dict[str, SimResult]]:
    """Within the block, each ``{param path: spec}`` weight holds its simulated value; restored after.

    ``precision`` is the package's weight precision ("fp32" when converted with ``compute_precision=FLOAT32``)."""
    cache = cache if cache is not None else default_cache()
    saved: dict[str, torch.Tensor] = {}
    saved_bias: dict[nn.Module, torch.Tensor | None] = {}
    results: dict[str, SimResult] = {}
    try:
        for path, spec in assignments.items():
            spec = parse_spec(spec)
            param, module = _parameter(model, path)
            op_type = (op_types or {}).get(path) or (weight_readers(model, param) if isinstance(module, WEIGHT_MODULES)
                                                     else infer_op_type(module))
            try:  # simulated on the CPU in NCHW whatever the model's device and layout, as coremltools computes
                result = cache.get(spec, param.detach().cpu().contiguous(), op_type, kmeans, precision)
            except NonFiniteWeightError as exc:
                raise exc.named(repr(path)) from None
            results[path] = result
            if path not in saved:
                saved[path] = param.detach().clone()
            with torch.no_grad():
                param.copy_(result.weight.to(device=param.device, dtype=param.dtype))
            if "bias_delta" in result.params:
                _correct_bias(module, result.params["bias_delta"], precision, saved_bias)
        yield results
    finally:
        with torch.no_grad():
            for path, original in saved.items():
                model.get_parameter(path).copy_(original)
            for module, bias in saved_bias.items():
                if bias is None:
                    module.register_parameter("bias", None)
                else:
                    module.bias.copy_(bias)


def _correct_bias(module: nn.Module, delta: torch.Tensor, precision: str,
                  saved_bias: dict[nn.Module, torch.Tensor | None]) -> None:
    """Give ``module`` the bias the package stores after bias correction (a zero bias plus the delta where
    it has none); the original is kept in ``saved_bias`` to restore."""
    from .compensate import corrected_bias

    bias = getattr(module, "bias", None)
    if module not in saved_bias:
        saved_bias[module] = None if bias is None else bias.detach().clone()
    original = saved_bias[module]
    new = corrected_bias(None if original is None else original.cpu().numpy(), delta, precision)
    with torch.no_grad():
        if bias is None:
            weight = module.weight
            module.bias = nn.Parameter(new.to(device=weight.device, dtype=weight.dtype), requires_grad=False)
        else:
            bias.copy_(new.to(device=bias.device, dtype=bias.dtype))


@contextlib.contextmanager
def apply_spec(model: nn.Module, param_path: str, spec: Spec | str, op_type: str | None = None,
               kmeans: str = "exact", cache: SimCache | None = None, precision: str = "fp16") -> Iterator[SimResult]:
    """One layer with its simulated weight for the duration of the block (a sensitivity trial)."""
    with apply_plan(model, {param_path: spec}, {param_path: op_type} if op_type else None, kmeans, cache,
                    precision) as res:
        yield res[param_path]

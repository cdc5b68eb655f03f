"""Convert a compressed torch model to an ``.mlpackage`` and read back exactly what the package holds.

``optimize.torch`` compressors leave fake-compressed weights plus ``_COREML_/...`` buffers, which
``ct.convert`` turns into constexpr ops; the weights then get new const names (``..._cast_fp16``)
and FX-based quantizers rename fused modules (``classifier.0.0``). This module restores the
torch-name mapping, and loads the package's decompressed weights into the uncompressed torch model:
every accuracy a workflow reports is measured on those weights (our honesty rule), and the torch
weights must equal them within fp16 rounding or the stage fails.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..model.convert import find_const
from ..model.inventory import Inventory
from ..model.package import TORCH_NAMES_KEY, atomic_output, inventory_of, load_package

logger = logging.getLogger(__name__)

# Package vs torch weights: fp16 rounding of LUT entries / scales is at most 2**-11 relative; allow 2x.
RELATIVE_TOLERANCE = 1e-3
# A few elements may differ (coremltools re-derives a sparsity mask from fp16 values); more fails the stage.
MAX_DIFFERING_SHARE = 0.01


@dataclass
class Exported:
    """A saved package, its inventory, and the uncompressed torch model holding the package's weights."""

    path: Path
    inventory: Inventory
    package_model: nn.Module
    max_relative_diff: dict[str, float] = field(default_factory=dict)  # planned layer -> max |pkg - torch| / max |w|
    notes: list[str] = field(default_factory=list)


def scrub(model: nn.Module) -> nn.Module:
    """Drop instance ``__getstate__`` overrides MagnitudePruner leaves behind (they break deepcopy)."""
    for module in model.modules():
        module.__dict__.pop("__getstate__", None)
    return model


def param_aliases(compressed: nn.Module, reference: nn.Module) -> dict[str, str]:
    """Compressed-model parameter path -> reference (BN-folded original) path.

    Same names when the compressor kept the structure; else by order (FX fusion renames
    ``classifier.0`` to ``classifier.0.0`` but keeps parameter order), checked shape by shape."""
    ours = dict(compressed.named_parameters())
    theirs = dict(reference.named_parameters())
    if set(ours) == set(theirs):
        return {name: name for name in ours}
    if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours.values(), theirs.values())):
        raise ModelError("compressed model", "has parameters that cannot be matched to the original model's",
                         "report this as a bug, with the compressor and model used")
    return dict(zip(ours, theirs))


def check_planned_compressed(inventory: Inventory, planned: dict[str, object], compressor: str) -> None:
    """Refuse a package in which a planned layer stayed fp16 (optimize.torch compressors skip module types they
    do not support, e.g. ConvTranspose2d, without an error): compress's applied-check, by torch module name."""
    from ..compress import _check_applied
    from ..errors import PlanError

    modules = {w.name: module for w in inventory.weights if w.torch_name
               for module, _, leaf in [w.torch_name.rpartition(".")] if leaf == "weight" and module in planned}
    for name, module in modules.items():
        try:
            _check_applied({name: planned[module]}, inventory, by=compressor)  # type: ignore[dict-item]
        except PlanError as exc:
            raise PlanError(f"layer {module!r} ({name}, spec {planned[module]})", exc.problem,
                            f"skip it in the plan (`skip: [{module}]`) or use the data_free stage, which "
                            "compresses it") from None


def export_package(compressed: nn.Module, reference: nn.Module, input_shape: tuple[int, ...], target: str,
                   output: str | os.PathLike, planned: dict[str, object], compressor: str = "the compressor") -> Exported:
    """Convert ``compressed`` (compression kept) to ``output`` atomically and check it against torch: weights,
    and the package's outputs (package runtime) against torch holding the package's weights (``model/check.py``).

    ``reference`` is the uncompressed BN-folded model; ``planned`` the module names the plan compresses (each
    must come out compressed, else ModelError/PlanError naming ``compressor`` and nothing is written)."""
    from ..evaluation.weights import decompressed_consts
    from ..model.check import check_package
    from ..model.convert import convert, example_inputs, mha_fastpath_off

    scrub(compressed)
    compressed.eval()
    convert_logger = logging.getLogger("coreml_opt.model.convert")
    level = convert_logger.level
    convert_logger.setLevel(logging.ERROR)  # its name mapping misses renamed consts; we rebuild it below
    try:
        mlmodel, _ = convert(compressed, input_shape, target=target)
    finally:
        convert_logger.setLevel(level)
    aliases = param_aliases(compressed, reference)
    inventory = inventory_of(mlmodel)
    shapes = {w.name: tuple(w.shape) for w in inventory.weights}
    mapping = {}
    for path, param in compressed.named_parameters():
        name = find_const(path, tuple(param.shape), shapes, allow_renamed=True) if param.ndim >= 2 else None
        if name is not None:
            mapping[name] = aliases[path]
    mlmodel.user_defined_metadata[TORCH_NAMES_KEY] = json.dumps(mapping, sort_keys=True)
    values = decompressed_consts(mlmodel)
    value_shapes = {k: tuple(v.shape) for k, v in values.items()}
    package_model = copy.deepcopy(reference).eval()
    diffs: dict[str, float] = {}
    off: dict[str, int] = {}  # planned layer -> elements beyond tolerance
    sizes: dict[str, int] = {}
    torch_params = dict(compressed.named_parameters())
    with torch.no_grad():
        for path, param in compressed.named_parameters():
            target_param = package_model.get_parameter(aliases[path])
            name = find_const(path, tuple(param.shape), value_shapes, allow_renamed=True)
            module = aliases[path].rpartition(".")[0]
            if name is None:
                if module in planned and aliases[path].endswith(".weight"):
                    raise ModelError(str(output), f"holds no weight for planned layer {module!r}",
                                     "report this as a bug, with the compressor used")
                target_param.copy_(param.detach().to(torch.float16).float())
                continue
            stored = torch.from_numpy(np.asarray(values[name], dtype=np.float32))
            target_param.copy_(stored)
            if module in planned and aliases[path].endswith(".weight"):
                ours = torch_params[path].detach().float()
                scale = float(ours.abs().max()) or 1.0
                gap = (stored - ours).abs()
                diffs[module] = float(gap.max()) / scale
                sizes[module] = gap.numel()
                if int((gap > RELATIVE_TOLERANCE * scale).sum()):
                    off[module] = int((gap > RELATIVE_TOLERANCE * scale).sum())
    notes = []
    for module, count in sorted(off.items()):
        share = count / sizes[module]
        text = (f"{module}: {count} of {sizes[module]} package weights differ from the torch model beyond fp16 "
                f"rounding (max {diffs[module]:.2e} of max |w|)")
        if share > MAX_DIFFERING_SHARE:
            raise ModelError(str(output), text, "report this as a bug, with the compressor and plan used")
        notes.append(text + "; metrics are measured on the package's weights")
    with atomic_output(output) as tmp:
        mlmodel.save(str(tmp))
        saved = load_package(tmp, load_weights=False).inventory
        check_planned_compressed(saved, planned, compressor)  # nothing is written if a layer was skipped
        with mha_fastpath_off():  # the package's outputs against torch holding the package's weights
            check_package(tmp, package_model, example_inputs(package_model, input_shape), str(output))
    logger.info("wrote %s (%d weights, %d bytes)", output, len(saved.weights), saved.total_bytes)
    return Exported(Path(output), saved, package_model, diffs, notes)


def package_weights_model(package: str | os.PathLike, reference: nn.Module) -> nn.Module:
    """A copy of ``reference`` holding the decompressed weights stored in ``package`` (data-free output)."""
    from ..evaluation.weights import decompressed_consts

    loaded = load_package(package)
    values = decompressed_consts(loaded.mlmodel)
    shapes = {k: tuple(v.shape) for k, v in values.items()}
    out = copy.deepcopy(reference).eval()
    with torch.no_grad():
        for path, param in out.named_parameters():
            name = find_const(path, tuple(param.shape), shapes, allow_renamed=True)
            if name is None:
                if param.ndim >= 2:
                    raise ModelError(str(package), f"holds no weight for {path!r}", "convert with coreml_opt")
                param.copy_(param.to(torch.float16).float())
            else:
                param.copy_(torch.from_numpy(np.asarray(values[name], dtype=np.float32)))
    return out

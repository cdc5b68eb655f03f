"""Plan -> ``coremltools.optimize.torch`` configs: one module-name config per planned layer.

Each technique expresses only some specs; any other planned spec is a one-line PlanError naming the
layer and the spec. Configs never rely on coremltools' fallbacks: an empty config would compress
every layer, so callers get ``None`` when the plan leaves nothing for the technique.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable

from torch import nn

from ..errors import PlanError
from ..model.inventory import Inventory
from ..plan import Plan
from ..spec import JointSpec, PalettizeSpec, PruneSpec, QuantSpec, Spec

_KIND = {"skm": "palettize", "dkm": "palettize", "gptq": "quantize", "w8a8": "quantize", "qat": "quantize",
         "sparsegpt": "prune", "prune": "prune"}
DEFAULT_METHOD = {"calibration": {"palettize": "skm", "quantize": "gptq", "prune": "sparsegpt"},
                  "finetune": {"palettize": "dkm", "quantize": "qat", "prune": "prune"}}


def planned_modules(plan: Plan, inventory: Inventory) -> dict[str, Spec]:
    """Torch module name -> spec for every module ``.weight`` the plan compresses (BN-folded model names);
    bare parameters (``bare_parameters``) are left out."""
    return {path.rpartition(".")[0]: spec for path, spec in _planned_paths(plan, inventory).items()
            if path.rpartition(".")[2] == "weight"}


def bare_parameters(plan: Plan, inventory: Inventory) -> dict[str, Spec]:
    """Parameter path -> spec for planned weights that are no module's ``.weight`` (nn.MultiheadAttention's
    ``in_proj_weight``): the data_free stage compresses them, optimize.torch's per-module configs cannot."""
    return {path: spec for path, spec in _planned_paths(plan, inventory).items()
            if path.rpartition(".")[2] != "weight"}


def _planned_paths(plan: Plan, inventory: Inventory) -> dict[str, Spec]:
    out: dict[str, Spec] = {}
    torch_names = {w.name: w.torch_name for w in inventory.weights}
    for const, spec in plan.resolve(inventory).items():
        if spec.is_none:
            continue
        path = torch_names.get(const)
        if not path:
            raise PlanError(f"weight {const!r}", "has no PyTorch module name in the converted model",
                            "convert with coreml_opt.model.convert so torch names are kept, or skip it")
        out[path] = spec
    return out


def default_method(kind: str, specs: dict[str, Spec]) -> str:
    """The method a stage uses when the workflow names none: by the plan's technique."""
    techniques = {("prune" if isinstance(s, JointSpec) else s.technique) for s in specs.values()}
    if len(techniques) != 1:
        raise PlanError("plan", f"mixes techniques {sorted(techniques)}, so a {kind} stage needs a method",
                        f"set `method:` (one of {sorted(DEFAULT_METHOD[kind].values())}) and give other layers "
                        "a spec it can express, or skip them")
    return DEFAULT_METHOD[kind][techniques.pop()]


def _reject(method: str, module: str, spec: Spec, why: str) -> PlanError:
    return PlanError(f"layer {module!r} (spec {spec})", f"{method} cannot express it: {why}",
                     "give this layer another spec or skip it in the plan, or use the data_free stage")


def _palette(method: str, module: str, spec: Spec) -> dict[str, Any]:
    if not isinstance(spec, PalettizeSpec) or spec.mode != "kmeans":
        raise _reject(method, module, spec, "it runs k-means palettization (palN, palN/gG, palN/vecV, palN/pcs) only")
    kwargs: dict[str, Any] = {"n_bits": spec.nbits, "granularity": spec.granularity,
                              "enable_per_channel_scale": spec.per_channel_scale}
    if spec.group_size is not None:
        kwargs["group_size"] = spec.group_size
    if spec.cluster_dim > 1:
        kwargs["cluster_dim"] = spec.cluster_dim
    return kwargs


def _skm(module: str, spec: Spec) -> Any:
    from coremltools.optimize.torch.palettization import ModuleSKMPalettizerConfig

    return ModuleSKMPalettizerConfig(**_palette("SKMPalettizer", module, spec))


def _dkm(module: str, spec: Spec) -> Any:
    from coremltools.optimize.torch.palettization import ModuleDKMPalettizerConfig

    return ModuleDKMPalettizerConfig(weight_threshold=0, **_palette("DKMPalettizer", module, spec))


def _gptq_dtype(spec: QuantSpec) -> str:
    # GPTQ stores unsigned codes (symmetric ones with zero point 2**(n-1)): same bytes as intN.
    return f"uint{spec.nbits}"


def _gptq(module: str, spec: Spec) -> Any:
    from coremltools.optimize.torch.layerwise_compression import ModuleGPTQConfig

    if not isinstance(spec, QuantSpec):
        raise _reject("GPTQ", module, spec, "it quantizes weights (int8, int4, int4/blockN) only")
    return ModuleGPTQConfig(weight_dtype=_gptq_dtype(spec), granularity=spec.granularity,
                            block_size=spec.block_size,
                            quantization_scheme="symmetric" if spec.mode == "linear_symmetric" else "affine")


def _sparsegpt(module: str, spec: Spec) -> Any:
    from coremltools.optimize.torch.layerwise_compression import ModuleSparseGPTConfig

    prune, quant = spec, None
    if isinstance(spec, JointSpec) and len(spec.steps) == 2 and isinstance(spec.steps[1], QuantSpec):
        prune, quant = spec.steps
    if not isinstance(prune, PruneSpec) or prune.block_size is not None:
        raise _reject("SparseGPT", module, spec, "it prunes unstructured or n:m (pruneN, pruneN:M, +intN) only")
    if quant is not None and quant.granularity == "per_block":
        raise _reject("SparseGPT", module, spec, "its quantization is per channel or per tensor only")
    kwargs: dict[str, Any] = {"target_sparsity": prune.sparsity, "weight_dtype": "float32"}
    if prune.n_m is not None:
        kwargs["n_m_ratio"] = tuple(prune.n_m)
    if quant is not None:
        kwargs.update(weight_dtype=_gptq_dtype(quant), quantization_granularity=quant.granularity,
                      quantization_scheme="symmetric" if quant.mode == "linear_symmetric" else "affine")
    return ModuleSparseGPTConfig(**kwargs)


def _linear(method: str, module: str, spec: Spec, activations: bool) -> Any:
    from coremltools.optimize.torch.quantization import ModuleLinearQuantizerConfig

    if not isinstance(spec, QuantSpec) or spec.granularity == "per_block":
        raise _reject(method, module, spec, "LinearQuantizer quantizes per channel or per tensor only (int8, int4, "
                      "int8/tensor)")
    if activations and spec.nbits != 8:
        raise _reject(method, module, spec, "W8A8 needs 8-bit weights")
    signed = spec.dtype.startswith("int")
    return ModuleLinearQuantizerConfig(
        weight_dtype=f"{'q' if signed else 'qu'}int{spec.nbits}", weight_per_channel=spec.granularity == "per_channel",
        activation_dtype="quint8" if activations else "float32", weight_observer="min_max",
        activation_observer="min_max",
        quantization_scheme="symmetric" if spec.mode == "linear_symmetric" else "affine")


def _magnitude(module: str, spec: Spec, update_steps: list[int]) -> Any:
    from coremltools.optimize.torch.pruning import ModuleMagnitudePrunerConfig, PolynomialDecayScheduler

    if not isinstance(spec, PruneSpec):
        raise _reject("MagnitudePruner", module, spec, "it prunes (pruneN, pruneN/blockB, pruneN:M) only")
    kwargs: dict[str, Any] = {"scheduler": PolynomialDecayScheduler(update_steps=update_steps)}
    if spec.n_m is not None:
        kwargs["n_m_ratio"] = tuple(spec.n_m)
    else:
        kwargs["target_sparsity"] = float(spec.target_sparsity)
    if spec.block_size:
        kwargs["block_size"] = spec.block_size
    return ModuleMagnitudePrunerConfig(**kwargs)


def _names(specs: dict[str, Spec], make: Callable[[str, Spec], Any]) -> dict[str, Any]:
    # Module names are matched as regexes (fullmatch): escape the dots.
    return {re.escape(module): make(module, spec) for module, spec in specs.items()}


def check_method(method: str, specs: dict[str, Spec]) -> None:
    """Raise PlanError now (before any work) if ``method`` cannot express a planned spec."""
    build_config(method, specs, model=None, update_steps=[0])


def build_config(method: str, specs: dict[str, Spec], model: nn.Module | None,
                 update_steps: list[int] | None = None, layers: list[str] | None = None) -> Any:
    """The optimize.torch config that applies ``specs`` (module name -> spec) with ``method``."""
    if not specs:
        raise PlanError("plan", "compresses no layer", "name a spec for at least one weight above the threshold")
    if method == "skm":
        from coremltools.optimize.torch.palettization import SKMPalettizerConfig

        return SKMPalettizerConfig(module_name_configs=_names(specs, _skm))
    if method == "dkm":
        from coremltools.optimize.torch.palettization import DKMPalettizerConfig

        return DKMPalettizerConfig(module_name_configs=_names(specs, _dkm))
    if method in ("gptq", "sparsegpt"):
        from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressorConfig

        make = _gptq if method == "gptq" else _sparsegpt
        sequential = model is not None and isinstance(model, nn.Sequential)
        return LayerwiseCompressorConfig(module_name_configs=_names(specs, make),
                                         layers=layers if layers else (None if sequential else [""]))
    if method == "prune":
        from coremltools.optimize.torch.pruning import MagnitudePrunerConfig

        return MagnitudePrunerConfig(module_name_configs=_names(specs, lambda m, s: _magnitude(m, s, update_steps)))
    if method in ("qat", "w8a8"):
        return _linear_quantizer_config(method, specs, model)
    raise PlanError(f"method {method!r}", "is unknown", f"use one of {sorted(_KIND)}")


def _linear_quantizer_config(method: str, specs: dict[str, Spec], model: nn.Module | None) -> Any:
    """LinearQuantizer: the most common spec is the global config, unplanned conv/linear layers are None.

    Its FX flow ignores module-name configs for conv/linear fused with a following activation (they take
    the global config); :func:`verify_linear_quantizer` catches that after ``prepare``."""
    from coremltools.optimize.torch.quantization import LinearQuantizerConfig

    activations = method == "w8a8"
    configs = {m: _linear(method.upper(), m, s, activations) for m, s in specs.items()}
    common = Counter(str(s) for s in specs.values()).most_common(1)[0][0]
    global_module = next(m for m, s in specs.items() if str(s) == common)
    # LinearQuantizer looks module names up with get_submodule: plain names, not regexes.
    names: dict[str, Any] = {m: c for m, c in configs.items() if str(specs[m]) != common}
    if model is not None:
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) and name not in specs:
                names[name] = None
    return LinearQuantizerConfig(global_config=configs[global_module], module_name_configs=names)


def verify_linear_quantizer(prepared: nn.Module, specs: dict[str, Spec]) -> None:
    """Every planned layer got its bits and every other conv/linear none (LinearQuantizer's FX pitfalls)."""
    seen = set()
    for name, module in prepared.named_modules():
        fq = getattr(module, "weight_fake_quant", None)
        if fq is None:
            continue
        qmin, qmax = getattr(fq, "quant_min", None), getattr(fq, "quant_max", None)
        bits = (qmax - qmin + 1).bit_length() - 1 if qmin is not None and qmax is not None else None
        spec = specs.get(name)
        seen.add(name)
        if spec is None and bits is not None:
            raise PlanError(f"layer {name!r}", f"would be quantized to {bits} bits by LinearQuantizer though the plan "
                            "leaves it uncompressed (a conv/linear fused with its activation takes the global config)",
                            "give it the plan's most common spec, or use the data_free stage")
        if spec is not None and bits != spec.nbits:
            raise PlanError(f"layer {name!r} (spec {spec})", f"gets {bits or 'no'}-bit weights from LinearQuantizer "
                            "(a conv/linear fused with its activation takes the global config)",
                            "give fused layers the plan's most common spec, or use the data_free stage")
    missing = sorted(set(specs) - seen)
    if missing:
        raise PlanError(f"layer {missing[0]!r}", "was not prepared for quantization by LinearQuantizer",
                        "check that the module is a Conv2d/Linear traced by torch.fx")

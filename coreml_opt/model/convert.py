"""PyTorch -> Core ML conversion that keeps torch parameter names.

coremltools renames a conv weight to ``const_N`` when it folds BatchNorm itself,
so we fold BN in PyTorch first; the traced weights then keep their paths
(``features.3.weight`` -> ``features_3_weight_to_fp16``). The torch <-> Core ML
name mapping is read back from the converted program and stored in the model's
user-defined metadata, so later stages can name layers both ways.
"""
from __future__ import annotations

import contextlib
import json
import numbers
import logging
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import coremltools as ct
import torch
from torch import nn

from coreml_opt.errors import ModelError
from coreml_opt.model.fold import FOLD_TOLERANCE, FoldedBatchNorm, check_fold, fold_batchnorm  # noqa: F401
from coreml_opt.model.inputs import InputSpec, parse_input, resolve_inputs  # noqa: F401 (re-export)
from coreml_opt.model.package import TORCH_NAMES_KEY, read_torch_names, save_package  # noqa: F401 (re-export)
from coreml_opt.targets import DEFAULT_TARGET, TargetLike, parse_target

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- factories

def load_factory(spec: str) -> nn.Module:
    """Import ``package.module:factory`` (or ``path/to/file.py:factory``) and call it with no arguments; returns
    an nn.Module. Errors name ``spec`` as given and the fix for that form (see :mod:`coreml_opt.imports`)."""
    from ..imports import call_without_arguments, import_callable

    model = call_without_arguments(import_callable(spec, ModelError), spec, ModelError)
    if not isinstance(model, nn.Module):
        raise ModelError(spec, f"factory returned {type(model).__name__}, not a torch.nn.Module",
                         "return the model instance from the factory")
    return model


# --------------------------------------------------------------------------- conversion

def _check_finite_parameters(model: nn.Module, label: str) -> None:
    """coremltools' converter fails on a NaN weight with "tensor value not consistent" and stores inf as is:
    refuse either in one line naming the parameter (after BN folding, which can make them)."""
    from ..nonfinite import nonfinite_tensors

    for name, bad, total in nonfinite_tensors(model):
        raise ModelError(label, f"parameter {name!r} holds {bad} NaN/inf values of {total}",
                         "replace them (retrain or load a finite checkpoint) before converting")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def weight_consts(mlmodel: ct.models.MLModel) -> dict[str, tuple[int, ...]]:
    """Core ML const names stored in the weight file (blobFileValue) -> shape, in program order.

    Names are the const ops' own names: coremltools names compressed ops after them, and
    ``op_name_configs`` matches them (the output variable differs when coremltools sanitised a
    name, e.g. ``op_0_weight_to_fp16`` writing ``var_0_weight_to_fp16``)."""
    spec = mlmodel.get_spec()
    if not spec.HasField("mlProgram"):
        raise ModelError("model", "is not an ML Program", "convert with convert_to='mlprogram'")
    out: dict[str, tuple[int, ...]] = {}
    for func in spec.mlProgram.functions.values():
        for block in func.block_specializations.values():
            for op in block.operations:
                if op.type != "const" or "val" not in op.attributes:
                    continue
                if op.attributes["val"].WhichOneof("value") != "blobFileValue":
                    continue
                names = op.attributes["name"].immediateValue.tensor.strings.values if "name" in op.attributes else []
                for output in op.outputs:
                    dims = output.type.tensorType.dimensions
                    out[names[0] if names else output.name] = tuple(int(d.constant.size) for d in dims)
    return out


# A traced parameter's const: its path with '.' -> '_' plus one of these (fp16 cast, or a compressed
# weight that torch-side compression emitted through a cast), or nothing (fp32 programs).
CONST_SUFFIXES = ("_to_fp16", "_cast_fp16", "")


def const_name(param_path: str) -> str:
    """The Core ML const op a traced torch parameter becomes (``features.3.weight`` -> ``features_3_weight_to_fp16``;
    ``0.weight`` of a top-level Sequential -> ``op_0_weight_to_fp16``, as coremltools sanitises op names)."""
    return _sanitized(param_path.replace(".", "_") + CONST_SUFFIXES[0], "op_")


def _sanitized(name: str, prefix: str) -> str:
    """``name`` as coremltools' NameSanitizer writes it: invalid characters to ``_``, ``prefix``
    before a leading non-letter (``var_`` for variables, ``op_`` for ops), reserved words suffixed."""
    from coremltools.converters.mil.mil.passes.defs.preprocess import NameSanitizer

    return NameSanitizer(prefix=prefix).sanitize_name(name)


def _candidates(name: str) -> list[str]:
    """``name`` and the forms coremltools' name sanitiser gives it as a variable and as an op
    (``0_weight_to_fp16`` -> ``var_0_weight_to_fp16``, ``op_0_weight_to_fp16``): a top-level
    ``nn.Sequential`` has parameter paths that start with a digit."""
    out = [name]
    for prefix in ("var_", "op_"):
        sanitized = _sanitized(name, prefix)
        if sanitized not in out:
            out.append(sanitized)
    return out


def find_const(param_path: str, shape: tuple[int, ...], const_shapes: Mapping[str, tuple[int, ...]],
               allow_renamed: bool = False) -> str | None:
    """The const of ``const_shapes`` (name -> shape) holding a torch parameter, matched by name and shape.

    Names are tried as traced and as coremltools sanitises them (``op_``/``var_`` prefixes).
    ``allow_renamed`` also accepts names that extend it (``..._to_fp16_palettized`` after a compression pass)."""
    base = param_path.replace(".", "_")
    for suffix in CONST_SUFFIXES:
        for name in _candidates(base + suffix):
            if tuple(const_shapes.get(name, ())) == tuple(shape):
                return name
    if allow_renamed:
        stems = [stem + "_" for stem in _candidates(base)]
        return next((name for name, s in const_shapes.items()
                     if name.startswith(tuple(stems)) and tuple(s) == tuple(shape)), None)
    return None


def torch_name_mapping(model: nn.Module, mlmodel: ct.models.MLModel) -> dict[str, str]:
    """Map Core ML const name -> torch parameter path for every torch weight with ndim >= 2."""
    consts = weight_consts(mlmodel)
    mapping: dict[str, str] = {}
    missing = []
    for path, param in model.named_parameters():
        if param.ndim < 2:
            continue
        name = find_const(path, tuple(param.shape), consts)
        if name is None:
            missing.append(path)
        else:
            mapping[name] = path
    if missing:
        logger.warning("no Core ML weight const found for: %s", ", ".join(missing))
    return mapping


@contextlib.contextmanager
def mha_fastpath_off() -> Iterator[None]:
    """Trace with PyTorch's fused MHA/TransformerEncoderLayer fast path off: coremltools cannot convert
    ``aten::_transformer_encoder_layer_fwd`` / ``_native_multi_head_attention``; the slow path is plain ops."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


class _DropOpErrorBanner(logging.Filter):
    """Drops coremltools' multi-line "ERROR - converting 'op'" log record; the ModelError raised names the op."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ERROR - converting" not in str(record.msg)


def _describe(specs: Sequence[InputSpec]) -> str:
    """``an example input of shape [1, 1, 8, 8]`` or ``example inputs ids:1,16:int32, mask:1,16``."""
    if len(specs) == 1 and specs[0].dtype is None:
        return f"an example input of shape {list(specs[0].shape)}"
    return "example inputs " + ", ".join(map(str, specs))


def _convert_error(label: str, exc: BaseException) -> ModelError:
    """One line for a coremltools conversion failure; names a missing op converter when that is the cause."""
    line = _first_line(exc)
    if "not implemented" in line.lower() or "unsupported op" in line.lower():
        return ModelError(label, f"uses a PyTorch op coremltools 9.0 cannot convert ({line})",
                          "replace that op in forward() or register a converter with "
                          "coremltools.converters.mil.frontend.torch.register_torch_op")
    return ModelError(label, f"coremltools could not convert it ({type(exc).__name__}: {line})",
                      "check its ops are supported by coremltools 9.0")


def example_inputs(model: nn.Module, inputs: Union[Sequence[int], Sequence[Union[str, InputSpec]]]
                   ) -> tuple[torch.Tensor, ...]:
    """The seeded example ``convert`` traces (and folds BN by) for ``inputs``: one input shape, or InputSpecs.

    Pass it to ``fold_batchnorm`` wherever a folded model must match the converted package."""
    specs = resolve_inputs(inputs, None, "x") if all(isinstance(d, numbers.Integral) for d in inputs) \
        else resolve_inputs(None, inputs, "x")
    generator = torch.Generator().manual_seed(0)
    return tuple(s.example(model, generator) for s in specs)


def convert(model: Union[nn.Module, str], input_shape: Optional[Sequence[int]] = None, *,
            target: TargetLike = DEFAULT_TARGET, output_path: Union[str, Path, None] = None,
            input_name: str = "x", inputs: Optional[Sequence[Union[str, InputSpec]]] = None,
            ) -> tuple[ct.models.MLModel, dict[str, str]]:
    """Fold BN (exactly, checked), trace and convert to an fp16 ML Program; returns (mlmodel, {const: torch path}).

    ``model`` may be an nn.Module or a ``package.module:factory`` string. Give one float input by
    ``input_shape`` (named ``input_name``), or several by ``inputs`` in forward() order, each an InputSpec
    or ``NAME:SHAPE[:DTYPE]`` (``ids:1,16:int32``). The fold is compared with the original on the traced
    example before anything is converted. The mapping is also stored in
    ``mlmodel.user_defined_metadata[TORCH_NAMES_KEY]``. A saved package is run by the package runtime on
    the example first and refused (nothing written) when it disagrees with the model (``model/check.py``).
    """
    label = model if isinstance(model, str) else type(model).__name__
    specs = resolve_inputs(input_shape, inputs, input_name)
    if isinstance(model, str):
        model = load_factory(model)
    ct_target = parse_target(target)
    example = example_inputs(model, specs)
    with mha_fastpath_off():
        try:
            with torch.no_grad():
                folded = fold_batchnorm(model, example)
                _check_finite_parameters(folded, label)
                folded(*example)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(label, f"fails on {_describe(specs)} "
                             f"({type(exc).__name__}: {_first_line(exc)})",
                             "pass the input shape (and dtype) the model expects") from exc
        check_fold(model, folded, example, label)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(folded, example)
        except Exception as exc:
            raise ModelError(label, f"cannot be traced with torch.jit.trace ({_first_line(exc)})",
                             "remove data-dependent control flow from forward()") from exc
    banner = _DropOpErrorBanner()
    logging.getLogger("coremltools").addFilter(banner)
    try:
        mlmodel = ct.convert(
            traced,
            inputs=[s.tensor_type() for s in specs],
            convert_to="mlprogram",
            minimum_deployment_target=ct_target,
            compute_precision=ct.precision.FLOAT16,
        )
    except Exception as exc:
        raise _convert_error(label, exc) from exc
    finally:
        logging.getLogger("coremltools").removeFilter(banner)
    mapping = torch_name_mapping(folded, mlmodel)
    mlmodel.user_defined_metadata[TORCH_NAMES_KEY] = json.dumps(mapping, sort_keys=True)
    if output_path is not None:
        save_checked(mlmodel, output_path, folded, example, label)
        logger.info("saved %s", output_path)
    return mlmodel, mapping


def save_checked(mlmodel: ct.models.MLModel, output_path: Union[str, Path], model: nn.Module,
                 example: Sequence[torch.Tensor], label: str) -> None:
    """Save ``mlmodel`` atomically, moving it into place only if the package runtime's outputs on ``example``
    agree with ``model``'s (see ``model/check.py``; ModelError and nothing written otherwise)."""
    from coreml_opt.model.check import check_package
    from coreml_opt.model.package import atomic_output, check_package_output

    check_package_output(output_path)
    with atomic_output(output_path) as tmp:
        mlmodel.save(str(tmp))
        with mha_fastpath_off():
            check_package(tmp, model, example, label)

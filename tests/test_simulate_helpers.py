"""Helpers (no tests) for the simulation fidelity tests: convert tiny models, compress with real coremltools."""
from __future__ import annotations

import functools

import numpy as np
import torch

from coreml_opt.spec import JointSpec, LutQuantSpec, PalettizeSpec, QuantSpec, Spec, parse_spec


def make_module(shape: tuple[int, ...]) -> tuple[torch.nn.Module, tuple[int, ...], str]:
    """A bias-free Linear (2-D shape) or Conv2d (4-D shape) holding a seeded random weight."""
    gen = torch.Generator().manual_seed(sum(shape) * 7 + len(shape))
    if len(shape) == 2:
        module = torch.nn.Linear(shape[1], shape[0], bias=False)
        example = (1, shape[1])
        op_type = "linear"
    else:
        module = torch.nn.Conv2d(shape[1], shape[0], shape[2:], bias=False)
        example = (1, shape[1], shape[2] + 2, shape[3] + 2)
        op_type = "conv"
    with torch.no_grad():
        module.weight.copy_(torch.randn(shape, generator=gen) * 0.05)
    return module.eval(), example, op_type


@functools.lru_cache(maxsize=None)
def converted(shape: tuple[int, ...], target: int = 18, precision: str = "fp16"):
    """(mlmodel, torch weight, op_type) for one weight shape, deployment target and compute
    precision ("fp32": ``compute_precision=FLOAT32``, fp32 consts), converted once."""
    import coremltools as ct

    module, example, op_type = make_module(shape)
    traced = torch.jit.trace(module, torch.rand(example))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(shape=example)], convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS18 if target == 18 else ct.target.iOS16,
                         compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16)
    return mlmodel, module.weight.detach().clone(), op_type


def _run_pass(mlmodel, op_config, joint: bool):
    """coremltools' own pass, single-threaded as compress() runs it (scikit-learn's k-means
    depends on the thread count)."""
    import coremltools.optimize.coreml as cto

    from coreml_opt.determinism import single_threaded

    config = cto.OptimizationConfig(global_config=op_config)
    with single_threaded():
        if isinstance(op_config, cto.OpLinearQuantizerConfig):
            return cto.linear_quantize_weights(mlmodel, config, joint_compression=joint)
        if isinstance(op_config, cto.OpPalettizerConfig):
            return cto.palettize_weights(mlmodel, config, joint_compression=joint)
        return cto.prune_weights(mlmodel, config, joint_compression=joint)


def compress(mlmodel, spec: Spec | str, lut_function=None):
    """Apply coremltools' own pass(es) for ``spec`` (joint forms chained with joint_compression)."""
    spec = parse_spec(spec)
    joint = isinstance(spec, JointSpec)
    for i, step in enumerate(spec.parts):
        # The first pass must run plain: prune_weights(joint_compression=True) only re-prunes
        # existing constexpr ops and silently leaves a plain const alone.
        if isinstance(step, PalettizeSpec):
            config = step.coreml_config(weight_threshold=0, lut_function=lut_function)
        else:
            config = step.coreml_config(weight_threshold=0)
        mlmodel = _run_pass(mlmodel, config, joint and i > 0)
    return mlmodel


def decompressed_weights(mlmodel) -> dict[str, np.ndarray]:
    """{const name: value} of every conv/linear weight after ``decompress_weights``."""
    import coremltools.optimize.coreml as cto

    out = {}
    program = cto.decompress_weights(mlmodel)._mil_program
    for op in program.functions["main"].operations:
        if op.op_type in ("conv", "linear", "conv_transpose"):
            var = op.inputs["weight"]
            out[var.op.name] = np.asarray(var.val)
    return out


def emitted_weight(mlmodel) -> np.ndarray:
    """The single conv/linear weight of a tiny model, as coremltools emits it (decompressed)."""
    (value,) = decompressed_weights(mlmodel).values()
    return value


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in fp16 units in the last place between two fp16 arrays (0 = identical values)."""
    def ordered(x):
        bits = np.asarray(x, dtype=np.float16).view(np.int16).astype(np.int32)
        return np.where(bits < 0, -(bits & 0x7FFF), bits)
    return np.abs(ordered(a) - ordered(b))


def is_lut8(spec: Spec) -> bool:
    return any(isinstance(s, LutQuantSpec) for s in spec.parts)


def is_quant(spec: Spec) -> bool:
    return any(isinstance(s, QuantSpec) for s in spec.parts)

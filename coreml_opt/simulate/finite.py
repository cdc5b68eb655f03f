"""Non-finite weights: NaN or inf in a weight chosen for compression, or produced by compressing it.

coremltools compresses such weights without a word: k-means on a NaN fails in scikit-learn, a NaN
spreads to its whole channel's int8 scale, and affine scales of weights near fp16's limit (±65,504)
overflow to inf, so every value decompresses to NaN. The simulation refuses them instead.
"""
from __future__ import annotations

import torch

from ..errors import PlanError
from ..nonfinite import nonfinite_count
from ..spec import PalettizeSpec, PruneSpec, Spec, ThresholdPruneSpec

_INPUT_FIX = "replace the NaN/inf values in the model or skip this layer in the plan (spec none)"
_FP16_FIX = "scale the layer's weights into fp16's range or skip this layer in the plan (spec none)"
_OUTPUT_FIX = "choose k-means palettization (e.g. pal8) for this layer or skip it in the plan (spec none)"
_PROBLEMS = {  # stage -> (problem template, fix)
    "holds": ("{count} of its {total} values are NaN or inf", _INPUT_FIX),
    "fp16": ("{count} of its {total} values lie beyond fp16's ±65504 and become inf", _FP16_FIX),
    "produced": ("compressing it gives {count} of {total} values NaN or inf", _OUTPUT_FIX),
}


class NonFiniteWeightError(PlanError):
    """NaN/inf in a weight (``stage`` "holds"), after its fp16 cast ("fp16") or after compression ("produced")."""

    def __init__(self, weight: str, spec: str, count: int, total: int, stage: str) -> None:
        self.weight, self.spec, self.count, self.total, self.stage = weight, spec, count, total, stage
        problem, fix = _PROBLEMS[stage]
        super().__init__(f"weight {weight} (spec {spec})", problem.format(count=count, total=total), fix)

    def named(self, weight: str) -> "NonFiniteWeightError":
        """The same error naming the weight as the caller knows it (torch path or Core ML const)."""
        return NonFiniteWeightError(weight, self.spec, self.count, self.total, self.stage)


def check_finite(values: torch.Tensor, spec: Spec, stage: str, weight: str | None = None) -> None:
    """Raise :class:`NonFiniteWeightError` when ``values`` hold NaN or inf (``stage``: see the error)."""
    count = nonfinite_count(values)
    if count:
        name = weight if weight is not None else f"of shape {tuple(values.shape)}"
        raise NonFiniteWeightError(name, str(spec), count, values.numel(), stage)


def keeps_finite(spec: Spec) -> bool:
    """Whether compressing finite fp16 values by ``spec`` always gives finite values: pruning keeps or
    zeroes them and k-means/unique palettes hold means or copies of them. Affine scales (int8, uniform
    palettes, per-channel scales, LUT quantization) can overflow fp16 and must be simulated."""
    return all(isinstance(s, (PruneSpec, ThresholdPruneSpec))
               or (isinstance(s, PalettizeSpec) and s.mode in ("kmeans", "unique") and not s.per_channel_scale)
               for s in spec.parts)

"""Error compensation from calibration statistics: the handler of :class:`~coreml_opt.spec.CompensatedSpec`.

- ``+bc``: bias correction, Nagel et al., "Data-Free Quantization Through Weight Equalization and
  Bias Correction" (ICCV 2019), section 4.2, empirical form: b' = b - (W_q - W) E[x], with E[x] the
  mean im2col patch of the layer's input (see :mod:`.calibration`; exact at padded borders).
  ``params["bias_delta"]`` holds -(W_q - W) E[x] per output channel; :func:`corrected_bias` is
  the one rounding both the simulation and the package use.
- ``+gptq``: the ``+aw`` LUT, then indices by GPTQ error feedback and LUTs refit by least squares on the
  layer's full input second moment (:mod:`.gptq`); shipped like ``+aw``.
- ``+aw``: activation-aware LUT: per group, 1-D k-means of the weights weighted by E[x^2] of each
  weight's input position (the diagonal of the layer's input Hessian, as in AWQ/GPTQ-style objectives;
  Var[x] under ``+aw+bc``, since the bias then absorbs the mean), solved exactly by the optimal 1-D
  k-means coremltools uses. Shipped exactly through
  ``OpPalettizerConfig(mode="custom", lut_function=...)`` by looking each group's fp16 values up
  in the LUTs the simulation chose (:func:`aware_lut_function`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import SpecError
from ..spec import CompensatedSpec, PalettizeSpec, channel_axis
from ..storage import _tensors
from .calibration import LayerStats, active_statistics
from .core import SimResult, handler_for, register_handler, skipped
from .gptq import gptq_palettize
from .numerics import h
from .optimal1d import cluster, fp16_unique
from .palettize import Palettized, per_channel_scale



def _stats_for(spec: CompensatedSpec, w16: torch.Tensor) -> LayerStats:
    stats = active_statistics()
    found = stats.get(w16) if stats is not None else None
    if found is None:
        raise SpecError(f"spec {spec}", f"needs calibration statistics of this weight (shape {tuple(w16.shape)})"
                        + ("" if stats is not None else "; none are active"),
                        "collect them with coreml_opt.simulate.collect_statistics(model, batches) on the model "
                        "the package was converted from, and pass them (a sweep or plan does this from its data)")
    if found.patch_mean[0].numel() * found.groups * (w16.shape[0] // found.groups) != w16.numel():
        raise SpecError(f"spec {spec}", f"statistics of shape {tuple(found.patch_mean.shape)} do not fit the weight "
                        f"{tuple(w16.shape)}", "collect statistics on the model the package was converted from")
    return found


def importance(w16: torch.Tensor, stats: LayerStats, centred: bool = False) -> torch.Tensor:
    """E[x^2] of the input each weight multiplies, laid out like the weight (O, I/G, *k), float64; with
    ``centred``, Var[x] = E[x^2] - E[x]^2: once bias correction removes the mean shift (W_q - W) E[x], the
    output error left is (W_q - W)(x - E[x]), whose diagonal cost weights each input by its variance."""
    groups = stats.groups
    per = w16.shape[0] // groups
    weight = stats.patch_sq - stats.patch_mean ** 2 if centred else stats.patch_sq
    return weight.clamp_min(0.0).repeat_interleave(per, dim=0).reshape(w16.shape)


def bias_delta(w16: torch.Tensor, compressed: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """-(W_q - W) E[x] per output channel (float64, shape (O,)): the expected output shift removed."""
    groups = stats.groups
    diff = (compressed.to(torch.float64) - w16.to(torch.float64)).reshape(groups, w16.shape[0] // groups, -1)
    shift = torch.einsum("gok,gk->go", diff, stats.patch_mean.reshape(groups, -1))
    return -shift.reshape(-1)


def corrected_bias(bias: np.ndarray | torch.Tensor | None, delta: torch.Tensor, precision: str = "fp16") -> torch.Tensor:
    """The stored bias b' = round(b + delta) in the package's precision (fp16 values as float32), or fp32."""
    base = torch.zeros_like(delta) if bias is None else torch.as_tensor(np.asarray(bias, dtype=np.float64))
    dtype = torch.float16 if precision == "fp16" else torch.float32
    stored = base.to(dtype).to(torch.float64)  # the package's bias as stored
    return (stored + delta.to(torch.float64)).to(dtype).to(torch.float32)


def weighted_kmeans(values: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal 1-D k-means of fp16 ``values`` minimising sum weights * (v - c)^2: (LUT of k fp16 values, int64
    indices). The distinct values carry their summed weights into the same exact dynamic programme coremltools
    uses unweighted (:func:`.optimal1d.cluster`); each value then takes its nearest fp16 entry (ties: lower)."""
    distinct, inverse, _ = fp16_unique(values)
    w = np.bincount(inverse, weights=weights.reshape(-1).astype(np.float64), minlength=len(distinct))
    w = w + 1e-12 * max(float(w.max()), 1e-30)  # a weight whose input is always zero still counts, barely
    _, centroids = cluster(distinct.astype(np.float64), w, k)
    lut = np.sort(np.concatenate([centroids, np.full(k - len(centroids), centroids[-1])]))
    lut16 = lut.astype(np.float16).astype(np.float64)
    edges = (lut16[1:] + lut16[:-1]) / 2
    idx = np.searchsorted(edges, values.astype(np.float64).reshape(-1), side="left")
    return lut16.astype(np.float16), idx.astype(np.int64)


def aware_palettize(spec: PalettizeSpec, w16: torch.Tensor, op_type: str, stats: LayerStats,
                    centred: bool = False) -> Palettized | str:
    """``palettize`` with the k-means weighted by each weight's E[x^2] (Var[x] when ``centred``, for use with
    bias correction); groups and /pcs laid out as coremltools does."""
    axis = channel_axis(op_type)
    shape = tuple(w16.shape)
    channels = shape[axis]
    group = spec.group_size or channels
    if channels % group:
        return f"group size {group} does not divide the {channels} output channels"
    imp = importance(w16, stats, centred)
    pcs = None
    if spec.per_channel_scale:
        pcs = per_channel_scale(w16, axis)
        w16 = h(w16 / pcs)
        imp = imp * pcs.to(torch.float64) ** 2  # the error of w/s costs s^2 times more
    ws = w16.transpose(0, axis).contiguous().cpu().numpy()
    iw = imp.transpose(0, axis).contiguous().cpu().numpy()
    luts, idxs = [], []
    for g in range(channels // group):
        lut, idx = weighted_kmeans(ws[g * group:(g + 1) * group], iw[g * group:(g + 1) * group], 1 << spec.nbits)
        luts.append(torch.from_numpy(lut.astype(np.float32))[:, None])
        idxs.append(torch.from_numpy(idx))
    return Palettized(torch.stack(luts).to(w16.device), torch.stack(idxs).to(w16.device), shape, axis, 1, pcs)


@register_handler(CompensatedSpec)
def simulate_compensated(spec: CompensatedSpec, w16: torch.Tensor, op_type: str, kmeans: str) -> SimResult:
    stats = _stats_for(spec, w16)
    if spec.calibrated_lut:
        found = aware_palettize(spec.base, w16, op_type, stats, centred=spec.bias_correction)
        if spec.error_feedback and not isinstance(found, str):
            found = gptq_palettize(spec.base, w16, op_type, stats, spec.bias_correction, found)
        if isinstance(found, str):
            return skipped(w16, found, spec)
        result = SimResult(found.dense(), {**found.params(), "aware_groups": _group_table(found, spec.base, w16,
                                                                                         op_type)})
    else:
        result = handler_for(spec.base)(spec.base, w16, op_type, kmeans)
        if result.skipped:
            return result
        result = SimResult(result.weight, dict(result.params))
    if spec.bias_correction:
        result.params["bias_delta"] = bias_delta(w16, result.weight, stats)
    return result


def _group_table(found: Palettized, spec: PalettizeSpec, w16: torch.Tensor, op_type: str) -> dict[bytes, tuple]:
    """{fp16 bytes of a group as coremltools hands it to lut_function: (lut, uint8 indices)}."""
    values = w16 if found.pcs is None else h(w16 / found.pcs)
    swapped = values.transpose(0, found.axis).contiguous().cpu().numpy().astype(np.float16)
    groups = found.lut.shape[0]
    per = swapped.shape[0] // groups
    return {swapped[g * per:(g + 1) * per].tobytes(): (found.lut[g, :, 0].cpu().numpy().astype(np.float16),
                                                       found.indices[g].cpu().numpy().astype(np.uint8))
            for g in range(groups)}


def aware_lut_function(tables: list[dict[bytes, tuple]]):
    """A coremltools ``lut_function`` returning, for each group it is handed, the LUT the simulation chose."""
    merged: dict[bytes, tuple] = {}
    for table in tables:
        for key, (lut, idx) in table.items():
            if key in merged and not (np.array_equal(merged[key][0], lut) and np.array_equal(merged[key][1], idx)):
                raise SpecError("activation-aware LUT", "two weights hold a group of identical values that their "
                                "input statistics palettize differently; coremltools hands lut_function the values "
                                "only", "use +aw on one of them only")
            merged[key] = (lut, idx)

    def lut_function(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = np.ascontiguousarray(values).astype(np.float16).tobytes()
        try:
            lut, idx = merged[key]
        except KeyError:
            raise SpecError("activation-aware LUT", f"coremltools asked for a group of shape {values.shape} the "
                            "simulation did not palettize", "report this as a bug") from None
        return lut.astype(values.dtype), idx

    return lut_function


@_tensors.register
def _(spec: CompensatedSpec, ctx) -> list:
    """Same stored weight tensors as the base spec (biases are not counted as weights)."""
    return _tensors(spec.base, ctx)

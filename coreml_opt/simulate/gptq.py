"""GPTQ error feedback for scalar LUTs (``+gptq``), from each layer's input second moment.

Indices are chosen column by column (input position by input position); each column's rounding error is
spread over the columns not chosen yet through the Cholesky factor of the inverse input Hessian, with lazy
block updates: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023), Algorithm 1. The nearest level is an entry of the row's LUT instead of a grid point,
and each LUT is then refit by least squares on the chosen indices, as in van Baalen et al., "GPTVQ: The
Blessing of Dimensionality for LLM Quantization" (2024), the codebook update. The objective per output row o
is (q_o - w_o)^T H (q_o - w_o), with H = E[x x^T] of the layer's im2col patch (:mod:`.calibration`), or
Cov[x] under ``+bc``, whose bias takes the mean shift. The LUTs start from the activation-aware k-means
(``+aw``); assign/refit rounds run a fixed number of times and the best of all candidates by that objective
is kept, so ``+gptq`` never does worse than ``+aw`` on it. Columns go in GPTQ's act-order (decreasing
H diagonal) where one Hessian serves every row: on EfficientNet-Lite0 it cut the objective 10-20 % on 1x1
convs and 6x on the classifier. Damping is 10 % of the mean diagonal, not GPTQ's 1 %: the Hessian comes from
the plan data only, and on held-out photos (the 11 largest layers at pal4/g8 and pal3/g8, rest int8+bc) 10 %
gave KL 0.018 / 0.053 against 0.022 / 0.054 at 1 %, 0.019 / 0.064 at 30 %, 0.023 / 0.086 at 100 %.
Everything is float64 in a fixed order. Changing the algorithm changes the values a sweep stored: bump its
entry in ``sensitivity.store.ALGORITHM_VERSIONS``.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..spec import PalettizeSpec, channel_axis
from .calibration import LayerStats
from .numerics import h
from .palettize import Palettized

ROUNDS = 2  # assign, refit; assign, refit; then a last assign on the final LUTs
DAMP = 0.1  # dampening: 10 % of the mean diagonal of H is added to it (GPTQ uses 1 %; see below)
BLOCK = 128  # columns per lazy update (GPTQ's B)
ACT_ORDER = True  # GPTQ's "act-order": columns by decreasing H diagonal (one conv group only)


def input_hessians(stats: LayerStats, centred: bool) -> torch.Tensor:
    """(G, D, D) float64: E[x x^T] of each conv group's im2col patch, or Cov[x] when ``centred``."""
    gram = stats.patch_gram
    if gram is None:
        raise SpecError("+gptq", "needs each layer's input second moments, and these statistics were collected "
                        "without them", "collect them with collect_statistics(model, batches, second_moments=True)")
    if not centred:
        return gram
    mean = stats.patch_mean.reshape(gram.shape[0], -1)
    return gram - mean[:, :, None] * mean[:, None, :]


def _upper_inverse_factor(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1 per group (GPTQ's U); more damping where H is not definite."""
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype)
    diag = hessian.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(0)
    damp = torch.where(diag > 0, DAMP * diag, torch.ones_like(diag))[:, None, None]
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if not bool((info != 0).any()):
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True)
        damp = damp * 10
    raise SpecError("+gptq", "the layer's input Hessian stays singular after damping", "use +aw instead")


def _assign(weight: torch.Tensor, upper: torch.Tensor, lut_rows: torch.Tensor) -> torch.Tensor:
    """GPTQ's column loop: (Gc, R, D) values, (Gc, D, D) factors, (Gc, R, k) each row's LUT → (Gc, R, D) indices."""
    work = weight.clone()
    groups, rows, columns = work.shape
    indices = torch.empty(groups, rows, columns, dtype=torch.int64)
    for start in range(0, columns, BLOCK):
        stop = min(columns, start + BLOCK)
        block = work[:, :, start:stop].clone()
        errors = torch.zeros_like(block)
        for j in range(stop - start):
            column = block[:, :, j]
            nearest = (column[..., None] - lut_rows).abs().argmin(-1)
            chosen = lut_rows.gather(-1, nearest[..., None])[..., 0]
            indices[:, :, start + j] = nearest
            error = (column - chosen) / upper[:, start + j, start + j][:, None]
            block[:, :, j:] -= error[..., None] * upper[:, None, start + j, start + j:stop]
            errors[:, :, j] = error
        if stop < columns:
            work[:, :, stop:] -= torch.einsum("grj,gjc->grc", errors, upper[:, start:stop, stop:])
    return indices


def _refit(weight: torch.Tensor, hessian: torch.Tensor, indices: torch.Tensor, luts: torch.Tensor,
           group: int) -> torch.Tensor:
    """Least-squares LUTs for fixed indices: per LUT group, argmin_c sum_o (c[idx_o] - w_o)^T H (c[idx_o] - w_o);
    (Glut, k) fp16 values (an entry no weight uses, or a non-finite solution, keeps its old value)."""
    rows_total, columns = weight.shape
    per_conv_group = rows_total // hessian.shape[0]
    k = luts.shape[1]
    new = luts.clone()
    for g in range(luts.shape[0]):
        system = torch.zeros(k, k, dtype=torch.float64)
        target = torch.zeros(k, dtype=torch.float64)
        for lo in range(g * group, (g + 1) * group, 128):
            hi = min((g + 1) * group, lo + 128)
            onehot = torch.nn.functional.one_hot(indices[lo:hi], k).to(torch.float64)  # (r, D, k)
            conv_groups = torch.arange(lo, hi) // per_conv_group
            if hessian.shape[0] == 1:
                weighted = torch.einsum("rda,de->rae", onehot, hessian[0])  # E^T H, (r, k, D)
            else:
                weighted = torch.einsum("rda,rde->rae", onehot, hessian[conv_groups])
            system += torch.einsum("rae,reb->ab", weighted, onehot)
            target += torch.einsum("rae,re->a", weighted, weight[lo:hi])
        reg = 1e-9 * float(system.diagonal().abs().max().clamp_min(1e-30))
        solved = torch.linalg.solve(system + reg * torch.eye(k, dtype=torch.float64), target + reg * luts[g])
        solved = h(solved).to(torch.float64)
        new[g] = torch.where(torch.isfinite(solved), solved, luts[g])
    return new


def _objective(weight: torch.Tensor, hessian: torch.Tensor, chosen: torch.Tensor) -> float:
    """sum over rows of (q - w)^T H (q - w), rows grouped by conv group: (Gc, R, D) inputs."""
    diff = chosen - weight
    return float(torch.einsum("grd,gde,gre->", diff, hessian, diff))


def gptq_palettize(spec: PalettizeSpec, w16: torch.Tensor, op_type: str, stats: LayerStats, centred: bool,
                   start: Palettized) -> Palettized | str:
    """Palettize fp16 ``w16`` (conv/linear, output channels on axis 0) with GPTQ error feedback, starting from the
    activation-aware palettization ``start`` (same groups and /pcs); coremltools' layout of LUTs and indices."""
    axis = channel_axis(op_type)
    if axis != 0:
        return f"GPTQ error feedback needs output channels on axis 0 (op {op_type})"
    shape = tuple(w16.shape)
    rows = shape[0]
    hessian = input_hessians(stats, centred)
    conv_groups, columns = hessian.shape[0], hessian.shape[-1]
    if rows % conv_groups or columns * rows != w16.numel():
        raise SpecError("+gptq", f"statistics of shape {tuple(hessian.shape)} do not fit the weight {shape}",
                        "collect statistics on the model the package was converted from")
    values = w16 if start.pcs is None else h(w16 / start.pcs)
    weight = values.reshape(rows, columns).to(torch.float64)
    if start.pcs is not None:  # q = s * c: the error of the LUT value costs s_i s_j in H
        scale = start.pcs.reshape(-1).to(torch.float64)
        hessian = hessian * scale[None, :, None] * scale[None, None, :]
    luts = start.lut[:, :, 0].to(torch.float64)
    group = rows // luts.shape[0]
    per = rows // conv_groups
    order = None
    if ACT_ORDER and conv_groups == 1:
        order = torch.argsort(-hessian[0].diagonal(), stable=True)
        weight, hessian = weight[:, order], hessian[:, order][:, :, order]
    upper = _upper_inverse_factor(hessian)
    grouped_weight = weight.reshape(conv_groups, per, columns)

    def dense(lut: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return lut.repeat_interleave(group, 0).gather(1, idx.reshape(rows, columns)).reshape(conv_groups, per, columns)

    best_lut, best_idx = luts, start.indices.reshape(rows, columns)
    if order is not None:
        best_idx = best_idx[:, order]
    best = _objective(grouped_weight, hessian, dense(best_lut, best_idx))
    for round_ in range(ROUNDS + 1):
        lut_rows = luts.repeat_interleave(group, 0).reshape(conv_groups, per, -1)
        idx = _assign(grouped_weight, upper, lut_rows).reshape(rows, columns)
        cost = _objective(grouped_weight, hessian, dense(luts, idx))
        if cost < best:
            best, best_lut, best_idx = cost, luts, idx
        if round_ < ROUNDS:
            luts = _refit(weight, hessian, idx, luts, group)
    if order is not None:
        best_idx = best_idx[:, torch.argsort(order)]
    lut = best_lut.to(torch.float32)[:, :, None]
    return Palettized(lut, best_idx.reshape(luts.shape[0], -1).contiguous(), shape, axis, 1, start.pcs)

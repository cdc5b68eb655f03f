"""Palettization exactly as ``palettize_weights`` emits it (kmeans, uniform, unique; groups; pcs; vectors).

Mirrors ``grouped_channelwise_compress``: the output-channel axis is swapped to the front, the
tensor split into groups of ``group_size`` channels, each group palettized on its own in C order
(vectors of ``cluster_dim`` consecutive channels). Per-channel scale divides by ``max |w|`` over
the channel axis itself (one scale per input position, not per channel) in fp16 before, and
multiplies after (``constexpr_blockwise_shift_scale``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SpecError
from ..spec import PalettizeSpec, channel_axis
from .core import SimResult, register_handler, skipped
from .kmeans import exact_group, kmeans_scalar_fast, kmeans_vector_fast
from .numerics import h, h64, nbits_for_count, numpy_dtype


@dataclass
class Palettized:
    """A palette per group and indices, plus what is needed to lay the weight back out."""

    lut: torch.Tensor  # (groups, 2**nbits, cluster_dim), fp16 values
    indices: torch.Tensor  # (groups, vectors per group), int64
    shape: tuple[int, ...]
    axis: int
    cluster_dim: int
    pcs: torch.Tensor | None = None  # per-channel scale, keepdim over the channel axis

    def dense(self, lut: torch.Tensor | None = None) -> torch.Tensor:
        """Decompressed weight (``constexpr_lut_to_dense`` then the pcs multiply), from ``lut``."""
        lut = self.lut if lut is None else lut
        groups, k, cd = lut.shape
        picked = torch.gather(lut, 1, self.indices[..., None].expand(-1, -1, cd))  # (G, nv, cd)
        swapped = list(self.shape)
        swapped[0], swapped[self.axis] = swapped[self.axis], swapped[0]
        rest = swapped[1:]
        per_group = swapped[0] // groups
        out = picked.reshape(groups, per_group // cd, *rest, cd).movedim(-1, 2)
        out = out.reshape(swapped).transpose(0, self.axis)
        if self.pcs is not None:
            out = h(out * self.pcs)
        return out.contiguous()

    def params(self) -> dict[str, torch.Tensor]:
        out = {"lut": self.lut, "indices": self.indices}
        if self.pcs is not None:
            out["scale"] = self.pcs
        return out


def _group_vectors(ws: torch.Tensor, groups: int, cd: int) -> torch.Tensor:
    """(groups, vectors, cd) in coremltools' order: group data in C order, vectors along channels."""
    per_group = ws.shape[0] // groups
    return ws.reshape(groups, per_group // cd, cd, *ws.shape[1:]).movedim(2, -1).reshape(groups, -1, cd)


def _unique(x: torch.Tensor, nbits: int | None) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Palette of the distinct values (sorted, zero padded) per group; None beyond 256 values."""
    groups, n, cd = x.shape
    if cd == 1:
        values, order = x[..., 0].sort(1)
        new = torch.ones_like(values, dtype=torch.bool)
        new[:, 1:] = values[:, 1:] != values[:, :-1]
        rank = new.to(torch.int64).cumsum(1) - 1
        distinct = int(rank[:, -1].max()) + 1
        nbits = nbits if nbits is not None else nbits_for_count(distinct)
        if nbits is None:
            return None
        lut = torch.zeros(groups, 1 << nbits, device=x.device).scatter_(1, rank, values)
        return lut[..., None], torch.empty_like(rank).scatter_(1, order, rank), nbits
    found = [torch.unique(x[g], dim=0, return_inverse=True) for g in range(groups)]  # rare mode
    nbits = nbits if nbits is not None else nbits_for_count(max(len(u) for u, _ in found))
    if nbits is None:
        return None
    lut = torch.zeros(groups, 1 << nbits, cd, device=x.device)
    for g, (u, _) in enumerate(found):
        lut[g, : len(u)] = u
    return lut, torch.stack([inv for _, inv in found]), nbits


def _uniform(x: torch.Tensor, nbits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """coremltools ``compress_uniform``: fp16 min/range, rounded positions, LUT built in float64."""
    levels = (1 << nbits) - 1
    vmin = x.amin(1, keepdim=True)
    span = h(x.amax(1, keepdim=True) - vmin)
    scale = h(span / levels)
    idx = torch.round(h(h(h(x - vmin) / span) * levels))
    idx = torch.nan_to_num(idx, nan=0.0).to(torch.int64)
    steps = torch.arange(1 << nbits, device=x.device, dtype=torch.float64)
    lut = h64(steps[None, :] * scale.to(torch.float64) + vmin.to(torch.float64))
    return lut, idx


def palettize(spec: PalettizeSpec, w16: torch.Tensor, op_type: str, kmeans: str) -> Palettized | str:
    """Palettize fp16 values ``w16``; returns the reason instead when coremltools would skip."""
    axis = channel_axis(op_type)
    shape = tuple(w16.shape)
    channels = shape[axis]
    group = spec.group_size or channels
    cd = spec.cluster_dim
    if spec.mode == "uniform" and cd > 1:
        raise SpecError(str(spec), "coremltools has no uniform vector palettization", "drop /vecN or /uniform")
    pcs = None
    if spec.per_channel_scale:
        pcs = per_channel_scale(w16, axis)
        w16 = h(w16 / pcs)
    if channels % group:
        return f"group size {group} does not divide the {channels} output channels"
    if group % cd:
        return f"cluster_dim {cd} does not divide the group of {group} channels"
    groups = channels // group
    ws = w16.transpose(0, axis).contiguous()
    x = _group_vectors(ws, groups, cd)
    if spec.mode == "unique":
        found = _unique(x, spec.nbits)
        if found is None:
            return "more than 256 distinct values"
        lut, idx, _ = found
    elif spec.mode == "uniform":
        lut, idx = _uniform(x[..., 0], spec.nbits)
        lut = lut[..., None]
    elif kmeans == "fast":
        if cd == 1:
            lut, idx = kmeans_scalar_fast(x[..., 0], 1 << spec.nbits)
            lut = lut[..., None]
        else:
            lut, idx = kmeans_vector_fast(x, 1 << spec.nbits)
    else:
        luts, idxs = [], []
        for g in range(groups):
            part = ws[g * group:(g + 1) * group].cpu().numpy().astype(numpy_dtype())
            lut_g, idx_g = exact_group(part, spec.nbits, cd)
            luts.append(torch.from_numpy(lut_g.astype(np.float32).reshape(-1, cd)))
            idxs.append(torch.from_numpy(idx_g.reshape(-1)))
        lut, idx = torch.stack(luts).to(w16.device), torch.stack(idxs).to(w16.device)
    return Palettized(lut, idx, shape, axis, cd, pcs)


def per_channel_scale(w16: torch.Tensor, axis: int) -> torch.Tensor:
    """coremltools' pcs: ``max |w|`` reduced over the channel axis (keepdims), zeros replaced by 1."""
    pcs = w16.abs().amax(dim=axis, keepdim=True)
    return torch.where(pcs == 0, torch.ones_like(pcs), pcs)


@register_handler(PalettizeSpec)
def simulate_palettize(spec: PalettizeSpec, w16: torch.Tensor, op_type: str, kmeans: str) -> SimResult:
    result = palettize(spec, w16, op_type, kmeans)
    if isinstance(result, str):
        out = skipped(w16, result, spec)
        if spec.per_channel_scale:
            # coremltools divides the const in place before it decides to skip: the bug ships.
            out.weight = h(w16 / per_channel_scale(w16, channel_axis(op_type)))
            out.skipped += "; the weight is left divided by its per-channel scale (coremltools bug)"
        return out
    return SimResult(result.dense(), result.params())

"""Pruning exactly as ``prune_weights`` emits it (magnitude, block, n:m, threshold).

coremltools works on the fp16 const, so thresholds are fp16: ``np.percentile`` of an fp16
array computes its index in fp16 (see :func:`numerics.numpy_percentile_fp16`; above 65,519
values it returns NaN and *nothing is pruned*), block magnitudes are fp16 sums of fp16 squares
accumulated in order, and a threshold-pruner threshold is rounded to fp16 before comparing.
For an fp32 const (``compute_precision=FLOAT32``) the same steps run in float32.
"""
from __future__ import annotations

import logging

import torch

from ..spec import PruneSpec, ThresholdPruneSpec, readers
from .core import SimResult, register_handler, skipped
from .numerics import h, numpy_percentile, working_scalar

logger = logging.getLogger(__name__)

BLOCK_DIM = 0  # OpMagnitudePrunerConfig's default dim with block_size
NM_DIM = 1  # ... and with n_m_ratio


def _percentile_prune(w16: torch.Tensor, magnitude: torch.Tensor, target_sparsity: float) -> torch.Tensor:
    q = target_sparsity * 100
    if q == 100:
        return torch.zeros_like(w16)
    if q == 0:
        return w16.clone()
    threshold = numpy_percentile(magnitude, q)
    if threshold != threshold:  # NaN: numpy's fp16 index overflowed, nothing compares <= NaN
        logger.warning("coremltools prunes nothing from a weight of %d values: np.percentile of its fp16 "
                       "magnitudes overflows to NaN above 65,519 values", magnitude.numel())
        return w16
    return torch.where(magnitude <= threshold, torch.zeros_like(w16), w16)


def _block_magnitude(w16: torch.Tensor, block: int) -> torch.Tensor:
    """L2 norm of each block of ``block`` channels along dim 0, in fp16, repeated over the block."""
    x = w16.abs().transpose(0, BLOCK_DIM)
    channels = x.shape[0]
    pad = (-channels) % block
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    blocks = x.reshape(-1, block, *x.shape[1:])
    squares = h(blocks * blocks)
    total = squares[:, 0]
    for i in range(1, block):  # numpy reduces this axis one fp16 add at a time
        total = h(total + squares[:, i])
    norm = h(torch.sqrt(total))
    return norm.repeat_interleave(block, 0)[:channels].transpose(0, BLOCK_DIM)


def _n_m(w16: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    rank = w16.dim()
    perm = list(range(2, rank)) + [0, 1]
    if NM_DIM == 0:
        perm[-2], perm[-1] = 1, 0
    x = w16.permute(perm)
    begin = x.shape
    x = x.reshape(-1, x.shape[-1])
    channels = x.shape[-1]
    if m > channels / 2:
        return None
    pad = (-channels) % m
    if pad:
        x = torch.cat([x, x.new_zeros((x.shape[0], pad))], 1)
    padded = x.shape
    rows = x.reshape(-1, m)
    lowest = torch.argsort(rows.abs(), dim=-1, stable=True)[:, :n]  # numpy's small-row sort is stable
    drop = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, lowest, True)
    drop = drop.reshape(padded)[:, :channels].reshape(begin).permute([perm.index(i) for i in range(rank)])
    return torch.where(drop, torch.zeros_like(w16), w16)


def prune_values(spec: PruneSpec | ThresholdPruneSpec, w16: torch.Tensor, op_type: str) -> torch.Tensor | str:
    """The pruned fp16 weight (zeros where pruned), or the reason coremltools skips it."""
    if isinstance(spec, ThresholdPruneSpec):
        threshold = working_scalar(spec.threshold)
        pruned = torch.where(w16.abs() <= threshold, torch.zeros_like(w16), w16)
        sparsity = float((pruned == 0).sum()) / pruned.numel()
        if sparsity < spec.minimum_sparsity_percentile:
            return f"sparsity {sparsity:.3f} < minimum_sparsity_percentile {spec.minimum_sparsity_percentile}"
        return pruned
    if (spec.n_m or spec.block_size) and any(t not in ("conv", "linear") for t, _ in readers(op_type)):
        return f"block and n:m pruning apply to conv and linear weights, not {op_type}"
    if spec.n_m is not None:
        if w16.dim() not in (2, 3, 4, 5):
            return "n:m pruning needs a weight of rank 2 to 5"
        pruned = _n_m(w16, *spec.n_m)
        return "m > channel / 2" if pruned is None else pruned
    magnitude = w16.abs()
    if spec.block_size is not None:
        if spec.block_size > w16.shape[BLOCK_DIM] / 2:
            return f"block_size {spec.block_size} > half the {w16.shape[BLOCK_DIM]} output channels"
        magnitude = _block_magnitude(w16, spec.block_size)
    return _percentile_prune(w16, magnitude, spec.target_sparsity)


@register_handler(PruneSpec)
@register_handler(ThresholdPruneSpec)
def simulate_prune(spec: PruneSpec | ThresholdPruneSpec, w16: torch.Tensor, op_type: str, kmeans: str) -> SimResult:
    pruned = prune_values(spec, w16, op_type)
    if isinstance(pruned, str):
        return skipped(w16, pruned, spec)
    return SimResult(pruned, {"mask": pruned != 0})  # nonzero_data is weight[mask]

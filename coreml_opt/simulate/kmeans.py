"""k-means for palettization: coremltools' own routine (exact) and a batched optimal-quality one (fast).

Exact mode calls ``_get_kmeans_lookup_table_and_weight`` per group, as coremltools does: the
vendored optimal 1-D ``kmeans1d`` for fp16 groups of >= 10,000 values, else scikit-learn KMeans
(k-means++, n_init=1, tol=1e-2, random_state=0).

Fast mode clusters all groups at once. Scalars: a histogram over the fp16 values each group holds
(at most 65,536 distinct), prefix sums of counts and sums, then Lloyd iterations that cost
O(groups x k) each (a cluster is an interval of sorted values, its sum two prefix-sum lookups),
run to a fixed point from quantile seeds. Vectors: batched k-means++ seeding then Lloyd.
Indices are the nearest fp16 palette entry, so the emitted weight is the best for its palette.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..determinism import single_threaded
from . import optimal1d, sklearn_kmeans
from .numerics import h

MAX_LLOYD_ITERS = 500
KMEANS1D_MIN_VALUES = 10_000  # coremltools' switch from scikit-learn to the optimal kmeans1d


def exact_group(values: np.ndarray, nbits: int, cluster_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """coremltools' k-means on one group (fp16, channel axis first): (lut fp16, indices).

    The same dispatch as coremltools: fp16 scalar groups of >= 10,000 values get the optimal 1-D
    k-means, from our compiled copy when it is built and the values are finite; other scalar groups
    get scikit-learn's k-means, from its replica where that is verified; the rest coremltools' own."""
    kmeans1d = cluster_dim == 1 and values.size >= KMEANS1D_MIN_VALUES and values.dtype == np.float16
    if kmeans1d and optimal1d.native() is not None and np.isfinite(values).all():
        # As coremltools: optimal clusters of the distinct values weighted by their counts.
        distinct, inverse, counts = optimal1d.fp16_unique(values)
        lut = np.zeros(1 << nbits)
        clusters, centroids = optimal1d.cluster(distinct, counts, min(len(distinct), 1 << nbits))
        lut[:len(centroids)] = centroids
        return lut.astype(values.dtype), clusters[inverse.reshape(-1)]
    if not kmeans1d and cluster_dim == 1 and values.dtype != np.float32 and np.isfinite(values).all() \
            and sklearn_kmeans.available():
        # As coremltools: scikit-learn's KMeans, here its bit-identical replica (under one BLAS thread too).
        n_clusters = min(values.size, 1 << nbits)
        with single_threaded():
            centers, labels = sklearn_kmeans.kmeans_1d_like_sklearn(values.reshape(-1), n_clusters)
        lut = np.zeros((1 << nbits, 1))
        lut[:n_clusters, 0] = centers
        return lut.astype(values.dtype), labels.astype(np.int64)
    from coremltools.models.neural_network.quantization_utils import (
        _get_kmeans_lookup_table_and_weight,
    )

    with single_threaded():  # as compress() runs it: palettes independent of the core count
        lut, indices = _get_kmeans_lookup_table_and_weight(nbits, values, force_kmeans1d=False,
                                                           cluster_dim=cluster_dim, vector_axis=0)
    return lut.astype(values.dtype), np.asarray(indices).astype(np.int64)


def _ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """fp16 values -> int32 keys with the same order (bit trick on the sign-magnitude pattern)."""
    bits = x.to(torch.float16).view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFF, bits)


def _key_values(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys < 0, keys ^ 0x7FFF, keys).to(torch.int16)
    return bits.view(torch.float16).to(torch.float64)


def _seeds(counts: torch.Tensor, cum_n: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """Seed sets per group (seeds, groups, k): quantiles of the values, of the distinct values, of
    the Panter-Dite density p^(1/3) (the high-resolution optimum), and a uniform grid."""
    groups, span = counts.shape
    q = (torch.arange(k, device=counts.device, dtype=torch.float64) + 0.5) / k

    def at_quantiles(cum: torch.Tensor) -> torch.Tensor:
        targets = (q[None, :] * cum[:, -1:]).contiguous()
        bins = torch.searchsorted(cum[:, 1:].contiguous(), targets, right=False)
        return values[bins.clamp(max=span - 1)]

    zero = torch.zeros(groups, 1, dtype=torch.float64, device=counts.device)
    width = torch.cat([values[1:] - values[:-1], values[-1:] - values[-2:-1] if span > 1 else values[:1] * 0 + 1])
    width = width.clamp(min=1e-12)
    density = (counts / width) ** (1.0 / 3.0) * width
    present = (counts > 0).to(torch.float64)
    lo = values[(counts > 0).to(torch.int8).argmax(1)]
    hi = values[span - 1 - (counts > 0).to(torch.int8).flip(1).argmax(1)]
    uniform = lo[:, None] + (hi - lo)[:, None] * q[None, :]
    return torch.stack([at_quantiles(cum_n), at_quantiles(torch.cat([zero, present.cumsum(1)], 1)),
                        at_quantiles(torch.cat([zero, density.cumsum(1)], 1)), uniform])


def _kmeanspp_seeds(counts: torch.Tensor, values: torch.Tensor, k: int, runs: int = 3) -> torch.Tensor:
    """Greedy k-means++ seeding on the histogram (as scikit-learn does, 2 + log k trials per step).

    The random draws are one fixed sequence shared by every group, so a group's seeds never
    depend on which other groups are in the batch. Returns (runs, groups, k).
    """
    groups, span = counts.shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    trials = 2 + int(math.log(k))
    cum = counts.cumsum(1)
    out = []
    for _ in range(runs):
        draws = torch.rand(k, trials, generator=gen, dtype=torch.float64).to(counts.device)
        first = torch.searchsorted(cum, (draws[0, 0] * cum[:, -1:]).contiguous()).clamp(max=span - 1)
        chosen = [values[first[:, 0]]]
        closest = counts * (values[None, :] - chosen[0][:, None]) ** 2
        for step in range(1, k):
            pot = closest.cumsum(1)
            targets = (draws[step][None, :] * pot[:, -1:]).contiguous()
            cand = values[torch.searchsorted(pot, targets).clamp(max=span - 1)]  # (groups, trials)
            dist = torch.minimum(closest[:, None, :], counts[:, None, :] * (values[None, None, :] - cand[..., None]) ** 2)
            best = dist.sum(2).argmin(1)
            chosen.append(cand.gather(1, best[:, None])[:, 0])
            closest = dist[torch.arange(groups, device=counts.device), best]
        out.append(torch.stack(chosen, 1))
    return torch.stack(out)


def _bounds(centroids: torch.Tensor, kmin: int, span: int) -> torch.Tensor:
    """Bin boundaries (groups, runs, k+1) of nearest-centroid cells: bins with value <= a midpoint
    go left. Works on fp16 keys directly (the bins are all fp16 values from kmin on)."""
    mids = (centroids[..., :-1] + centroids[..., 1:]) / 2
    near = mids.to(torch.float32).to(torch.float16)  # within one fp16 step of the midpoint
    keys = _ordered_keys(near) - (near.to(torch.float64) > mids).to(torch.int32)
    inner = (keys - kmin + 1).clamp(0, span).to(torch.int64)
    shape = (*centroids.shape[:-1], 1)
    return torch.cat([inner.new_zeros(shape), inner, inner.new_full(shape, span)], -1)


def _stats(cum: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Per-cell totals from a prefix sum (groups, span+1) and bounds (groups, runs, k+1)."""
    groups, runs, edges = bounds.shape
    at = cum.gather(1, bounds.reshape(groups, -1)).view(groups, runs, edges)
    return at[..., 1:] - at[..., :-1]


def _lloyd(centroids: torch.Tensor, kmin: int, span: int, cum_n: torch.Tensor, cum_s: torch.Tensor) -> torch.Tensor:
    """Lloyd iterations on interval cells (groups, runs, k) until no boundary moves in any run.

    A run whose boundaries repeat is at a fixed point and stays there, so a group's result never
    depends on when the other groups converge.
    """
    previous = None
    for _ in range(MAX_LLOYD_ITERS):
        centroids = centroids.sort(-1).values
        bounds = _bounds(centroids, kmin, span)
        if previous is not None and torch.equal(bounds, previous):
            break
        previous = bounds
        count = _stats(cum_n, bounds)
        centroids = torch.where(count > 0, _stats(cum_s, bounds) / count.clamp(min=1), centroids)
    return centroids


def _sse(centroids: torch.Tensor, kmin: int, span: int, cum_n, cum_s, cum_q) -> torch.Tensor:
    """Squared error of nearest-centroid assignment from prefix sums: (groups, runs)."""
    bounds = _bounds(centroids, kmin, span)
    n, s, q = (_stats(c, bounds) for c in (cum_n, cum_s, cum_q))
    return (q - 2 * centroids * s + centroids * centroids * n).sum(-1)


def kmeans_scalar_fast(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each row of ``x`` (groups, n) fp16 values into ``k`` levels: (lut (groups,k), indices).

    Lloyd runs from several seed sets at once and each group keeps its best; groups with at most
    ``k`` distinct values get exactly those. The result of a group never depends on the others.
    """
    groups, n = x.shape
    keys = _ordered_keys(x)
    kmin, kmax = int(keys.min()), int(keys.max())
    span = kmax - kmin + 1
    values = _key_values(torch.arange(kmin, kmax + 1, device=x.device, dtype=torch.int32))
    flat = (keys - kmin).to(torch.int64)
    flat += torch.arange(0, groups * span, span, device=x.device, dtype=torch.int64)[:, None]
    flat = flat.reshape(-1)
    del keys
    counts = torch.bincount(flat, minlength=groups * span).view(groups, span).to(torch.float64)
    zero = torch.zeros(groups, 1, dtype=torch.float64, device=x.device)
    cum_n = torch.cat([zero, counts.cumsum(1)], 1)
    cum_s = torch.cat([zero, (counts * values).cumsum(1)], 1)
    cum_q = torch.cat([zero, (counts * values * values).cumsum(1)], 1)

    seeds = _seeds(counts, cum_n, values, k)  # (runs, groups, k)
    if n < KMEANS1D_MIN_VALUES:  # a sparse histogram traps Lloyd: add k-means++ seeds
        seeds = torch.cat([seeds, _kmeanspp_seeds(counts, values, k)])
    centroids = _lloyd(seeds.transpose(0, 1).contiguous(), kmin, span, cum_n, cum_s)
    best = _sse(centroids, kmin, span, cum_n, cum_s, cum_q).argmin(1)
    centroids = centroids[torch.arange(groups, device=x.device), best]

    distinct = (counts > 0).sum(1)
    few = distinct <= k
    if bool(few.any()):
        order = torch.argsort((counts[few] <= 0).to(torch.int8), dim=1, stable=True)[:, :k]
        taken = values[order]
        last = taken.gather(1, (distinct[few] - 1).clamp(min=0)[:, None]).expand(-1, k)
        slot = torch.arange(k, device=x.device)[None, :] < distinct[few][:, None]
        centroids[few] = torch.where(slot, taken, last)
    lut = h(centroids.sort(1).values.to(torch.float32))
    # Nearest fp16 palette entry per bin (ties to the lower entry), then per element by its key.
    bounds = _bounds(lut.to(torch.float64)[:, None], kmin, span)[:, 0, 1:-1]
    marks = torch.zeros(groups, span + 1, dtype=torch.int64, device=x.device)
    marks.scatter_add_(1, bounds, torch.ones_like(bounds))
    bin_index = marks.cumsum(1)[:, :span]
    return lut, bin_index.reshape(-1)[flat].view(groups, n)


def kmeans_vector_fast(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster vectors ``x`` (groups, n, d) into ``k`` centroids per group: (lut (groups,k,d), indices)."""
    groups, n, d = x.shape
    x64 = x.to(torch.float64)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = torch.arange(groups, device=x.device)
    first = torch.randint(n, (groups,), generator=gen).to(x.device)
    centroids = [x64[rows, first]]
    closest = ((x64 - centroids[0][:, None]) ** 2).sum(-1)
    for _ in range(1, min(k, n)):  # k-means++ seeding, batched over groups
        weights = closest / closest.sum(1, keepdim=True).clamp(min=1e-300)
        weights = torch.where(closest.sum(1, keepdim=True) > 0, weights, torch.full_like(weights, 1.0 / n))
        pick = torch.multinomial(weights.cpu().to(torch.float32) + 1e-30, 1, generator=gen)[:, 0].to(x.device)
        centroids.append(x64[rows, pick])
        closest = torch.minimum(closest, ((x64 - centroids[-1][:, None]) ** 2).sum(-1))
    while len(centroids) < k:
        centroids.append(centroids[-1])
    c = torch.stack(centroids, 1)
    assign = None
    for _ in range(iters):
        new_assign = torch.cdist(x64, c).argmin(-1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(c).scatter_add_(1, assign[..., None].expand(-1, -1, d), x64)
        count = torch.zeros(groups, k, dtype=torch.float64, device=x.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=torch.float64))
        c = torch.where(count[..., None] > 0, sums / count.clamp(min=1)[..., None], c)
    lut = h(c.to(torch.float32))
    return lut, torch.cdist(x.to(torch.float64), lut.to(torch.float64)).argmin(-1)

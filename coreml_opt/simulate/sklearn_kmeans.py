"""A fast, bit-identical replica of coremltools' scikit-learn k-means on one scalar weight group.

coremltools palettizes groups of < 10,000 values with ``KMeans(k, init="k-means++", tol=1e-2,
n_init=1, random_state=0).fit(w)`` on the (n, 1) group. Single-threaded, scikit-learn 1.9 spends
almost all of its ~50-65 ms (n=8192, k=64) in Python overhead around small array calls. This
replica gives the same ``cluster_centers_`` bits and ``labels_`` about 6x faster: it performs the
same floating-point operations (float64 copy, tolerance from the raw variance, mean-centering,
k-means++ drawing from ``RandomState(0)``, Lloyd's gemm distances, summation orders, empty-cluster
relocation) but only where they can change the result. In one dimension a centre can only win
near it, so distances are evaluated exactly near the boundaries between centres and elsewhere a
bound on the rounding proves the winner; BLAS sums (the k-means++ potentials) are estimated with
error bounds and, when the bounds leave a choice open, made exact by the same numpy call on an
identically shaped array.

Use it only when ``available()`` (callers fall back to scikit-learn otherwise), for input
scikit-learn computes in float64 (float16, float64; not float32), and under one BLAS thread like
the scikit-learn call it replaces.
"""
from __future__ import annotations

import bisect
import functools
import threading
from typing import Any

import numpy as np

from .numerics import fp16_order_keys

#: scikit-learn (major, minor) versions whose KMeans this replica was verified against bit for bit.
SUPPORTED: tuple[tuple[int, int], ...] = ((1, 9),)

_MAX_ITER = 300  # KMeans' default max_iter
_TOL = 1e-2  # coremltools' tol
_U = 2.0 ** -53  # unit roundoff of float64
#: Scale the rounding-error bounds below: of the k-means++ potential kept as an interval
#: (``_POT_SLACK``) and of everything else. Wider bounds only cost time (more exact fallbacks);
#: tests raise them to drive every step through those fallbacks.
_ROUNDING_SLACK = 1.0
_POT_SLACK = 1.0
_LOCAL = threading.local()


def _version_tuple(text: str) -> tuple[int, int] | None:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def _sklearn_version() -> tuple[int, int] | None:
    """Installed scikit-learn (major, minor), read from its metadata: importing it costs seconds."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return _version_tuple(version("scikit-learn"))
    except PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _gemm_rounds_product_first() -> bool:
    """Lloyd's distances come from scipy's dgemm (alpha=-2, beta=1 onto the centre norms, one
    feature): check that this BLAS gives ``||c||^2 + (-2) * (x * c)``, products rounded first."""
    try:
        from scipy.linalg import blas
    except ImportError:
        return False
    rng = np.random.RandomState(12345)
    x = rng.standard_normal(300)
    c = rng.standard_normal(7) * 3.0
    norms = c * c
    prefilled = np.asfortranarray(np.broadcast_to(norms[:, None], (c.size, x.size)))
    out = blas.dgemm(-2.0, np.asfortranarray(c[None, :]), np.asfortranarray(x[None, :]),
                     beta=1.0, c=prefilled, trans_a=1, trans_b=0)
    return bool(np.array_equal(out, norms[:, None] + (-2.0 * (c[:, None] * x[None, :]))))


@functools.lru_cache(maxsize=1)
def _torch_cumsum() -> Any:
    """torch's CPU cumsum, a plain left-to-right double loop like numpy's but ~2.5x faster, when
    it gives numpy's bits here (else None: numpy's)."""
    try:
        import torch
    except ImportError:
        return None
    values = np.abs(np.random.RandomState(7).standard_normal(1000)) * np.logspace(-9, 3, 1000)
    out = np.empty_like(values)
    torch.cumsum(torch.from_numpy(values), 0, out=torch.from_numpy(out))
    return torch if np.array_equal(out, np.cumsum(values)) else None


def available() -> bool:
    """True when the installed scikit-learn's KMeans is one this replica reproduces bit for bit."""
    return _sklearn_version() in SUPPORTED and _gemm_rounds_product_first()


def kmeans_1d_like_sklearn(values: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """``KMeans(n_clusters, init="k-means++", tol=1e-2, n_init=1, random_state=0).fit(values)``.

    ``values``: 1-D or (n, 1), any real dtype scikit-learn converts to float64 (float16 as
    coremltools passes it, float64, integers). Returns ``(cluster_centers_[:, 0], labels_)``:
    float64 (n_clusters,) and int32 (n,), bit for bit scikit-learn's under one BLAS thread.
    """
    arr = np.asarray(values)
    if arr.ndim > 2 or (arr.ndim == 2 and arr.shape[1] != 1):
        raise ValueError(f"expected a 1-D or (n, 1) array, got shape {arr.shape}")
    if arr.dtype == np.float32:
        raise TypeError("scikit-learn clusters float32 input in float32; this replica is float64")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"expected a real numeric array, got {arr.dtype}")
    X = arr.reshape(-1, 1).astype(np.float64)  # validate_data: a C-ordered float64 copy
    n = X.shape[0]
    k = int(n_clusters)
    if k < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if n < k:
        raise ValueError(f"n_samples={n} should be >= n_clusters={k}.")
    if not np.isfinite(X).all():
        raise ValueError("Input contains NaN or infinity.")

    tol = np.mean(np.var(X, axis=0)) * _TOL  # _tolerance, on the data before centering
    X_mean = X.mean(axis=0)
    X -= X_mean
    x = X[:, 0]
    x_sq = np.einsum("ij,ij->i", X, X)  # row_norms(X, squared=True)
    order = _argsort(arr.reshape(-1), x)
    x_sorted = x[order]

    random_state = getattr(_LOCAL, "random_state", None)
    if random_state is None:
        random_state = _LOCAL.random_state = np.random.RandomState()
    random_state.seed(0)  # check_random_state(0), without RandomState(0)'s construction cost

    centers = _kmeans_plusplus(x, x_sq, order, x_sorted, k, random_state)
    centers, labels = _lloyd(x, order, x_sorted, centers, tol)
    return centers + X_mean, labels


def _argsort(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """An order that sorts ``x`` (ties in any order): for float16 input, a radix sort of the
    order-preserving integer keys (x is the input minus a constant, hence in the same order)."""
    if raw.dtype == np.float16:
        return np.argsort(fp16_order_keys(raw), kind="stable")
    return np.argsort(x)


def _kmeans_plusplus(x: np.ndarray, x_sq: np.ndarray, order: np.ndarray, x_sorted: np.ndarray,
                     k: int, random_state: np.random.RandomState) -> np.ndarray:
    """sklearn.cluster._kmeans._kmeans_plusplus with unit sample weights.

    Each step scikit-learn builds the candidates' rows ``min(closest, d_v)``, sums them with one
    BLAS product ``rows @ 1`` and keeps the first least. Here a candidate ``v`` lowers ``closest``
    only between the midpoints to its chosen neighbours (a span of the sorted values, widened by
    a rounding bound; elsewhere ``min(closest, d_v) == closest``), and the drop there is a sum of
    terms linear in x: prefix sums of the sorted values estimate every candidate's potential in
    O(1), within a bound on all the roundings involved. Only candidates within twice that bound
    of the best estimate can win; when there are several, their rows are built exactly in their
    buffer rows and summed by the same ``(m, n) @ (n, 1)`` product (a row's sum does not depend on
    the other rows). The winner's potential only scales the next step's draws, so it is kept as an
    interval and made exact (the same product) only when the interval leaves a draw undecided.
    """
    n = x.shape[0]
    sample_weight = np.ones(n)
    sw_col = sample_weight.reshape(-1, 1)
    n_local_trials = 2 + int(np.log(k))
    scale = float(max(-x_sorted[0], x_sorted[-1]))
    # a squared distance's rounding error is below 3u (|c| + |x|)^2 <= 12u S^2; both, with room
    margin = 64.0 * _U * scale * scale * _ROUNDING_SLACK
    # a BLAS sum of n non-negative values is within (n - 1)u of the exact sum (any order); room
    gamma = min(2.0 * n * _U * _ROUNDING_SLACK, 0.25)
    pot_gamma = min(gamma * _POT_SLACK, 0.25)
    # |estimated - exact drop|: the rounded distances (16u S^2 each), the prefix sums of up to n
    # values of up to S times up to 4S (8 n^2 u S^2), the region's ends; with room
    drop_slack = (32.0 * n * n + 256.0 * n) * _U * scale * scale * _ROUNDING_SLACK
    inf = float("inf")

    # random_state.choice(n, p=sample_weight / sample_weight.sum()), minus its argument checks:
    # the legacy RandomState stream, frozen by numpy, draws one double against the normalized cdf
    cdf = (sample_weight / sample_weight.sum()).cumsum()
    cdf /= cdf[-1]
    center_id = int(cdf.searchsorted(random_state.random_sample(), side="right"))
    centers = np.empty(k, dtype=np.float64)
    v0 = float(x[center_id])
    centers[0] = v0
    # _euclidean_distances(centers[0, None], X, Y_norm_squared=x_sq, squared=True); -2 * (c @ X.T)
    # is one product per element, and scaling by -2 commutes with its rounding
    closest = (-2.0 * v0) * x
    closest += v0 * v0
    closest += x_sq
    np.maximum(closest, 0.0, out=closest)
    pot: float | None = float((closest[None, :] @ sample_weight)[0])  # as scikit-learn: exact
    if k == 1:
        return centers
    sum_lo = pot / (1.0 + pot_gamma)  # bounds on the exact sum of ``closest``
    sum_hi = pot / (1.0 - pot_gamma)
    pot_row = 0  # the row of ``rows`` whose BLAS sum gave the last winner's potential

    closest_sorted = closest[order]
    x_sq_sorted = x_sq[order]
    prefix = np.zeros(n + 1)
    np.cumsum(x_sorted, out=prefix[1:])
    rows = np.zeros((n_local_trials, n))  # distance_to_candidates; unused rows keep stale values
    cumsum = np.empty(n)
    torch = _torch_cumsum()
    if torch is not None:  # views sharing the arrays' memory
        closest_t, cumsum_t = torch.from_numpy(closest), torch.from_numpy(cumsum)
    # the draws of every step at once: the same stream as one uniform(size=n_local_trials) a step
    uniform = random_state.uniform(size=(k - 1, n_local_trials))
    pot_range = np.empty((2, 1))
    m = n_local_trials
    chosen = [v0]  # the chosen centre values, ascending
    for c in range(1, k):
        # np.cumsum(sample_weight * closest): sequential sums of the same values
        if torch is None:
            np.cumsum(closest, out=cumsum)
        else:
            torch.cumsum(closest_t, 0, out=cumsum_t)
        if pot is None:  # the draws are ``uniform * pot`` for a pot within these bounds
            pot_range[0, 0] = sum_lo * (1.0 - pot_gamma)
            pot_range[1, 0] = sum_hi * (1.0 + pot_gamma)
            ids = cumsum.searchsorted(uniform[c - 1] * pot_range).tolist()
            if ids[0] == ids[1]:
                candidate_ids = ids[0]
            else:  # the exact BLAS sum of ``closest`` in the row where scikit-learn sums it
                rows[pot_row] = closest
                pot = float((rows @ sw_col)[pot_row, 0])
                sum_lo = pot / (1.0 + pot_gamma)
                sum_hi = pot / (1.0 - pot_gamma)
        if pot is not None:
            candidate_ids = cumsum.searchsorted(uniform[c - 1] * pot).tolist()
        cand = x[np.minimum(candidate_ids, n - 1)].tolist()  # np.clip(ids, None, n - 1)

        # per candidate: its chosen neighbours; the midpoints to them (lo, hi) and between them
        # (mid); the span to patch (lo and hi widened by a rounding bound)
        n_chosen = len(chosen)
        lefts: list[float] = []
        rights: list[float] = []
        keys: list[float] = []
        for v in cand:
            p = bisect.bisect_left(chosen, v)
            right = chosen[p] if p < n_chosen else inf
            left = chosen[p - 1] if p else -inf
            if right == v:  # a chosen value: the same distances as that centre, nothing changes
                left = right = v
            lefts.append(left)
            rights.append(right)
            lo = (left + v) * 0.5 if left > -inf else -inf
            hi = (v + right) * 0.5 if right < inf else inf
            mid = inf if right == inf else (-inf if left == -inf else (left + right) * 0.5)
            keys += (lo, mid, hi, lo - margin / (v - left) if left < v else lo,
                     hi + margin / (right - v) if right > v else hi)
        pos = x_sorted.searchsorted(keys).tolist()
        sums = prefix[pos].tolist()

        # each candidate's drop of the potential: sum over its region of (x - old)^2 - (x - v)^2
        drops = []
        for j, v in enumerate(cand):
            left, right = lefts[j], rights[j]
            drop = 0.0
            if left != v:
                i = 5 * j
                if left > -inf:  # lo to mid: nearest ``left`` so far
                    drop += 2.0 * (v - left) * (sums[i + 1] - sums[i]) \
                        - (pos[i + 1] - pos[i]) * (v * v - left * left)
                if right < inf:  # mid to hi: nearest ``right``
                    drop += 2.0 * (v - right) * (sums[i + 2] - sums[i + 1]) \
                        - (pos[i + 2] - pos[i + 1]) * (v * v - right * right)
            drops.append(drop)
        # estimates differ from the BLAS potentials by < gamma * pot + drop_slack each
        threshold = max(drops) - 2.0 * (gamma * sum_hi + drop_slack)
        contenders = [j for j in range(m) if drops[j] >= threshold]

        patches = {}
        for j in contenders:
            v = cand[j]
            a, b = pos[5 * j + 3], pos[5 * j + 4]
            if lefts[j] == v or b <= a:
                continue
            d = x_sorted[a:b] * (-2.0 * v)
            d += v * v
            d += x_sq_sorted[a:b]
            np.maximum(d, 0.0, out=d)
            np.minimum(closest_sorted[a:b], d, out=d)  # argument order as scikit-learn
            patches[j] = d

        if len(contenders) == 1:
            best = contenders[0]
            pot = None
        else:  # near-equal estimates: the exact potentials, as scikit-learn sums them
            for j in contenders:
                rows[j] = closest
                if j in patches:
                    a = pos[5 * j + 3]
                    rows[j, order[a:a + patches[j].shape[0]]] = patches[j]
            pots = (rows @ sw_col).ravel().tolist()
            best = contenders[0]
            for j in contenders[1:]:
                if pots[j] < pots[best]:  # np.argmin: the first of the least
                    best = j
            pot = pots[best]
        pot_row = best
        value = cand[best]
        centers[c] = value
        if lefts[best] != value:
            bisect.insort(chosen, value)
        if best in patches:
            d = patches[best]
            a, b = pos[5 * best + 3], pos[5 * best + 4]
            drop = float(np.subtract(closest_sorted[a:b], d).sum())
            drop_err = 4.0 * (b - a + 2) * _U * drop * _ROUNDING_SLACK
            sum_lo -= drop + drop_err
            sum_hi -= drop - drop_err
            closest[order[a:b]] = d
            closest_sorted[a:b] = d
        if pot is not None:
            sum_lo = pot / (1.0 + pot_gamma)
            sum_hi = pot / (1.0 - pot_gamma)
    return centers


def _assign(x: np.ndarray, order: np.ndarray, x_sorted: np.ndarray,
            centers: np.ndarray) -> np.ndarray:
    """Lloyd's E-step: the first index of the least ``||c||^2 + (-2) * (x * c)`` (scikit-learn's
    per-chunk gemm, alpha=-2 onto the centre norms, then a strict less-than scan).

    In sorted order every point gets the distinct centre value nearest to it (the lowest index
    holding it: equal values give equal distances). That is the exact answer for points farther
    than a rounding bound from the midpoints between neighbouring values: there the neighbour's
    distance is strictly larger, and by convexity so is every centre's beyond it. The points
    within the bound are evaluated against all centres as scikit-learn does.
    """
    n = x.shape[0]
    k = centers.shape[0]
    by_value = np.argsort(centers, kind="stable")
    sorted_c = centers[by_value]
    first = np.empty(k, dtype=bool)
    first[0] = True
    np.not_equal(sorted_c[1:], sorted_c[:-1], out=first[1:])
    uniq = sorted_c[first]  # the distinct centre values, ascending
    rep = by_value[first].astype(np.int32)  # the lowest index holding each (stable sort)
    if uniq.shape[0] == 1:
        return np.full(n, rep[0], dtype=np.int32)

    cmax = float(max(-uniq[0], uniq[-1]))
    xmax = float(max(-x_sorted[0], x_sorted[-1]))
    bound = 4.0 * _U * (cmax * cmax + 2.0 * cmax * xmax)  # > |rounded - exact| of any distance
    gap = uniq[1:] - uniq[:-1]
    mid = (uniq[1:] + uniq[:-1]) * 0.5
    # the nearer neighbour is certain beyond bound / gap of the midpoint (and its rounding)
    width = 8.0 * _ROUNDING_SLACK * bound / gap
    cells = np.empty(uniq.shape[0] + 1, dtype=np.intp)  # each value's points, in sorted order
    cells[0], cells[-1] = 0, n
    cells[1:-1] = x_sorted.searchsorted(mid)
    labels_sorted = np.repeat(rep, cells[1:] - cells[:-1])
    start = x_sorted.searchsorted(mid - width, side="left")
    lengths = x_sorted.searchsorted(mid + width, side="right") - start
    total = int(lengths.sum())
    if total:
        if total <= n:  # the points near a midpoint (one near two is evaluated twice, alike)
            offsets = np.repeat(start - (np.cumsum(lengths) - lengths), lengths)
            near = np.arange(total) + offsets
        else:  # wide spans (centres closer than the rounding allows to separate): their union
            depth = np.zeros(n + 1, dtype=np.intp)
            np.add.at(depth, start, 1)
            np.add.at(depth, start + lengths, -1)
            near = np.flatnonzero(np.cumsum(depth[:n]))
        dist = (centers * centers)[None, :] + (-2.0 * centers)[None, :] * x_sorted[near, None]
        labels_sorted[near] = np.argmin(dist, axis=1)
    labels = np.empty(n, dtype=np.int32)
    labels[order] = labels_sorted
    return labels


def _lloyd(x: np.ndarray, order: np.ndarray, x_sorted: np.ndarray, centers: np.ndarray,
           tol: float) -> tuple[np.ndarray, np.ndarray]:
    """sklearn.cluster._kmeans._kmeans_single_lloyd, one thread, unit sample weights."""
    n = x.shape[0]
    k = centers.shape[0]
    labels_old = np.full(n, -1, dtype=np.int32)
    strict_convergence = False
    for _ in range(_MAX_ITER):
        labels = _assign(x, order, x_sorted, centers)
        # sums in sample order, as the single thread-local buffer accumulates them
        weight_in_clusters = np.bincount(labels, minlength=k).astype(np.float64)
        sums = np.bincount(labels, weights=x, minlength=k)
        if weight_in_clusters.all():
            centers_new = sums * (1.0 / weight_in_clusters)  # _average_centers
        else:
            centers_new = _relocate_and_average(x, centers, sums, weight_in_clusters, labels)
        diff = centers_new - centers
        center_shift = np.sqrt(diff * diff)  # _center_shift, one feature
        centers = centers_new
        if np.array_equal(labels, labels_old):
            strict_convergence = True
            break
        if (center_shift ** 2).sum() <= tol:
            break
        labels_old = labels
    if not strict_convergence:
        labels = _assign(x, order, x_sorted, centers)  # so that the labels match the centres
    return centers, labels


def _relocate_and_average(x: np.ndarray, centers_old: np.ndarray, sums: np.ndarray,
                          weight_in_clusters: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """_relocate_empty_clusters_dense then _average_centers, statement for statement."""
    centers_new = sums.copy()
    weights = weight_in_clusters.copy()
    empty_clusters = np.where(np.equal(weights, 0))[0].astype(np.int32)
    n_empty = empty_clusters.shape[0]
    distances = ((x[:, None] - centers_old[:, None][labels]) ** 2).sum(axis=1)
    far_from_centers = np.argpartition(distances, -n_empty)[:-n_empty - 1:-1].astype(np.int32)
    if np.max(distances) != 0:
        for idx in range(n_empty):
            new_cluster_id = int(empty_clusters[idx])
            far_idx = int(far_from_centers[idx])
            old_cluster_id = int(labels[far_idx])
            value = x[far_idx] * 1.0  # X[far_idx, k] * weight
            centers_new[old_cluster_id] -= value
            centers_new[new_cluster_id] = value
            weights[new_cluster_id] = 1.0
            weights[old_cluster_id] -= 1.0
    argmax_weight = int(np.argmax(weights))
    for j in range(centers_new.shape[0]):
        if weights[j] > 0:
            centers_new[j] *= 1.0 / weights[j]
        else:  # at the biggest cluster, as it stands at this point of the loop
            centers_new[j] = centers_new[argmax_weight]
    return centers_new

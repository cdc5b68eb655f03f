"""coremltools' optimal 1-D k-means (fp16 groups of >= 10,000 values), from our compiled copy.

coremltools clusters a group's distinct values, weighted by their counts, with the kmeans1d package
it vendors. ``_kmeans1d.c`` takes the same decisions with the same roundings, bit for bit (the tests
compare the two), 10-20 times faster. Where the extension was not built (no C compiler at install),
the vendored routine runs instead: the same palettes, slower.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from typing import Callable, Optional

import numpy as np

logger = logging.getLogger(__name__)

_DOUBLES = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
_INT64S = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")


@functools.lru_cache(maxsize=None)
def native() -> Optional[Callable[..., int]]:
    """The compiled routine, or None when the extension is missing."""
    try:
        from . import _kmeans1d
    except ImportError as exc:
        logger.info("compiled 1-D k-means not built (%s); using coremltools' kmeans1d (same palettes, slower)", exc)
        return None
    routine = ctypes.CDLL(_kmeans1d.__file__).kmeans1d_weighted
    routine.argtypes = [_DOUBLES, _DOUBLES, ctypes.c_size_t, ctypes.c_size_t, _INT64S, _DOUBLES]
    routine.restype = ctypes.c_int
    return routine


def cluster(values: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal partition of strictly increasing ``values`` (with ``weights``) into ``min(k, n)`` clusters:
    (cluster per value int64, centroids float64), as ``kmeans1d.cluster(values, k, weights=weights)``."""
    x = np.ascontiguousarray(values, dtype=np.float64)
    w = np.ascontiguousarray(weights, dtype=np.float64)
    n = len(x)
    k = min(int(k), n)
    routine = native()
    if routine is None or n == 0 or k < 1 or not (np.all(np.diff(x) > 0) and np.isfinite(x).all()):
        from coremltools._deps import _kmeans1d

        found = _kmeans1d.cluster(x, k, weights=w)
        return np.asarray(found.clusters, dtype=np.int64), np.asarray(found.centroids, dtype=np.float64)
    clusters = np.empty(n, dtype=np.int64)
    centroids = np.empty(k, dtype=np.float64)
    if routine(x, w, n, k, clusters, centroids) != 0:
        raise MemoryError(f"1-D k-means of {n} values into {k} clusters ran out of memory")
    return clusters, centroids

"""coremltools' optimal 1-D k-means (fp16 groups of >= 10,000 values), from our compiled copy.

coremltools clusters a group's distinct values, weighted by their counts, with the kmeans1d package
it vendors. ``_kmeans1d.c`` takes the same decisions with the same roundings, bit for bit (the tests
compare the two), 10-20 times faster. Its dynamic programme adds one cluster per level and a level
does not depend on how many clusters are asked for, so the table for pal6 also answers pal4 and
pal2: tables are kept (bounded by bytes) and extended when more clusters are asked for. Where the
extension was not built (no C compiler at install), the vendored routine runs instead: the same
palettes, slower.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import threading
from collections import OrderedDict
from typing import Any, Optional

import numpy as np

from .numerics import fp16_from_order_keys, fp16_order_keys

logger = logging.getLogger(__name__)

MAX_TABLE_BYTES = 256 << 20

_DOUBLES = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
_INT64S = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
_UINT32S = np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS")


@functools.lru_cache(maxsize=None)
def native() -> Optional[Any]:
    """The compiled library (``kmeans1d_levels``, ``kmeans1d_backtrack``), or None when missing."""
    try:
        from . import _kmeans1d
    except ImportError as exc:
        logger.info("compiled 1-D k-means not built (%s); using coremltools' kmeans1d (same palettes, slower)", exc)
        return None
    lib = ctypes.CDLL(_kmeans1d.__file__)
    lib.kmeans1d_levels.argtypes = [_DOUBLES, _DOUBLES, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
                                    _DOUBLES, _UINT32S]
    lib.kmeans1d_backtrack.argtypes = [_DOUBLES, _DOUBLES, ctypes.c_size_t, ctypes.c_size_t, _UINT32S, _INT64S,
                                       _DOUBLES]
    lib.kmeans1d_levels.restype = lib.kmeans1d_backtrack.restype = ctypes.c_int
    return lib


class _Table:
    """The DP for one (values, weights): ``levels`` rows of where the last cluster starts, and the
    last level's costs (to extend it)."""

    def __init__(self, n: int) -> None:
        self.levels = 0
        self.start_of = np.zeros((0, n), dtype=np.uint32)
        self.row = np.zeros(n)

    @property
    def nbytes(self) -> int:
        return self.start_of.nbytes + self.row.nbytes


_tables: OrderedDict[str, _Table] = OrderedDict()
_tables_lock = threading.Lock()


def _table(lib: Any, x: np.ndarray, w: np.ndarray, k: int) -> _Table:
    """A table of at least ``k`` levels for (x, w), from the cache when there is one."""
    key = hashlib.blake2b(x.tobytes() + b"|" + w.tobytes(), digest_size=20).hexdigest()
    with _tables_lock:
        found = _tables.get(key)
        if found is not None and found.levels >= k:
            _tables.move_to_end(key)
            return found
    n = len(x)
    table = _Table(n)
    start_of = np.empty((k, n), dtype=np.uint32)
    if found is not None:  # extend a smaller one: its rows and last costs are where the DP stopped
        start_of[:found.levels] = found.start_of
        table.row[:] = found.row
    done = found.levels if found is not None else 0
    if lib.kmeans1d_levels(x, w, n, done, k, table.row, start_of) != 0:
        raise MemoryError(f"1-D k-means of {n} values into {k} clusters ran out of memory")
    table.start_of, table.levels = start_of, k
    with _tables_lock:
        kept = _tables.get(key)
        if kept is None or kept.levels < table.levels:  # a racing thread may have built a bigger one
            _tables[key] = table
        _tables.move_to_end(key)
        total = sum(t.nbytes for t in _tables.values())
        while total > MAX_TABLE_BYTES and len(_tables) > 1:
            total -= _tables.popitem(last=False)[1].nbytes
    return table


def clear_tables() -> None:
    """Forget every kept DP table (benchmarks that time the k-means itself)."""
    with _tables_lock:
        _tables.clear()


def fp16_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True, return_counts=True)`` for finite fp16 values, by
    counting the 65,536 bit patterns instead of sorting (fp16 sorts in software, ~10x slower).

    np.unique keeps one of -0.0 and +0.0 (whichever its sort puts first) when both occur: then it
    runs itself."""
    flat = np.ascontiguousarray(values, dtype=np.float16).reshape(-1)
    keys = fp16_order_keys(flat).astype(np.intp)
    counts = np.bincount(keys, minlength=1 << 16)
    if counts[0x7FFF] and counts[0x8000]:  # -0.0 and +0.0
        distinct, inverse, found = np.unique(flat, return_inverse=True, return_counts=True)
        return distinct, inverse.reshape(-1), found
    present = np.flatnonzero(counts)
    rank = np.cumsum(counts > 0) - 1
    return fp16_from_order_keys(present), rank[keys], counts[present]


def cluster(values: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal partition of strictly increasing ``values`` (with ``weights``) into ``min(k, n)`` clusters:
    (cluster per value int64, centroids float64), as ``kmeans1d.cluster(values, k, weights=weights)``."""
    x = np.ascontiguousarray(values, dtype=np.float64)
    w = np.ascontiguousarray(weights, dtype=np.float64)
    n = len(x)
    k = min(int(k), n)
    lib = native()
    if lib is None or n == 0 or k < 1 or not (np.all(np.diff(x) > 0) and np.isfinite(x).all()):
        from coremltools._deps import _kmeans1d

        found = _kmeans1d.cluster(x, k, weights=w)
        return np.asarray(found.clusters, dtype=np.int64), np.asarray(found.centroids, dtype=np.float64)
    table = _table(lib, x, w, k)
    clusters = np.empty(n, dtype=np.int64)
    centroids = np.empty(k, dtype=np.float64)
    if lib.kmeans1d_backtrack(x, w, n, k, table.start_of, clusters, centroids) != 0:
        raise MemoryError(f"1-D k-means of {n} values into {k} clusters ran out of memory")
    return clusters, centroids

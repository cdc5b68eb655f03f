"""Reproducible numerics: the same inputs give the same palettes on any machine."""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

_lock = threading.Lock()
_holders = 0
_limiter: Any = None


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS/OpenMP thread: scikit-learn's k-means (coremltools' palettes for groups under 10,000
    values) sums in a thread-count dependent order, so the same weights would get different palettes
    on machines with different core counts. Compression and its simulation both run under this.

    BLAS thread counts are process-wide, so that limit is shared: the first thread inside sets it and
    the last one out restores it (per-thread limits would restore each other's settings early).
    OpenMP's count is per thread, so each thread sets and restores its own."""
    global _holders, _limiter
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    with _lock:
        if _holders == 0:
            _limiter = threadpool_limits(limits=1, user_api="blas")
        _holders += 1
    try:
        with threadpool_limits(limits=1, user_api="openmp"):
            yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                _limiter.restore_original_limits()
                _limiter = None

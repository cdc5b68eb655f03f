"""Reproducible numerics: the same inputs give the same palettes on any machine."""
from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.Lock()
_holders = 0
_blas_limit: Any = None
_controller: Any = None
_modules_seen = -1


def _threadpools() -> Any:
    """threadpoolctl's view of the loaded BLAS/OpenMP libraries, rescanned only after new imports
    (a scan walks every loaded library, several ms; a limit on a known one costs microseconds)."""
    global _controller, _modules_seen
    with _lock:
        if _controller is None or len(sys.modules) != _modules_seen:
            from threadpoolctl import ThreadpoolController  # a scikit-learn dependency

            _modules_seen = len(sys.modules)
            _controller = ThreadpoolController()
        return _controller


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS/OpenMP thread: scikit-learn's k-means (coremltools' palettes for groups under 10,000
    values) sums in a thread-count dependent order, so the same weights would get different palettes
    on machines with different core counts. Compression and its simulation both run under this.

    BLAS thread counts are process-wide, so that limit is shared: the first thread inside sets it and
    the last one out restores it (per-thread limits would restore each other's settings early).
    OpenMP's count is per thread, so each thread sets and restores its own."""
    global _holders, _blas_limit
    pools = _threadpools()
    with _lock:
        if _holders == 0:
            _blas_limit = pools.select(user_api="blas").limit(limits=1)
        _holders += 1
    try:
        with pools.select(user_api="openmp").limit(limits=1):
            yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                _blas_limit.restore_original_limits()
                _blas_limit = None

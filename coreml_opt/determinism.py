"""Reproducible numerics: the same inputs give the same palettes on any machine."""
from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.Lock()
_blas_holders = 0
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
def blas_single_threaded() -> Iterator[None]:
    """One BLAS thread, process-wide, for as long as any holder is inside.

    OpenBLAS only takes the setting from the main thread (a worker thread's call leaves it as it
    was), so code that runs palettes on worker threads holds this on the main thread meanwhile.
    torch's own BLAS and OpenMP are not affected."""
    global _blas_holders, _blas_limit
    pools = _threadpools()
    with _lock:
        if _blas_holders == 0:
            _blas_limit = pools.select(user_api="blas").limit(limits=1)
        _blas_holders += 1
    try:
        yield
    finally:
        with _lock:
            _blas_holders -= 1
            if _blas_holders == 0:
                _blas_limit.restore_original_limits()
                _blas_limit = None


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS/OpenMP thread: scikit-learn's k-means (coremltools' palettes for groups under 10,000
    values) sums in a thread-count dependent order, so the same weights would get different palettes
    on machines with different core counts. Compression and its simulation both run under this.

    OpenMP's count is per thread, so each thread sets and restores its own; the BLAS limit is the
    shared one of :func:`blas_single_threaded` (on a worker thread, effective only while the main
    thread holds it too)."""
    with blas_single_threaded(), _threadpools().select(user_api="openmp").limit(limits=1):
        yield

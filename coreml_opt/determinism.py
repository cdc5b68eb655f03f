"""Reproducible numerics: the same inputs give the same palettes on any machine."""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS/OpenMP thread: scikit-learn's k-means (coremltools' palettes for groups under 10,000
    values) sums in a thread-count dependent order, so the same weights would get different palettes
    on machines with different core counts. Compression and its simulation both run under this."""
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    with threadpool_limits(limits=1):
        yield

"""single_threaded(): one BLAS/OpenMP thread for as long as any thread is inside, then restored."""
from __future__ import annotations

import threading
import time

import numpy  # noqa: F401  (loads the BLAS whose thread count is limited)
from threadpoolctl import threadpool_info

from coreml_opt.determinism import blas_single_threaded, single_threaded


def _threads() -> dict[str, int]:
    return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info()}


def test_workers_run_single_threaded_while_the_main_thread_holds_the_blas_limit():
    """As sweeps run palettes: workers inside single_threaded(), the main thread holding BLAS."""
    before = _threads()
    seen: list[dict[str, int]] = []

    def work(delay: float) -> None:
        time.sleep(delay)
        with single_threaded():
            for _ in range(6):
                seen.append(_threads())
                time.sleep(0.01)

    with blas_single_threaded():
        threads = [threading.Thread(target=work, args=(0.013 * i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert seen and all(n == 1 for snapshot in seen for n in snapshot.values())
    assert _threads() == before


def test_nesting_in_one_thread_restores_on_the_way_out():
    before = _threads()
    with single_threaded():
        with single_threaded():
            pass
        assert all(n == 1 for n in _threads().values())
    assert _threads() == before

"""Simulated weights for a sweep's trials, a chunk at a time on every core, ahead of evaluation."""
from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import Optional

import torch

from ..determinism import blas_single_threaded
from ..simulate import NonFiniteWeightError, SimCache
from ..spec import PalettizeSpec, Spec
from .layers import Layer


class ChunkSimulator:
    """Simulates trials' weights a chunk at a time on every core, before the chunk is evaluated.

    Simulation and evaluation take turns instead of overlapping: torch's intra-op threads and the
    k-means workers would fight over the same cores (measured: overlapping was slower than the two
    phases back to back). A layer's trials run on one worker, most clusters first, so pal4 and pal2
    reuse pal6's k-means table. Workers read the model's own fp16 weights, and only while no trial has
    one swapped (the sweep waits for a chunk before evaluating it), and fill the simulation cache, which ``apply_spec`` then hits: results
    are unchanged. A chunk holds at most ``max_trials`` trials and ``max_bytes`` of weights. Workers
    stop taking trials at ``deadline`` (a ``time.perf_counter()`` value) or once closed; a trial they
    skipped is simulated when the sweep waits for it."""

    def __init__(self, trials: list[tuple[Layer, Spec]], weights: dict[str, torch.Tensor], cache: SimCache,
                 kmeans: str, max_trials: int = 64, max_bytes: int = 256 << 20,
                 deadline: Optional[float] = None) -> None:
        self.trials, self.weights, self.cache, self.kmeans = trials, weights, cache, kmeans
        self.max_trials, self.max_bytes, self.deadline = max_trials, max_bytes, deadline
        self.stopped = False
        # Exact k-means (coremltools' own routines) dominates a trial; fast k-means runs on torch's threads.
        workers = min(torch.get_num_threads(), len(trials)) if kmeans == "exact" else 0
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="simulate") if workers > 1 else None
        # Palettes on worker threads need the process-wide BLAS limit set from this (the main) thread.
        self.blas_limit = contextlib.ExitStack()
        if self.pool is not None:
            self.blas_limit.enter_context(blas_single_threaded())
        self.errors: dict[int, Optional[BaseException]] = {}
        self.running: list[Future] = []
        self.lock = threading.Lock()
        self.cpu_seconds = 0.0  # spent simulating on the workers
        self.submitted = 0  # trials before this one are simulated or being simulated

    def _chunk(self, first: int) -> range:
        end, size = first, 0
        while end < len(self.trials) and end - first < self.max_trials:
            size += self.weights[self.trials[end][0].layer].numel() * 4
            if size > self.max_bytes and end > first:
                break
            end += 1
        return range(first, end)

    def _simulate(self, indices: list[int]) -> None:
        start = time.perf_counter()
        try:
            for j in indices:
                if self.stopped or (self.deadline is not None and time.perf_counter() >= self.deadline):
                    return
                self.errors[j] = self._one(j)
        finally:
            with self.lock:
                self.cpu_seconds += time.perf_counter() - start

    def _one(self, j: int) -> Optional[BaseException]:
        """Simulate trial ``j`` into the cache; its error, raised when the sweep reaches it, or None."""
        layer, spec = self.trials[j]
        try:
            self.cache.get(spec, self.weights[layer.layer], layer.op_type, self.kmeans, layer.precision)
        except NonFiniteWeightError as exc:
            return exc.named(repr(layer.layer))
        except BaseException as exc:
            return exc
        return None

    def start(self, i: int) -> None:
        """Start simulating the chunk that begins at trial ``i`` unless it is done or running."""
        if self.pool is None or i in self.errors or i < self.submitted or i >= len(self.trials):
            return
        by_layer: dict[str, list[int]] = {}
        chunk = self._chunk(i)
        for j in chunk:
            by_layer.setdefault(self.trials[j][0].layer, []).append(j)
        bundles = [sorted(js, key=lambda j: -_cost(*self.trials[j])) for js in by_layer.values()]
        bundles.sort(key=lambda js: -sum(_cost(*self.trials[j]) for j in js))  # longest first
        self.running = [self.pool.submit(self._simulate, js) for js in bundles]
        self.submitted = chunk.stop

    def wait(self, i: int) -> None:
        """Block until trial ``i``'s simulated weight is cached (raising its error, if any)."""
        if self.pool is None:
            return
        self.start(i)
        if i not in self.errors:
            wait_all(self.running)
        error = self.errors.pop(i) if i in self.errors else self._one(i)  # skipped: past the deadline
        if error is not None:
            raise error

    def close(self) -> None:
        """Stop the workers after their current trial and release the BLAS limit."""
        self.stopped = True
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.blas_limit.close()


def _cost(layer: Layer, spec: Spec) -> float:
    """Rough relative cost of simulating ``spec`` on ``layer``: k-means grows with the palette size."""
    clusters = max((1 << (part.nbits or 8) if isinstance(part, PalettizeSpec) else 1) for part in spec.parts)
    return layer.params * clusters

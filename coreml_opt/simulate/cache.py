"""Cache of simulated weights keyed by (content hash in the stored precision, spec, op type, k-means mode).

Repeated trials of the same (layer, spec) - sensitivity sweeps, planner validation - reuse the
compressed weight instead of re-running k-means. Bounded by total bytes, least recently used out.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

from ..spec import CompensatedSpec, Spec, parse_spec
from .calibration import Statistics, active_statistics, thread_statistics
from .core import SimResult, simulate

DEFAULT_MAX_BYTES = 2 << 30


def content_hash(weight: torch.Tensor, precision: str = "fp16") -> str:
    """Hash of the weight's values in ``precision`` (fp16 or fp32) and shape: what the simulation depends on."""
    dtype, bits = (torch.float16, torch.int16) if precision == "fp16" else (torch.float32, torch.int32)
    data = weight.detach().to(dtype).contiguous().cpu()
    digest = hashlib.blake2b(str(tuple(data.shape)).encode(), digest_size=20)
    digest.update(data.view(bits).numpy().tobytes())
    return digest.hexdigest()


class SimCache:
    """LRU of :class:`SimResult` by (hash, spec, op_type, kmeans); thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, statistics: Statistics | None = None) -> None:
        self.max_bytes = max_bytes
        self.statistics = statistics  # calibration statistics for compensated specs (else the active ones)
        self._items: OrderedDict[tuple, SimResult] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.peak_bytes = 0  # most simulated-weight bytes held at once

    def __len__(self) -> int:
        return len(self._items)

    def get(self, spec: Spec | str, weight: torch.Tensor, op_type: str, kmeans: str = "exact",
            precision: str = "fp16") -> SimResult:
        """The simulated result, computed once per distinct key (``precision``: the stored const's)."""
        spec = parse_spec(spec)
        stats = self.statistics if self.statistics is not None else active_statistics()
        key = (content_hash(weight, precision), str(spec), op_type, kmeans, str(weight.device), precision,
               stats.token if stats is not None and isinstance(spec, CompensatedSpec) else None)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return found
        with thread_statistics(stats):
            result = simulate(spec, weight, op_type, kmeans=kmeans, precision=precision)
        size = result.weight.numel() * result.weight.element_size()
        with self._lock:
            self.misses += 1
            if key not in self._items:
                self._items[key] = result
                self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.weight.numel() * old.weight.element_size()
            self.peak_bytes = max(self.peak_bytes, self._bytes)
        return result

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


_DEFAULT = SimCache()


def default_cache() -> SimCache:
    """The process-wide cache used by :func:`apply_plan` unless given another."""
    return _DEFAULT

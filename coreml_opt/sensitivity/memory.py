"""A sweep's memory budget (``--memory 8GB``): parse it, measure what the sweep holds, split the rest.

The budget bounds the process's peak resident memory (RSS). It is split, in this order, into what is
measured and cannot shrink, and what the sweep sizes to fit:

- fixed: the process's RSS when the sweep starts (interpreter, libraries, the caller's objects);
- model: the one BN-folded fp16 model the sweep holds (bytes of its parameters and buffers);
- data: evaluation inputs, fp32 reference outputs and the baseline outputs (tensor storage bytes);
- working: the peak RSS growth of one evaluation pass of the whole data (forwards plus the metric),
  measured around the baseline pass by resetting the kernel's peak-RSS mark (Linux ``clear_refs``);
- simulation: the simulated-weight cache and the k-means chunk, a few of the largest layer's weights;
- cache: the rest, for activations at each layer's cut; entries past it spill to disk (see suffix.py).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import DataError

logger = logging.getLogger(__name__)

SIMULATION_WEIGHTS = 4  # largest-layer weights the simulation share holds: a chunk ahead plus the one applied


def parse_memory(text: Union[str, int, float, None], name: str = "--memory") -> Optional[int]:
    """``8GB`` -> bytes (1024-based, like every size here; see ``planning.costs.parse_size``); None stays None.
    One-line DataError naming ``name`` and the value as given for anything that is not a positive size."""
    from ..errors import PlanError
    from ..planning.costs import parse_size

    if text is None:
        return None
    try:
        value = parse_size(text)
    except PlanError:
        value = None
    if value is None or value <= 0 or isinstance(text, bool):
        raise DataError(f"{name} {text!r}", "is not a positive memory size", "write e.g. 8GB, 1.5GiB or 512MB")
    return value


def tensor_bytes(value: Any, seen: Optional[set[int]] = None) -> int:
    """Bytes of the storages behind the tensors in ``value`` (tensors, tuples, lists, dicts), each storage once:
    a view keeps its whole storage alive, so storage bytes, not ``numel``, are what memory holds."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    return 0


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (shared ones once)."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


def rss_bytes(collect: bool = False) -> int:
    """This process's resident memory now (``/proc/self/statm``; the peak so far where /proc is absent);
    ``collect``: after a garbage collection and glibc's ``malloc_trim``, so unreachable cycles (an earlier
    sweep's) and freed heap pages are not counted."""
    if collect:
        gc.collect()
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (AttributeError, OSError):  # not glibc
            pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident memory since start or the last :func:`reset_peak` (VmHWM on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, process-wide: a caller's own reading restarts too) to the current
    RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryBudget:
    """A sweep's budget in bytes and its split (see the module docstring for how each share is measured)."""

    total: int
    fixed: int = 0
    model: int = 0
    data: int = 0
    working: int = 0
    simulation: int = 0

    @property
    def cache(self) -> int:
        """Bytes left for cached activations (0 when the measured shares already fill the budget)."""
        return max(0, self.total - self.fixed - self.model - self.data - self.working - self.simulation)

    def shares(self) -> dict[str, float]:
        """Every share in GiB, for logs and ``sweep.json``'s timing neighbour ``memory``."""
        gib = float(1 << 30)
        return {k: round(v / gib, 4) for k, v in (("budget", self.total), ("fixed", self.fixed),
                                                  ("model", self.model), ("data", self.data),
                                                  ("working", self.working), ("simulation", self.simulation),
                                                  ("cache", self.cache))}

    def check(self, label: str, given: str) -> None:
        """One-line DataError when the budget cannot hold the process, the model, the data and one evaluation."""
        need = self.fixed + self.model + self.data + self.working + self.simulation
        if need > self.total:
            gib = float(1 << 30)
            raise DataError(given, f"is below what sweeping {label} needs: {need / gib:.2f} GiB "
                            f"(process {self.fixed / gib:.2f}, model {self.model / gib:.2f}, data "
                            f"{self.data / gib:.2f}, one evaluation {self.working / gib:.2f}, simulation "
                            f"{self.simulation / gib:.2f} GiB)",
                            f"raise --memory above {need / gib:.2f} GiB, or use less data or a smaller --batch-size")

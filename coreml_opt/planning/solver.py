"""Exact multiple-choice knapsack: one option per layer, minimum predicted loss under a size budget or
minimum size under a loss budget, solved as an integer program (scipy ``milp``, HiGHS) with a gap of 0.

Sizes are exact integer bytes, so the capacity constraint is exact; ties on the objective are broken
by a second solve on the other quantity (see :func:`solve`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import PlanError

logger = logging.getLogger(__name__)

TIE_BREAK_SECONDS = 2.0
_SCALE = 1e6  # the largest |objective coefficient| after scaling; keeps HiGHS' 1e-6 absolute gap negligible


@dataclass(frozen=True)
class Option:
    """One choice for one layer: a spec, the bytes Core ML stores for it, and its predicted loss."""

    spec: str
    bytes: int
    drop: float


@dataclass(frozen=True)
class Choices:
    """A layer and every option it may take (fp16 included)."""

    layer: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Solution:
    """One option index per layer, with its totals (bytes exclude the problem's fixed bytes)."""

    picks: tuple[int, ...]
    bytes: int
    drop: float

    def specs(self, layers: Sequence[Choices]) -> dict[str, str]:
        return {c.layer: c.options[i].spec for c, i in zip(layers, self.picks)}


def totals(layers: Sequence[Choices], picks: Sequence[int]) -> tuple[int, float]:
    """Exact bytes and summed predicted loss of ``picks``."""
    return (sum(c.options[i].bytes for c, i in zip(layers, picks)),
            math.fsum(c.options[i].drop for c, i in zip(layers, picks)))


def pareto_options(options: Iterable[Option], keep_equal_loss: bool = False) -> list[int]:
    """Indices of options no other option beats on both bytes and loss (exact duplicates keep the first).

    ``keep_equal_loss`` keeps larger options whose loss equals a smaller one's, for the most-bytes tie-break."""
    indexed = sorted(enumerate(options), key=lambda t: (t[1].bytes, t[1].drop, t[0]))
    kept: list[int] = []
    best_drop = math.inf
    seen: set[tuple[int, float]] = set()
    for i, option in indexed:
        if option.drop < best_drop or (keep_equal_loss and option.drop == best_drop
                                       and (option.bytes, option.drop) not in seen):
            kept.append(i)
            best_drop = min(best_drop, option.drop)
            seen.add((option.bytes, option.drop))
    return kept


def smallest(layers: Sequence[Choices]) -> Solution:
    """The most compressed plan (least loss among equally small options)."""
    picks = tuple(min(range(len(c.options)), key=lambda i: (c.options[i].bytes, c.options[i].drop))
                  for c in layers)
    return Solution(picks, *totals(layers, picks))


def solve(layers: Sequence[Choices], *, max_bytes: int | None = None, max_drop: float | None = None,
          minimise: str = "drop", time_limit: float = 120.0) -> Solution | None:
    """Optimal picks under the budgets (bytes exclude fixed costs), or None when none is feasible.

    ``minimise="drop"``: least loss, ties to the most bytes; ``"bytes"``: fewest bytes, ties to least loss."""
    if minimise not in ("drop", "bytes"):
        raise ValueError(f"minimise must be 'drop' or 'bytes', not {minimise!r}")
    if not layers:
        return Solution((), 0, 0.0) if (max_bytes is None or max_bytes >= 0) and (max_drop is None or max_drop >= 0) \
            else None
    for c in layers:
        if not c.options:
            raise PlanError(f"layer {c.layer!r}", "has no options", "give every layer at least its fp16 option")
    # Dominated options can never be needed: drop them (exactness is unchanged, the program shrinks).
    kept = [pareto_options(c.options, keep_equal_loss=minimise == "drop") for c in layers]
    sub = [Choices(c.layer, tuple(c.options[i] for i in k)) for c, k in zip(layers, kept)]
    first = _milp(sub, minimise, max_bytes, max_drop, time_limit)
    if first is None:
        return None
    # Lexicographic tie-break, holding the optimum: under a size budget the most bytes among the
    # least-loss plans (equal predictions, so keep more bits: interactions grow with compression);
    # under a loss budget the least loss among the smallest plans.
    # The tie-break never risks the optimum: it gets a short time limit and its best plan so far.
    b, d = totals(sub, first)
    tie_limit = min(time_limit, TIE_BREAK_SECONDS)
    if minimise == "drop":
        second = _milp(sub, "-bytes", max_bytes, d + _tolerance(sub, d), tie_limit, early_ok=True)
        better = second is not None and totals(sub, second)[0] > b
    else:
        second = _milp(sub, "drop", b, max_drop, tie_limit, early_ok=True)
        better = second is not None and totals(sub, second)[1] < d
    best = second if better else first
    picks = tuple(k[i] for k, i in zip(kept, best))
    return Solution(picks, *totals(layers, picks))


def _tolerance(layers: Sequence[Choices], value: float) -> float:
    scale = max((abs(o.drop) for c in layers for o in c.options), default=1.0)
    return 1e-9 * max(scale, abs(value), 1e-12)


@contextlib.contextmanager
def c_stdout_silenced() -> Iterator[None]:
    """Point file descriptor 1 at /dev/null for the block, so C libraries (HiGHS) cannot write to stdout and
    break `plan --json`; Python's and C's buffers are flushed on both sides."""
    import ctypes

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _milp(layers: Sequence[Choices], minimise: str, max_bytes: int | None, max_drop: float | None,
          time_limit: float, early_ok: bool = False) -> tuple[int, ...] | None:
    """One HiGHS solve with binary x[layer, option]; returns option indices per layer or None."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    sizes = [len(c.options) for c in layers]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n = int(starts[-1])
    byte_row = np.array([o.bytes for c in layers for o in c.options], dtype=float)
    drop_row = np.array([o.drop for c in layers for o in c.options], dtype=float)
    # Solve on offsets from each layer's smallest value: same argmin, better-conditioned numbers.
    byte_base = np.concatenate([np.full(s, min(o.bytes for o in c.options)) for c, s in zip(layers, sizes)])
    drop_base = np.concatenate([np.full(s, min(o.drop for o in c.options)) for c, s in zip(layers, sizes)])
    byte_off, drop_off = byte_row - byte_base, drop_row - drop_base
    one_each = csr_array((np.ones(n), np.arange(n), starts), shape=(len(layers), n))
    constraints = [LinearConstraint(one_each, 1, 1)]
    if max_bytes is not None:
        room = math.floor(max_bytes) - sum(min(o.bytes for o in c.options) for c in layers)
        if room < 0:
            return None
        constraints.append(LinearConstraint(byte_off[None, :], -np.inf, room))
    if max_drop is not None:
        room_d = max_drop - math.fsum(min(o.drop for o in c.options) for c in layers)
        if room_d < -_tolerance(layers, max_drop):
            return None
        constraints.append(LinearConstraint(drop_off[None, :], -np.inf, max(room_d, 0.0) + _tolerance(layers, max_drop)))
    cost = {"drop": drop_off, "bytes": byte_off, "-bytes": -byte_off}[minimise]
    top = float(np.max(np.abs(cost))) if n else 0.0
    cost = cost * (_SCALE / top) if top > 0 else cost
    with c_stdout_silenced():  # HiGHS prints some MIP diagnostics from C even with disp off
        result = milp(cost, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints,
                      options={"disp": False, "mip_rel_gap": 0.0, "time_limit": time_limit, "presolve": True})
    if result.x is None:
        if result.status == 1 and not early_ok:
            raise PlanError("planner", f"the integer program hit its {time_limit:g} s time limit",
                            "give fewer candidates or layers, or a larger time limit")
        return None
    if result.status != 0 and not early_ok:
        logger.warning("milp stopped early (%s); using the best plan found", result.message)
    x = np.asarray(result.x)
    picks = tuple(int(np.argmax(x[starts[i]:starts[i + 1]])) for i in range(len(layers)))
    bytes_used, drop_used = totals(layers, picks)
    if max_bytes is not None and bytes_used > max_bytes:
        raise PlanError("planner", f"solver returned {bytes_used} bytes over the {max_bytes} budget",
                        "report this as a bug")
    return picks


def brute_force(layers: Sequence[Choices], *, max_bytes: int | None = None, max_drop: float | None = None,
                minimise: str = "drop") -> Solution | None:
    """Enumerate every plan (tests and tiny problems only): the optimum's objective value."""
    import itertools

    best: Solution | None = None
    for picks in itertools.product(*(range(len(c.options)) for c in layers)):
        b, d = totals(layers, picks)
        if (max_bytes is not None and b > max_bytes) or (max_drop is not None and d > max_drop + 1e-12):
            continue
        key = (d, -b) if minimise == "drop" else (b, d)
        if best is None or key < ((best.drop, -best.bytes) if minimise == "drop" else (best.bytes, best.drop)):
            best = Solution(tuple(picks), b, d)
    return best

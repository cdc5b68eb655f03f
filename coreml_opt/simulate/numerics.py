"""fp16 (and fp32) arithmetic as numpy performs it, in torch: the building blocks of coremltools-exact numerics.

coremltools runs its passes on the const in its stored precision. For an fp16 const numpy evaluates
every step in float16: each binary op is computed in float32 and rounded to float16 once (exact for
+, -, *, /, sqrt, since float32 has more than 2*11+2 bits). For an fp32 const (a package converted
with ``compute_precision=FLOAT32``) every step is plain float32. Tensors here are float32 holding
values of the working precision, which :func:`working_precision` sets (fp16 unless told).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import numpy as np
import torch

PRECISIONS = {"fp16": (torch.float16, np.float16), "fp32": (torch.float32, np.float32)}
_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("coreml_opt_precision", default="fp16")


@contextlib.contextmanager
def working_precision(precision: str) -> Iterator[None]:
    """Within the block, :func:`h` and friends round to ``precision`` ("fp16" or "fp32"): the
    precision of the const coremltools compresses. Context-local (threads start at fp16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
    token = _PRECISION.set(precision)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def numpy_dtype() -> type:
    """numpy's type for the working precision (what coremltools' numpy computes in)."""
    return PRECISIONS[_PRECISION.get()][1]


def h(x: torch.Tensor) -> torch.Tensor:
    """Round a float32 tensor to the working precision (fp16: nearest, ties to even), kept as float32."""
    if _PRECISION.get() == "fp16":
        return x.to(torch.float16).to(torch.float32)
    return x.to(torch.float32)


def h64(x: torch.Tensor) -> torch.Tensor:
    """Round a float64 tensor to the working precision once (as numpy's ``astype``), kept as float32."""
    return x.to(PRECISIONS[_PRECISION.get()][0]).to(torch.float32)


def to_working_values(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the package stores it (cast to the working precision), as float32."""
    return h(weight.detach().to(torch.float32))


def fp16_order_keys(values: np.ndarray) -> np.ndarray:
    """uint16 keys in the order of the fp16 ``values`` (-0.0 just below +0.0; NaN outside): sorting
    or counting the keys sorts or counts the values, without fp16 arithmetic (numpy's is software)."""
    bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)
    return np.where(bits & 0x8000, 0xFFFF - bits, bits | 0x8000).astype(np.uint16)


def fp16_from_order_keys(keys: np.ndarray) -> np.ndarray:
    """The fp16 values of :func:`fp16_order_keys` keys."""
    keys = np.asarray(keys)
    return np.where(keys & 0x8000, keys & 0x7FFF, 0xFFFF - keys).astype(np.uint16).view(np.float16)


def working_scalar(value: float) -> float:
    """A Python float as numpy compares it with an array of the working precision (NEP 50: weak)."""
    return float(numpy_dtype()(value))


def numpy_percentile(values: torch.Tensor, q_percent: float) -> float:
    """``np.percentile`` of working-precision ``values`` as coremltools' pruner computes it: the fp16
    replica without a full sort for fp16, numpy itself for fp32."""
    if _PRECISION.get() == "fp16":
        return numpy_percentile_fp16(kth_smallest_getter(values), values.numel(), q_percent)
    return float(np.percentile(values.detach().cpu().numpy().astype(np.float32).reshape(-1), q_percent))


def numpy_percentile_fp16(sorted_at, n: int, q_percent: float) -> float:
    """``np.percentile(fp16_array, q_percent)`` for an fp16 array of ``n`` values (numpy 2.x).

    numpy divides ``q`` by ``float16(100)`` and computes the virtual index ``(n - 1) * q`` in fp16,
    so it rounds coarsely and overflows to inf (result NaN) once ``n - 1`` exceeds 65,519.
    ``sorted_at(i)`` returns the i-th smallest value (``-1`` = the largest) as a float.
    """
    with np.errstate(all="ignore"):
        q = np.true_divide(np.asarray(q_percent), np.float16(100))  # python float is weak: fp16
        q = np.asarray(q, dtype=np.float16)
        virtual = np.asarray((n - 1) * q)  # (n - 1) becomes fp16 (inf above 65,519)
        previous = np.asarray(np.floor(virtual))
        nxt = np.asarray(previous + 1)
        if bool(virtual >= n - 1):
            previous = np.asarray(np.float16(-1))
            nxt = np.asarray(np.float16(-1))
        elif bool(virtual < 0):
            previous = np.asarray(np.float16(0))
            nxt = np.asarray(np.float16(0))
        if bool(np.isnan(virtual)):
            previous = np.asarray(np.float16(-1))
            nxt = np.asarray(np.float16(-1))
        if not bool(np.isfinite(virtual)):
            return float("nan")  # gamma is inf or NaN: numpy's lerp yields NaN whatever the values
        prev_i = previous.astype(np.intp)
        next_i = nxt.astype(np.intp)
        gamma = np.asarray(virtual - prev_i, dtype=np.float16)
        a = np.asarray(sorted_at(int(prev_i)), dtype=np.float16)
        b = np.asarray(sorted_at(int(next_i)), dtype=np.float16)
        diff = np.subtract(b, a)
        lerp = np.asarray(np.add(a, diff * gamma))
        if bool(gamma >= 0.5):
            lerp = np.asarray(np.subtract(b, diff * (1 - gamma)), dtype=np.float16)
    return float(lerp)


def kth_smallest_getter(values: torch.Tensor):
    """A ``sorted_at`` callback over a flat tensor, using kthvalue (no full sort)."""
    flat = values.reshape(-1)
    n = flat.numel()

    def sorted_at(i: int) -> float:
        k = n if i < 0 else min(i, n - 1) + 1
        return float(torch.kthvalue(flat, k).values)

    return sorted_at


def nbits_for_count(count: int, allowed: tuple[int, ...] = (1, 2, 3, 4, 6, 8)) -> int | None:
    """Smallest palette size in ``allowed`` holding ``count`` entries, or None."""
    for nbits in allowed:
        if count <= 1 << nbits:
            return nbits
    return None

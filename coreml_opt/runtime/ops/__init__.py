"""Op handlers by family; importing this package fills ``HANDLERS``."""
from __future__ import annotations

from . import (activation, attention, constexpr, conv, elementwise, linalg, norm, pool,  # noqa: F401
               reduce, resize, shape)
from .registry import HANDLERS, VARIADIC, Context, register

__all__ = ["HANDLERS", "VARIADIC", "Context", "register", "supported_ops"]


def supported_ops() -> list[str]:
    """Every op type the runtime can run, sorted."""
    return sorted(HANDLERS)

"""Deployment targets: parse user names into ``ct.target`` and order them.

Compression features need a minimum OS (see the table in coremltools-notes.md);
``target_rank`` gives one integer scale so checks are a plain comparison.
macOS13/14/15 are the same Core ML specification versions as iOS16/17/18.
coremltools is imported only where a ``ct.target`` is needed, so parsing specs and plans
(and `coreml-opt --help`) stays fast.
"""
from __future__ import annotations

import enum
from typing import Any, Union

from coreml_opt.errors import SpecError

# Canonical spelling -> rank on the iOS scale (the ct.target member has the same name).
_RANKS: dict[str, int] = {"iOS16": 16, "iOS17": 17, "iOS18": 18, "macOS13": 16, "macOS14": 17, "macOS15": 18}
_BY_LOWER = {name.lower(): name for name in _RANKS}
_IOS_BY_RANK = {rank: name for name, rank in _RANKS.items() if name.startswith("iOS")}

VALID_TARGETS: tuple[str, ...] = tuple(_RANKS)
DEFAULT_TARGET = "iOS18"

TargetLike = Union[str, Any]  # a name or a coremltools.target member


def _canonical(name: TargetLike, input_name: str = "target") -> str:
    """Return the canonical spelling of a target name or ``ct.target`` member."""
    if isinstance(name, enum.Enum):
        # ct.target aliases macOS members to the iOS ones: map by value through the iOS names.
        import coremltools as ct

        for ios_name in _IOS_BY_RANK.values():
            if getattr(ct.target, ios_name) == name:
                return ios_name
        raise SpecError(input_name, f"deployment target {name.name} is not supported",
                        f"use one of {', '.join(VALID_TARGETS)}")
    key = str(name).strip().lower()
    if key not in _BY_LOWER:
        raise SpecError(input_name, f"unknown deployment target {name!r}",
                        f"use one of {', '.join(VALID_TARGETS)}")
    return _BY_LOWER[key]


def parse_target(name: TargetLike):
    """Map a case-insensitive name such as ``"ios18"`` or ``"macOS14"`` to its ``ct.target``."""
    import coremltools as ct

    return getattr(ct.target, _canonical(name))


def target_name(t: TargetLike) -> str:
    """Canonical name of a target; macOS aliases come back as their iOS twin (``iOS18``)."""
    return _IOS_BY_RANK[target_rank(t)]


def target_rank(name: TargetLike) -> int:
    """Integer on the iOS scale (iOS16 -> 16, macOS13 -> 16, macOS15 -> 18) for comparisons."""
    return _RANKS[_canonical(name)]

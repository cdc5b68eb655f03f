"""Deployment targets: parse user names into ``ct.target`` and order them.

Compression features need a minimum OS (see the table in coremltools-notes.md);
``target_rank`` gives one integer scale so checks are a plain comparison.
macOS13/14/15 are the same Core ML specification versions as iOS16/17/18.
"""
from __future__ import annotations

from typing import Union

import coremltools as ct

from coreml_opt.errors import SpecError

# Canonical spelling -> (ct.target member, rank on the iOS scale).
_TARGETS: dict[str, tuple[ct.target, int]] = {
    "iOS16": (ct.target.iOS16, 16),
    "iOS17": (ct.target.iOS17, 17),
    "iOS18": (ct.target.iOS18, 18),
    "macOS13": (ct.target.macOS13, 16),
    "macOS14": (ct.target.macOS14, 17),
    "macOS15": (ct.target.macOS15, 18),
}
_BY_LOWER = {name.lower(): name for name in _TARGETS}
# ct.target aliases macOS members to the iOS ones, so the reverse map uses iOS names.
_NAME_BY_TARGET = {t: name for name, (t, _) in _TARGETS.items() if name.startswith("iOS")}

VALID_TARGETS: tuple[str, ...] = tuple(_TARGETS)
DEFAULT_TARGET = "iOS18"

TargetLike = Union[str, ct.target]


def _canonical(name: TargetLike, input_name: str = "target") -> str:
    """Return the canonical spelling of a target name or ``ct.target`` member."""
    if isinstance(name, ct.target):
        if name in _NAME_BY_TARGET:
            return _NAME_BY_TARGET[name]
        raise SpecError(input_name, f"deployment target {name.name} is not supported",
                        f"use one of {', '.join(VALID_TARGETS)}")
    key = str(name).strip().lower()
    if key not in _BY_LOWER:
        raise SpecError(input_name, f"unknown deployment target {name!r}",
                        f"use one of {', '.join(VALID_TARGETS)}")
    return _BY_LOWER[key]


def parse_target(name: TargetLike) -> ct.target:
    """Map a case-insensitive name such as ``"ios18"`` or ``"macOS14"`` to its ``ct.target``."""
    return _TARGETS[_canonical(name)][0]


def target_name(t: TargetLike) -> str:
    """Canonical name of a target; macOS aliases come back as their iOS twin (``iOS18``)."""
    return _NAME_BY_TARGET[parse_target(t)]


def target_rank(name: TargetLike) -> int:
    """Integer on the iOS scale (iOS16 -> 16, macOS13 -> 16, macOS15 -> 18) for comparisons."""
    return _TARGETS[_canonical(name)][1]

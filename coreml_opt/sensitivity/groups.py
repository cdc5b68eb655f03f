"""Layer groups: sweep and plan a model by groups of layers that take one spec together.

``role`` groups layers whose names differ only in numeric indices (``blocks.0.attn.q_proj.weight`` and
``blocks.1.attn.q_proj.weight`` -> ``blocks.*.attn.q_proj.weight``), ``block`` groups by the numbered block
prefix (``blocks.3.*``), ``layer`` is one layer a group; a mapping {group name: [glob patterns]} names groups
by hand (a pattern matches a layer's name, its module path or an alias). Per-role and per-block choices are
how LLM compression tools (NVIDIA ModelOpt, Apple's coreai-opt) keep sweeps of hundreds of layers short.

A group trial compresses every member that can take the spec at once and measures the metric once; a member
that cannot (a block size that does not divide its shape, ...) stays fp16, as a global spec leaves it in
``compress``. The store keys a group trial by the sorted names of the members it compressed, so a group whose
spec fits one member shares that member's per-layer row.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from ..errors import DataError
from ..simulate import SimCache
from ..spec import Spec
from ..storage import predicted_bytes
from .chunks import ChunkSimulator
from .layers import Layer
from .store import ResultStore

logger = logging.getLogger(__name__)

GROUP_MODES = ("role", "block", "layer")
# Default: per layer up to this many layers (768 trials with the 6-spec ladder), per role above it.
PER_LAYER_MAX = 128
GroupsArg = Union[str, Mapping[str, Union[str, Sequence[str]]], None]
SkipReason = Callable[[Layer, Spec, torch.Tensor, SimCache, str], Optional[str]]  # sweep._skip_reason
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")


@dataclass(frozen=True)
class Group:
    """Layers that take one spec together; shown wherever a sweep shows a layer (``layer`` is its name)."""

    layer: str  # the group's name, e.g. "blocks.*.attn.q.weight"
    members: tuple[Layer, ...]

    @property
    def op_type(self) -> str:
        return "+".join(dict.fromkeys(m.op_type for m in self.members))

    @property
    def params(self) -> int:
        return sum(m.params for m in self.members)

    @property
    def fp16_bytes(self) -> int:
        return sum(m.fp16_bytes for m in self.members)

    @property
    def paths(self) -> tuple[str, ...]:
        """Every parameter path holding a member's weight (tied aliases included)."""
        return tuple(p for m in self.members for p in (m.layer, *m.aliases))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.layer, "members": [m.layer for m in self.members], "op_type": self.op_type,
                "params": self.params, "fp16_bytes": self.fp16_bytes}


def role_name(name: str) -> str:
    """``blocks.3.attn.q.weight`` -> ``blocks.*.attn.q.weight``: every numeric path component becomes ``*``."""
    return _INDEX.sub("*", name)


def block_name(name: str) -> str:
    """``blocks.3.attn.q.weight`` -> ``blocks.3.*``: the path up to its first numeric component; else the name."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 1]) + ".*"
    return name


def resolve_groups(layers: Sequence[Layer], groups: GroupsArg, label: str = "groups") -> tuple[str, list[Group]]:
    """(mode, groups in model order) for ``groups`` (a mode word, a mapping of name -> glob patterns, or None).

    None is ``layer`` up to ``PER_LAYER_MAX`` layers and ``role`` above. Layers no pattern matches stay
    groups of one. DataError (one line) for an unknown word, a pattern matching no layer, or a layer two
    groups claim."""
    if groups is None:
        groups = "layer" if len(layers) <= PER_LAYER_MAX else "role"
        if groups == "role":
            logger.info("%d layers: sweeping by role (pass groups='layer' for a per-layer sweep)", len(layers))
    if isinstance(groups, str):
        word = groups.strip().lower()
        if word not in GROUP_MODES:
            raise DataError(f"{label} {groups!r}", f"is not one of {', '.join(GROUP_MODES)} or a mapping of group "
                            "names to layer-name patterns", "use --groups role, block or layer (in a sweep file, "
                            "also e.g. `groups: {q_proj: ['*.q_proj.weight']}`)")
        if word == "layer":
            return word, [Group(layer.layer, (layer,)) for layer in layers]
        key = role_name if word == "role" else block_name
        return word, _by_key(layers, lambda layer: key(layer.layer))
    if not isinstance(groups, Mapping) or not groups:
        raise DataError(f"{label} {groups!r}", "is neither a mode word nor a mapping of group names to patterns",
                        "use role, block or layer, or e.g. `groups: {q_proj: ['*.q_proj.weight']}`")
    return "custom", _by_patterns(layers, groups, label)


def _by_key(layers: Sequence[Layer], key: Callable[[Layer], str]) -> list[Group]:
    found: dict[str, list[Layer]] = {}
    for layer in layers:
        found.setdefault(key(layer), []).append(layer)
    return [Group(name if len(members) > 1 else members[0].layer, tuple(members)) for name, members in found.items()]


def _names(layer: Layer) -> tuple[str, ...]:
    """What a group pattern may match: the layer's name, its module path, and its aliases."""
    module = layer.layer.rpartition(".")[0]
    return (layer.layer, *([module] if module else []), *layer.aliases)


def _by_patterns(layers: Sequence[Layer], groups: Mapping[str, Any], label: str) -> list[Group]:
    owner: dict[str, str] = {}
    for name, patterns in groups.items():
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(name, str) or not name or not isinstance(patterns, (list, tuple)) or not patterns \
                or not all(isinstance(p, str) and p for p in patterns):
            raise DataError(f"{label}: {name!r}", f"must map a group name to a list of layer-name patterns, got "
                            f"{patterns!r}", f"write e.g. `{name or 'q_proj'}: ['blocks.*.attn.q_proj.weight']`")
        for pattern in patterns:
            matched = [layer for layer in layers if any(fnmatch.fnmatchcase(n, pattern) for n in _names(layer))]
            if not matched:
                raise DataError(f"{label}: {name}: pattern {pattern!r}", "matches no swept layer",
                                f"fix the pattern (layers are named like {layers[0].layer!r}; "
                                "`coreml-opt inspect MODEL` lists them)")
            for layer in matched:
                other = owner.setdefault(layer.layer, name)
                if other != name:
                    raise DataError(f"{label}: {name}: pattern {pattern!r}", f"matches layer {layer.layer!r}, "
                                    f"which group {other!r} already holds", "make the groups' patterns disjoint")
    by_group: dict[str, list[Layer]] = {}
    for layer in layers:
        by_group.setdefault(owner.get(layer.layer, layer.layer), []).append(layer)
    clash = sorted({layer.layer for layer in layers if layer.layer not in owner} & set(groups))
    if clash:
        raise DataError(f"{label}: {clash[0]}", "is also the name of a layer outside every group",
                        "give the group another name")
    return [Group(name, tuple(members)) for name, members in by_group.items()]


def trial_key(members: Sequence[Layer]) -> str:
    """The store's layer column for a group trial: its compressed members' names, sorted (content-addressed)."""
    return ",".join(sorted(m.layer for m in members))


class GroupTrials:
    """A grouped sweep's bookkeeping: which members each (group, spec) trial compresses, its store key and
    its exact bytes (members that cannot take the spec counted at fp16)."""

    def __init__(self, mode: str, groups: list[Group]) -> None:
        self.mode, self.groups = mode, groups
        self.compressed: dict[tuple[str, str], tuple[Layer, ...]] = {}

    def plan(self, specs: Sequence[Spec], skip_reason: SkipReason, weights: Mapping[str, torch.Tensor], cache: SimCache,
             kmeans: str) -> tuple[list[tuple[Group, Spec]], list[dict[str, str]]]:
        """(every (group, spec) trial some member can take, the skips: a whole group, or a member left fp16)."""
        plan: list[tuple[Group, Spec]] = []
        skipped: list[dict[str, str]] = []
        for group in self.groups:
            for spec in specs:
                fits, problems = [], []
                for member in group.members:
                    problem = skip_reason(member, spec, weights[member.layer], cache, kmeans)
                    (problems if problem else fits).append((member, problem))
                if not fits:
                    reason = problems[0][1] if len(group.members) == 1 else \
                        f"no member can take it ({problems[0][0].layer}: {problems[0][1]})"
                    skipped.append({"layer": group.layer, "spec": str(spec), "reason": reason})
                    continue
                for member, problem in problems:
                    skipped.append({"layer": member.layer, "spec": str(spec), "reason": f"{problem}; stays fp16 in "
                                    f"group {group.layer}", "group": group.layer})
                self.compressed[(group.layer, str(spec))] = tuple(m for m, _ in fits)
                plan.append((group, spec))
        return plan, skipped

    def members(self, group: Group, spec: Spec) -> tuple[Layer, ...]:
        """The members a (group, spec) trial compresses: those that can take the spec."""
        return self.compressed[(group.layer, str(spec))]

    def member_trials(self, runnable: Sequence[tuple[Group, Spec]]) -> tuple[list[tuple[Layer, Spec]], list[int]]:
        """(the (member, spec) simulations of ``runnable`` in order, where each group trial's ones start; one
        more offset at the end)."""
        flat: list[tuple[Layer, Spec]] = []
        offsets = [0]
        for group, spec in runnable:
            flat += [(m, spec) for m in self.members(group, spec)]
            offsets.append(len(flat))
        return flat, offsets

    def bytes(self, group: Group, spec: Spec, weights: Mapping[str, torch.Tensor], ios18: bool) -> int:
        """Exact bytes Core ML stores for the group under ``spec``: compressed members plus fp16 for the rest."""
        compressed = {m.layer for m in self.members(group, spec)}
        total = 0
        for m in group.members:
            if m.layer not in compressed:
                total += m.fp16_bytes
                continue
            stored = weights[m.layer].to(torch.float16 if m.precision == "fp16" else torch.float32)
            total += predicted_bytes(spec, m.shape, m.op_type, ios18_ops=ios18, weight=stored.cpu().numpy(),
                                     precision=m.precision)
        return total


class GroupStore:
    """The results store seen by group name: rows are keyed by the compressed members (``trial_key``)."""

    def __init__(self, store: ResultStore, trials: GroupTrials) -> None:
        self.store, self.trials = store, trials
        self.keys = {(name, spec): trial_key(members) for (name, spec), members in trials.compressed.items()}

    def finished(self) -> dict[tuple[str, str], tuple[float, float]]:
        rows = self.store.finished()
        return {(name, spec): rows[(key, spec)] for (name, spec), key in self.keys.items() if (key, spec) in rows}

    def add(self, layer: str, spec: str, value: float, seconds: float) -> None:
        self.store.add(self.keys[(layer, spec)], spec, value, seconds)

    def close(self) -> None:
        self.store.close()


class GroupSimulator:
    """``ChunkSimulator`` over a grouped sweep's member simulations, waited on one group trial at a time."""

    def __init__(self, simulator: ChunkSimulator, offsets: list[int]) -> None:
        self.inner, self.offsets = simulator, offsets

    @property
    def pool(self) -> Any:
        return self.inner.pool

    @property
    def cpu_seconds(self) -> float:
        return self.inner.cpu_seconds

    def start(self, i: int) -> None:
        self.inner.start(self.offsets[i] if i < len(self.offsets) else i)

    def wait(self, i: int) -> None:
        for j in range(self.offsets[i], self.offsets[i + 1]):
            self.inner.wait(j)

    def close(self) -> None:
        self.inner.close()

"""Deployment target and Apple Neural Engine guidance derived from the specs a plan actually uses.

Each rule looks at the specs in use and says something only when it applies: per-block scales
(GPU-friendly, not the ANE's preferred form), per-channel scales (the ANE's recommended form),
grouped palettes (LUT count per weight; 8-16 channels per group suggested), and the minimum iOS
version each spec needs against the package's and the plan's deployment target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ..spec import JointSpec, PalettizeSpec, PruneSpec, QuantSpec, Spec, ThresholdPruneSpec, channel_axis

SUGGESTED_GROUPS = (8, 16)  # channels per LUT group suggested for grouped palettization


@dataclass(frozen=True)
class UsedSpec:
    """One weight and the spec it is compressed with."""

    layer: str
    op_type: str
    shape: tuple[int, ...]
    spec: Spec


@dataclass
class Advice:
    """One piece of guidance: level is 'good', 'info', 'warn' or 'error'."""

    level: str
    topic: str
    text: str
    layers: list[str] = field(default_factory=list)


def _parts(spec: Spec) -> tuple[Spec, ...]:
    return spec.parts


def _names(items: Sequence[UsedSpec]) -> list[str]:
    return [u.layer for u in items]


def target_rows(used: Sequence[UsedSpec]) -> list[tuple[str, int, list[str]]]:
    """(spec, minimum iOS, layers) for each distinct compressing spec, highest requirement first."""
    by_spec: dict[str, tuple[int, list[str]]] = {}
    for u in used:
        if not u.spec.is_none:
            by_spec.setdefault(str(u.spec), (u.spec.min_target, []))[1].append(u.layer)
    return sorted(((s, t, layers) for s, (t, layers) in by_spec.items()), key=lambda r: (-r[1], r[0]))


def _target_advice(used: Sequence[UsedSpec], package_target: int | None, plan_target: str | None) -> list[Advice]:
    from ..targets import target_rank

    rows = target_rows(used)
    if not rows:
        return [Advice("info", "deployment target", "no weight is compressed, so compression sets no minimum target")]
    needed = rows[0][1]
    needing = [s for s, t, _ in rows if t == needed]
    out = [Advice("info", "deployment target",
                  f"the compression needs iOS{needed} / macOS{needed - 3} or later "
                  f"({', '.join(needing)} {'needs' if len(needing) == 1 else 'need'} iOS{needed})")]
    if package_target is not None and package_target < needed:
        out.append(Advice("error", "deployment target",
                          f"the package is built for iOS{package_target} but its specs need iOS{needed}: "
                          f"reconvert with `coreml-opt convert --target iOS{needed}`"))
    elif package_target is not None and package_target > needed:
        out.append(Advice("info", "deployment target",
                          f"the package is built for iOS{package_target}; its compression alone would run on "
                          f"iOS{needed}, so converting for iOS{needed} could reach older devices "
                          f"if the rest of the model allows it"))
    if plan_target is not None and target_rank(plan_target) < needed:
        out.append(Advice("error", "deployment target",
                          f"the plan's target {plan_target} is below what its specs need (iOS{needed}): "
                          f"set `target: iOS{needed}` in the plan"))
    return out


def _quant_advice(used: Sequence[UsedSpec]) -> list[Advice]:
    quant = [(u, p) for u in used for p in _parts(u.spec) if isinstance(p, QuantSpec)]
    block = [u for u, p in quant if p.granularity == "per_block"]
    channel = [u for u, p in quant if p.granularity == "per_channel"]
    tensor = [u for u, p in quant if p.granularity == "per_tensor" and not isinstance(u.spec, JointSpec)]
    out = []
    if block:
        out.append(Advice("warn", "per-block quantization",
                          "per-block scales suit the GPU more than the Neural Engine; on the ANE per-channel scales "
                          "are the recommended form (e.g. int8 per-channel, or a 4-bit palette) - keep per-block "
                          "where the model runs on the GPU", _names(block)))
    if channel:
        out.append(Advice("good", "per-channel quantization",
                          "per-channel scales: the form recommended on the Neural Engine", _names(channel)))
    if tensor:
        out.append(Advice("info", "per-tensor quantization",
                          "one scale per weight: the smallest overhead, usually less accurate than per-channel",
                          _names(tensor)))
    return out


def lut_count(used: UsedSpec, spec: PalettizeSpec) -> int:
    """Look-up tables stored for one palettized weight (one per channel group)."""
    if spec.group_size is None:
        return 1
    axis = channel_axis(used.op_type)
    channels = used.shape[axis] if len(used.shape) > axis else 1
    return max(1, math.ceil(channels / spec.group_size))


def _palette_advice(used: Sequence[UsedSpec]) -> list[Advice]:
    pal = [(u, p) for u in used for p in _parts(u.spec) if isinstance(p, PalettizeSpec)]
    low, high = SUGGESTED_GROUPS
    small = [(u, p) for u, p in pal if p.group_size is not None and p.group_size < low]
    suggested = [(u, p) for u, p in pal if p.group_size is not None and low <= p.group_size <= high]
    large = [(u, p) for u, p in pal if p.group_size is not None and p.group_size > high]
    single = [u for u, p in pal if p.group_size is None]

    def counted(items: list[tuple[UsedSpec, PalettizeSpec]]) -> list[str]:
        return [f"{u.layer} ({lut_count(u, p)} LUTs)" for u, p in items]

    out = []
    if small:
        out.append(Advice("warn", "many LUT groups",
                          f"groups smaller than {low} channels give many look-up tables per weight, which can slow "
                          f"inference; groups of {low}-{high} channels are suggested", counted(small)))
    if suggested:
        out.append(Advice("good", "grouped palettes",
                          f"groups of {low}-{high} channels per LUT, the suggested range (more accurate than one LUT, "
                          "few enough tables to stay fast)", counted(suggested)))
    if large:
        out.append(Advice("info", "grouped palettes",
                          f"groups above {high} channels: few LUTs (fast); if accuracy suffers, {low}-{high} "
                          "channels per group is the suggested middle", counted(large)))
    if single:
        out.append(Advice("good", "per-tensor palettes", "one LUT per weight: the cheapest palette to look up",
                          _names(single)))
    pcs = [u for u, p in pal if p.per_channel_scale]
    if pcs:
        out.append(Advice("info", "per-channel scale", "palettes with a per-channel scale need iOS18 and store "
                          "one LUT per position of the weight", _names(pcs)))
    vector = [u for u, p in pal if p.cluster_dim > 1]
    if vector:
        out.append(Advice("info", "vector palettes", "vector (cluster_dim > 1) palettes need iOS18", _names(vector)))
    return out


def _other_advice(used: Sequence[UsedSpec]) -> list[Advice]:
    out = []
    pruned = [u for u in used if any(isinstance(p, (PruneSpec, ThresholdPruneSpec)) for p in _parts(u.spec))]
    if pruned:
        out.append(Advice("info", "pruning", "sparse weights are stored as a bit mask plus the non-zeros: a size "
                          "saving on every compute unit; any speed-up depends on the device", _names(pruned)))
    joint = [u for u in used if isinstance(u.spec, JointSpec)]
    if joint:
        out.append(Advice("info", "joint compression", "chained techniques (e.g. prune + palettize) need iOS18",
                          _names(joint)))
    kept = [u for u in used if u.spec.is_none]
    if kept:
        out.append(Advice("info", "kept in fp16", f"{len(kept)} weight(s) stay fp16 (skipped by the plan or below "
                          "its weight threshold)", _names(kept)))
    return out


def advise(used: Sequence[UsedSpec], package_target: int | None = None, plan_target: str | None = None) -> list[Advice]:
    """Every piece of guidance that applies to ``used``, target first; nothing for techniques not in use."""
    return [*_target_advice(used, package_target, plan_target), *_quant_advice(used), *_palette_advice(used),
            *_other_advice(used)]

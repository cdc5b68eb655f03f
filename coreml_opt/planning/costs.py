"""Cost model: each (layer, spec) costs the exact bytes Core ML stores for it and the accuracy drop the
sensitivity sweep measured for it alone; weights outside the sweep stay fp16 as a fixed cost.

Budgets (bytes, ``12MB``, ``4x``, bits per weight) become one byte capacity over *all* weights, so
"4 bits per weight" means the whole model's weights, as ``coreml-opt inspect`` counts them.
"""
from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .. import units
from ..errors import PlanError
from ..units import ACCURACY_LIKE, drop_unit  # noqa: F401  (re-exported: planning.drop_unit)
from ..storage import predicted_bytes
from .solver import Choices, Option

logger = logging.getLogger(__name__)

# One size unit everywhere: bytes, and KiB/MiB/GiB (1024-based) as every table prints them; KB/MB/GB are read
# the same way, so `--size 60KB` is the 60.0 KiB a table shows (61,440 bytes).
_UNITS = {"": 1, "b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "k": 2**10, "m": 2**20, "g": 2**30}


def parse_size(text: str | int | float) -> int:
    """``12MB`` = ``12MiB`` (12 * 2^20), ``800kB`` (800 * 1024), ``52000`` -> bytes (1024-based, like the tables)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise PlanError(f"size {text!r}", "is not a size", "write e.g. 12MiB, 800KiB or 52000 (bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_metric(value: float | None, metric: str, unit: str | None = None) -> str:
    """A metric value in the unit users read it (see :mod:`coreml_opt.units`)."""
    return units.format_metric(value, units.is_fraction(metric, unit))


def format_drop(value: float | None, metric: str, unit: str | None = None) -> str:
    """A drop in the unit --max-drop takes: pp for fraction metrics, else metric units (:mod:`coreml_opt.units`)."""
    return units.format_drop(value, units.is_fraction(metric, unit))


def _get(trial: Any, name: str) -> Any:
    """A trial field from a dict (trials.json row) or a Trial object."""
    return trial.get(name) if isinstance(trial, Mapping) else getattr(trial, name, None)


@dataclass
class LayerInfo:
    """A swept layer as the sweep describes it."""

    layer: str
    coreml_name: str | None
    op_type: str
    shape: tuple[int, ...]
    params: int
    fp16_bytes: int
    precision: str = "fp16"  # the stored float type of the weight (fp32 in FLOAT32-precision packages)


@dataclass
class Problem:
    """Everything the planner needs: per-layer options, fixed weights, and the sweep's context."""

    layers: list[LayerInfo]
    choices: list[Choices]
    fixed: dict[str, int] = field(default_factory=dict)  # weights not swept: torch path -> fp16 bytes
    fixed_params: int = 0
    metric: str = "accuracy"
    baseline: float = float("nan")
    higher_is_better: bool = True
    target: str = "iOS18"
    candidates: list[str] = field(default_factory=list)
    sweep: dict[str, Any] = field(default_factory=dict)
    # A grouped sweep: group -> its members, and (group, spec) -> the members that spec compresses (the others
    # cannot take it and stay fp16); empty when the sweep was per layer.
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    compressed: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)

    def expand(self, specs: Mapping[str, str]) -> dict[str, str]:
        """{layer: spec} for a plan over the problem's choices: a group's spec goes to every member that takes
        it, "none" to the rest (what the group trial measured and its bytes count)."""
        out: dict[str, str] = {}
        for name, spec in specs.items():
            if name not in self.groups:
                out[name] = spec
                continue
            taken = self.compressed.get((name, spec), self.groups[name] if spec == "none" else ())
            out.update({member: spec if member in taken else "none" for member in self.groups[name]})
        return out

    @property
    def fixed_bytes(self) -> int:
        return sum(self.fixed.values())

    @property
    def total_params(self) -> int:
        return sum(info.params for info in self.layers) + self.fixed_params

    @property
    def fp16_bytes(self) -> int:
        return sum(info.fp16_bytes for info in self.layers) + self.fixed_bytes

    def bits_per_weight(self, total_bytes: int) -> float:
        return 8.0 * total_bytes / self.total_params if self.total_params else 0.0

    def budget_bytes(self, *, size: str | int | None = None, bpw: float | None = None,
                     ratio: float | None = None) -> int:
        """The byte capacity for all weights of one size budget (exactly one of the three)."""
        given = [v for v in (size, bpw, ratio) if v is not None]
        if len(given) != 1:
            raise PlanError("budget", "give exactly one of a size, bits per weight and a compression ratio",
                            "e.g. --bpw 4, --size 12MB or --ratio 4")
        if bpw is not None:
            if bpw <= 0:
                raise PlanError(f"bits per weight {bpw}", "must be positive", "use e.g. --bpw 4")
            return math.floor(bpw * self.total_params / 8)
        if ratio is not None:
            if ratio <= 0:
                raise PlanError(f"ratio {ratio}", "must be positive", "use e.g. --ratio 4 (4x smaller than fp16)")
            return math.floor(self.fp16_bytes / ratio)
        return parse_size(size)

    def describe_bytes(self, total_bytes: int) -> str:
        from ..report.tables import human_bytes

        return (f"{total_bytes:,} bytes ({human_bytes(total_bytes)}, {self.bits_per_weight(total_bytes):.3f} bits per "
                f"weight, {self.fp16_bytes / max(total_bytes, 1):.2f}x smaller than fp16)")

    def metric_text(self, value: float | None) -> str:
        """``value`` of this problem's metric, in the unit users read it (see :func:`format_metric`)."""
        return format_metric(value, self.metric, self.sweep.get("unit"))

    def drop_text(self, value: float | None) -> str:
        """A drop of this problem's metric in the unit --max-drop takes (see :func:`format_drop`)."""
        return format_drop(value, self.metric, self.sweep.get("unit"))


def build_problem(sweep: Mapping[str, Any], trials: Sequence[Mapping[str, Any]],
                  fixed: Mapping[str, int] | None = None, fixed_params: int = 0,
                  candidates: Sequence[str] | None = None) -> Problem:
    """Options per swept layer from the trials (mean drop when a spec was tried more than once)."""
    layers = [LayerInfo(str(row["layer"]), row.get("coreml_name"), str(row.get("op_type", "linear")),
                        tuple(int(d) for d in row.get("shape", ())), int(row["params"]), int(row["fp16_bytes"]),
                        str(row.get("precision", "fp16")))
              for row in sweep.get("layers", [])]
    if not layers:
        raise PlanError("sweep", "lists no layers", "run the sensitivity analyser on a model with compressible weights")
    groups = {str(row["name"]): tuple(map(str, row["members"])) for row in sweep.get("groups") or []}
    if groups:  # a grouped sweep: one choice per group, its bytes and params its members' sums
        layers = [LayerInfo(str(row["name"]), None, str(row.get("op_type", "linear")), (), int(row["params"]),
                            int(row["fp16_bytes"])) for row in sweep["groups"]]
    compressed: dict[tuple[str, str], tuple[str, ...]] = {}
    allowed = set(candidates) if candidates is not None else None
    drops: dict[tuple[str, str], list[float]] = defaultdict(list)
    sizes: dict[tuple[str, str], int] = {}
    for trial in trials:
        drop, size = _get(trial, "drop"), _get(trial, "bytes")
        spec = str(_get(trial, "spec"))
        if drop is None or size is None or not math.isfinite(float(drop)) or (allowed and spec not in allowed):
            continue
        key = (str(_get(trial, "layer")), spec)
        drops[key].append(float(drop))
        sizes[key] = int(size)
        if _get(trial, "members"):
            compressed[key] = tuple(map(str, _get(trial, "members")))
    known = {info.layer for info in layers}
    strays = {layer for layer, _ in drops} - known
    if strays:
        logger.warning("trials for layers not in the sweep are ignored: %s", ", ".join(sorted(strays)))
    choices = []
    for info in layers:
        options = [Option("none", info.fp16_bytes, 0.0)]
        options += [Option(spec, sizes[(layer, spec)], math.fsum(d) / len(d))
                    for (layer, spec), d in drops.items() if layer == info.layer and spec != "none"]
        choices.append(Choices(info.layer, tuple(options)))
    return Problem(layers, choices, dict(fixed or {}), fixed_params, str(sweep.get("metric", "accuracy")),
                   float(sweep.get("baseline") if sweep.get("baseline") is not None else math.nan), bool(sweep.get("higher_is_better", True)),
                   str(sweep.get("target") or "iOS18"), list(candidates or sweep.get("candidates", [])), dict(sweep),
                   groups, compressed)


def fixed_weights(model, swept: Sequence[str], ios18_ops: bool = True) -> tuple[dict[str, int], int]:
    """fp16 bytes of every weight Core ML stores (rank >= 2) that the sweep did not cover, and their count."""
    from ..simulate import infer_op_type

    out: dict[str, int] = {}
    params = 0
    swept_set = set(swept)
    for path, param in model.named_parameters():
        if param.ndim < 2 or path in swept_set:
            continue
        module = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        out[path] = predicted_bytes("none", tuple(param.shape), infer_op_type(module), ios18_ops=ios18_ops)
        params += param.numel()
    return out, params

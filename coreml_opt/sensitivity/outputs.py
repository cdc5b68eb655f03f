"""Sweep outputs: ranked tables, trials.csv/json, sweep.json, summary.md and heatmap.png (heatmap.py).

Layers are ranked most sensitive first (largest worst-case drop). Accuracy-like metrics (unit
"fraction") are shown as percentage points in tables and the heatmap; files keep raw values.
Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from ..report.tables import format_table, human_bytes, markdown_table
from ..units import format_drop
from .layers import Layer

CSV_COLUMNS = ("layer", "coreml_name", "op_type", "spec", "params", "bytes", "fp16_bytes", "metric",
               "baseline_metric", "drop", "seconds")


def _atomic_write(path: Path, data: bytes) -> None:
    from ..model.package import atomic_output

    with atomic_output(path) as tmp:  # no partial file, and no temp file left by a kill
        tmp.write_bytes(data)


def write_json(path: Path, obj: Any) -> None:
    """JSON with NaN written as null, atomically."""
    _atomic_write(path, (json.dumps(_no_nan(obj), indent=2) + "\n").encode())


def _no_nan(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def fmt_drop(value: float | None, unit: str) -> str:
    """A drop in display units: percentage points for fractions, else the metric's own unit."""
    return format_drop(value, unit == "fraction", signed=True, suffix=False)


def drop_label(result) -> str:
    unit = {"fraction": "pp", "dB": "dB", "nats": "nats"}.get(result.unit, "")
    return f"{result.metric} drop" + (f" ({unit})" if unit else "")


def units(result) -> list:
    """What each row of a sweep's tables is: its groups when grouped (groups.Group), else its layers."""
    return getattr(result, "groups", None) or result.layers


def ranked_layers(result) -> list[Layer]:
    """Layers, most sensitive (largest worst-case drop) first."""
    worst = {layer.layer: -math.inf for layer in units(result)}
    for t in result.trials:
        if not math.isnan(t.drop):
            worst[t.layer] = max(worst[t.layer], t.drop)
    return sorted(units(result), key=lambda layer: -worst[layer.layer])


def _grid(result) -> dict[tuple[str, str], Any]:
    return {(t.layer, t.spec): t for t in result.trials}


def ranked_table(result, markdown: bool = False) -> str:
    """Layers x candidates table of drops, most sensitive layer first."""
    grid = _grid(result)
    headers = ["rank", "layer", "op", "params", *result.candidates]
    rows = []
    for rank, layer in enumerate(ranked_layers(result), 1):
        cells = [fmt_drop(grid[(layer.layer, s)].drop, result.unit) if (layer.layer, s) in grid else "n/a"
                 for s in result.candidates]
        rows.append([rank, layer.layer, layer.op_type, layer.params, *cells])
    return markdown_table(headers, rows) if markdown else format_table(headers, rows)


def bytes_table(result, markdown: bool = False) -> str:
    """Bytes each candidate would store per layer, next to fp16."""
    grid = _grid(result)
    headers = ["layer", "fp16", *result.candidates]
    rows = [[layer.layer, human_bytes(layer.fp16_bytes),
             *[human_bytes(grid[(layer.layer, s)].bytes) if (layer.layer, s) in grid else "n/a"
               for s in result.candidates]] for layer in units(result)]
    return markdown_table(headers, rows) if markdown else format_table(headers, rows)


def timing_lines(result) -> list[str]:
    t = result.timing
    total = t.get("total") or sum(v for k, v in t.items() if k not in ("total", "compression_cpu"))
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in t.items() if k != "total")
    lines = [f"sweep time {total:.2f} s: {parts}"]
    if "compression_cpu" in t:
        lines.append("compression is the wait for simulated weights; compression_cpu is their time on worker "
                     "threads, which overlaps the baselines")
    return [*lines,
            f"trials: {result.ran} run now, {result.reused} from the store, {result.pending} pending"]


def header_lines(result) -> list[str]:
    unit = result.unit if result.unit != "fraction" else ""
    val = (lambda v: f"{100 * v:.2f} %") if result.unit == "fraction" else (lambda v: f"{v:.4g} {unit}".strip())
    # a package sweep's baseline is the package as stored; its reference, the package itself or --reference
    base, ref = ("package", "reference") if str(result.model or "").endswith(".mlpackage") else ("fp16", "fp32")
    lines = [(f"metric {result.metric} ({'higher' if result.higher_is_better else 'lower'} is better); "
             f"{base} baseline {val(result.baseline)}, {ref} {val(result.fp32_metric)} "
             f"({ref} -> {base} drop {format_drop(result.fp16_drop, result.unit == 'fraction', signed=True)}); "
             f"table cells: {drop_label(result)}")]
    if result.groups:
        lines.append(f"groups: {result.grouping}, {len(result.groups)} groups of {len(result.layers)} layers; a "
                     "trial compresses every member of a group with one spec")
    for item in result.skipped_candidates:
        lines.append(f"skipped candidate {item['spec']}: {item['reason']}")
    for item in result.skipped_trials:
        lines.append(f"skipped {item['layer']} x {item['spec']}: {item['reason']}")
    if not result.complete:
        lines.append(f"PARTIAL: {result.pending} trial(s) not run yet; rerun the same command to resume")
    return lines


def summary_markdown(result) -> str:
    """The Markdown summary: setup, ranked drops, bytes, time split."""
    out = ["# Sensitivity sweep", ""]
    out += [f"- model: `{result.model or 'in-memory module'}`, input {result.input_shape}, target {result.target}",
            f"- data: `{result.data or 'in-memory'}`", *[f"- {line}" for line in header_lines(result)],
            (f"- drop = how much worse than the fp16 baseline with only that layer compressed "
            f"({'percentage points' if result.unit == 'fraction' else result.unit or 'metric units'})"), ""]
    out += [f"## {drop_label(result)}, most sensitive layer first", "", ranked_table(result, markdown=True), ""]
    out += ["## Bytes per layer", "", bytes_table(result, markdown=True), ""]
    out += ["## Time", "", *[f"- {line}" for line in timing_lines(result)], ""]
    out += ["Files: `trials.csv`, `trials.json`, `sweep.json`, `heatmap.png`, `sensitivity.sqlite`.", ""]
    return "\n".join(out)


def trials_csv(result) -> str:
    """One row per trial; a grouped sweep adds a ``members`` column (the layers a trial compressed, space-separated)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    grouped = any(getattr(t, "members", None) for t in result.trials)
    writer.writerow((*CSV_COLUMNS, "members") if grouped else CSV_COLUMNS)
    for t in result.trials:
        row = t.to_dict()
        writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS]
                        + ([" ".join(row.get("members") or [])] if grouped else []))
    return buffer.getvalue()


def write_outputs(result, out_dir: Path) -> None:
    """trials.csv, trials.json, sweep.json, summary.md and heatmap.png in ``out_dir``."""
    out_dir = Path(out_dir)
    _atomic_write(out_dir / "trials.csv", trials_csv(result).encode())
    write_json(out_dir / "trials.json", [t.to_dict() for t in result.trials])
    write_json(out_dir / "sweep.json", result.sweep_dict())
    _atomic_write(out_dir / "summary.md", summary_markdown(result).encode())
    from .heatmap import write_heatmap

    write_heatmap(result, out_dir / "heatmap.png")

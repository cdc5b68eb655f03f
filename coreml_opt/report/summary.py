"""Shared figures and table rows for the HTML and Markdown pages, so both say exactly the same thing."""
from __future__ import annotations

import math
from typing import Any

from .guidance import target_rows
from ..units import format_drop, format_metric
from .tables import human_bytes

SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"), ("results", "Before and after"), ("inventory", "Model inventory"),
    ("sensitivity", "Sensitivity"), ("pareto", "Size vs accuracy"), ("plan", "Plan"),
    ("workflow", "Workflow stages"), ("deployment", "Deployment target and ANE guidance"), ("inputs", "Inputs"),
)


def section_titles(report) -> list[tuple[str, str]]:
    """SECTIONS with the Pareto section named from the report's metric ("Size vs kl", not "Size vs accuracy")."""
    return [(sid, f"Size vs {report.metric}" if sid == "pareto" else title) for sid, title in SECTIONS]


def fmt_metric(report, value: float | None) -> str:
    return format_metric(value, report.fraction)


def fmt_delta(report, value: float | None, base: float | None) -> str:
    if value is None or base is None or value != value or base != base:
        return "-"
    return format_drop(value - base, report.fraction, signed=True)


def headline(report) -> list[tuple[str, str, str]]:
    """(title, value, detail) cards for the summary header."""
    before, after = report.before_after()
    cards = []
    if before and after and before.bytes and after.bytes:
        cards.append(("Weight size", f"{human_bytes(before.bytes)} → {human_bytes(after.bytes)}",
                      f"{before.bytes / after.bytes:.2f}x smaller, {before.bits_per_weight:.2f} → "
                      f"{after.bits_per_weight:.2f} bits per weight"))
    elif before and before.bytes:
        cards.append(("Weight size", human_bytes(before.bytes), "no compressed package or plan found"))
    else:
        cards.append(("Weight size", "-", "no package or sweep found"))
    if before and after and before.metric is not None and after.metric is not None:
        cards.append((report.metric, f"{fmt_metric(report, before.metric)} → {fmt_metric(report, after.metric)}",
                      f"{fmt_delta(report, after.metric, before.metric)} ({after.source})"))
    else:
        cards.append((report.metric, fmt_metric(report, before.metric if before else None),
                      "no measured after-compression figure"))
    rows = target_rows(report.used)
    need = f"compression needs iOS{rows[0][1]}" if rows else "no compression specs known"
    cards.append(("Deployment target", report.target or "-", need))
    if after is not None:
        cards.append(("Compared", after.label, f"against {before.label if before else '-'}"))
    return cards


def result_rows(report) -> tuple[list[str], list[list[Any]]]:
    before, _ = report.before_after()
    base_metric = before.metric if before else None
    base_bytes = before.bytes if before else None
    headers = ["variant", report.metric, "vs fp16", "weight bytes", "bits/weight", "ratio", "source"]
    rows = [[r.label, fmt_metric(report, r.metric), fmt_delta(report, r.metric, base_metric),
             f"{r.bytes:,} ({human_bytes(r.bytes)})" if r.bytes else "-",
             f"{r.bits_per_weight:.2f}" if r.bits_per_weight else "-",
             f"{base_bytes / r.bytes:.2f}x" if base_bytes and r.bytes else "-", r.source] for r in report.results]
    return headers, rows


def inventory_rows(report) -> tuple[list[str], list[list[Any]], list[Any]]:
    """Per-weight rows: original bytes and bits per weight, then bytes, bits and compression per package."""
    original = report.original
    headers = ["layer", "op", "shape", "params", "fp16 bytes", "bits/w"]
    if report.specs:
        headers.append("plan spec")
    for package in report.compressed:
        headers += [f"{package.label}: bytes", "bits/w", "stored as"]
    rows = []
    for w in original.inventory.weights:
        row = [w.torch_name or w.name, w.op_type, "x".join(map(str, w.shape)), f"{w.params:,}", f"{w.bytes:,}",
               f"{8 * w.bytes / w.params:.2f}"]
        if report.specs:
            row.append(report.specs.get(w.name, "-"))
        for package in report.compressed:
            c = package.weight_for(w)
            row += [f"{c.bytes:,}", f"{8 * c.bytes / c.params:.2f}", c.compression] if c else ["-", "-", "missing"]
        rows.append(row)
    inv = original.inventory
    footer = ["total", "", "", f"{inv.total_params:,}", f"{inv.total_bytes:,}", f"{inv.bits_per_weight:.2f}"]
    if report.specs:
        footer.append("")
    for package in report.compressed:
        pinv = package.inventory
        footer += [f"{pinv.total_bytes:,}", f"{pinv.bits_per_weight:.2f}",
                   f"{inv.total_bytes / max(pinv.total_bytes, 1):.2f}x smaller"]
    return headers, rows, footer


def stage_rows(report) -> tuple[list[str], list[list[Any]]]:
    """Workflow stages: metric (and, where measured, the metric of the package itself run by the package
    runtime), size, package and the first few other fields the report records."""
    extra = list(dict.fromkeys(k for s in report.stages for k in s.extra))[:4]
    on_package = any(s.runtime_metric is not None for s in report.stages)
    headers = ["stage", report.metric, *([f"{report.metric} on package (runtime)"] if on_package else []), "weight bytes",
               "bits/w", "package", *extra]
    rows = [[s.name, fmt_metric(report, s.metric), *([fmt_metric(report, s.runtime_metric)] if on_package else []),
             f"{s.bytes:,}" if s.bytes else "-",
             f"{s.bits_per_weight:.2f}" if s.bits_per_weight else "-", s.package_label or "-",
             *[s.extra.get(k, "") for k in extra]] for s in report.stages]
    return headers, rows


def sensitivity_lines(report) -> list[str]:
    """A few sentences on the sweep: baseline, candidates, the most and least sensitive layers."""
    sweep = report.sweep
    groups = (f" in {len(sweep['groups'])} {sweep.get('grouping', '')} groups (one trial per group and spec)"
              if sweep.get("groups") else "")
    lines = [f"{len(sweep.get('layers', []))} layers{groups} x {len(sweep.get('candidates', []))} candidates "
             f"({', '.join(sweep.get('candidates', []))}) on `{sweep.get('data') or 'in-memory data'}`; fp16 baseline "
             f"{fmt_metric(report, sweep.get('baseline'))}, fp32 {fmt_metric(report, sweep.get('fp32_metric'))}."]
    worst: dict[str, tuple[float, str]] = {}
    for t in report.trials:
        if t.drop == t.drop and t.drop > worst.get(t.layer, (-math.inf, ""))[0]:
            worst[t.layer] = (t.drop, t.spec)
    if worst:
        ranked = sorted(worst.items(), key=lambda kv: -kv[1][0])
        (top, (drop, spec)), (low, (ldrop, lspec)) = ranked[0], ranked[-1]
        lines.append(f"Most sensitive: `{top}` ({fmt_delta(report, -drop, 0.0)} with {spec} alone); least: `{low}` "
                     f"(worst {fmt_delta(report, -ldrop, 0.0)}, with {lspec}).")
    if not sweep.get("complete", True):
        lines.append(f"The sweep is PARTIAL: {sweep.get('pending')} trial(s) not run yet.")
    return lines


def target_lines(report) -> list[str]:
    """Deployment targets of the packages and the plan."""
    lines = [f"{p.label}: built for iOS{p.inventory.deployment_target}"
             for p in ([report.original] if report.original and not report.original_derived else []) + report.compressed]
    if report.plan is not None:
        lines.append(f"plan: target {report.plan.target or 'the model’s own'}")
    if report.sweep:
        lines.append(f"sweep: measured for {report.sweep.get('target')}")
    return lines

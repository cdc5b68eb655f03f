"""One unit per quantity, for every command, plan, report and plot.

Metrics that are fractions (accuracy, top-1 agreement) are shown in % and their drops in percentage points
("pp"; ``--max-drop 0.5`` is 0.5 pp = 0.005 in metric units); other metrics (kl in nats, psnr/sqnr in dB,
cosine, user metrics) in their own units with 4 significant digits. Files (JSON, CSV) keep metric units.
Sizes are bytes, shown as B/KiB/MiB (1024-based; see ``planning.costs.parse_size``).
"""
from __future__ import annotations

ACCURACY_LIKE = ("accuracy", "acc", "top1", "top5", "top-1", "top-5", "agreement", "top1_agreement")


def is_fraction(metric: str, unit: str | None = None) -> bool:
    """True for metrics in [0, 1] shown as % (the sweep's ``unit: fraction``, or an accuracy-like name)."""
    return unit == "fraction" or str(metric).lower() in ACCURACY_LIKE or "accuracy" in str(metric).lower()


def drop_unit(metric: str, unit: str | None = None) -> float:
    """Metric units per user 'point' of drop: 0.01 for fractions such as accuracy (0.5 -> 0.5 pp), else 1."""
    return 0.01 if is_fraction(metric, unit) else 1.0


def format_metric(value: float | None, fraction: bool) -> str:
    """``99.44 %`` for fraction metrics, else 4 significant digits (kl ``2.56e-08``, psnr ``41.3``); ``-`` if
    missing or NaN."""
    if value is None or value != value:
        return "-"
    return f"{100 * value:.2f} %" if fraction else f"{value:.4g}"


def format_drop(value: float | None, fraction: bool, *, signed: bool = False, suffix: bool = True) -> str:
    """A drop (metric units) as --max-drop takes it: ``0.50 pp`` for fraction metrics, else metric units."""
    if value is None or value != value:
        return "-"
    value = value + 0.0  # no '-0.00'
    sign = "+" if signed else ""
    if fraction:
        return f"{100 * value:{sign}.2f}" + (" pp" if suffix else "")
    return f"{value:{sign}.4g}"

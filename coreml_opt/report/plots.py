"""PNG plots for the report, returned as bytes: the Pareto front with the chosen plan, bits per weight per layer."""
from __future__ import annotations

import io
from typing import Any, Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def pareto_png(problem, points: Sequence, mark: Mapping[str, Any] | None = None) -> bytes:
    """Metric (measured, else predicted) against bits per weight for solved/greedy/uniform plans; a star marks
    the chosen plan (``mark``: bits_per_weight, metric, label)."""
    plt = _pyplot()

    def y(p) -> float:
        if p.measured_metric is not None:
            return p.measured_metric
        return problem.baseline - p.predicted_drop if problem.higher_is_better else problem.baseline + p.predicted_drop

    measured = all(p.measured_metric is not None for p in points)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for kind, style in (("solved", dict(marker="o", color="C0", lw=2)),
                        ("greedy", dict(marker="s", color="C1", ls="--"))):
        pts = sorted((p for p in points if p.kind == kind), key=lambda p: p.bits_per_weight)
        if pts:
            ax.plot([p.bits_per_weight for p in pts], [y(p) for p in pts], label=f"{kind} plan", **style)
    values = [y(p) for p in points if p.kind != "uniform"] + [problem.baseline]
    if mark and mark.get("metric") is not None:
        values.append(mark["metric"])
    values = [v for v in values if v == v]
    bottom = None
    if values:  # zoom on the plans; uniform points far below sit on the bottom edge, labelled
        low, high = min(values), max(values)
        span = max(high - low, 1e-3 * max(abs(high), 1.0))
        bottom = low - 0.3 * span
        ax.set_ylim(bottom, high + 0.2 * span)
    uniform = [p for p in points if p.kind == "uniform"]
    if uniform:
        shown = [max(y(p), bottom) if bottom is not None else y(p) for p in uniform]
        ax.scatter([p.bits_per_weight for p in uniform], shown, marker="^", color="C2", zorder=3, label="uniform")
        for i, (p, v) in enumerate(sorted(zip(uniform, shown), key=lambda pv: pv[0].bits_per_weight)):
            text = p.label if v == y(p) else f"{p.label} ({y(p):.3g}, off scale)"
            # alternate above/below so neighbouring labels do not overprint
            ax.annotate(text, (p.bits_per_weight, v), textcoords="offset points", xytext=(4, 6 if i % 2 == 0 else -12),
                        fontsize=7, color="C2")
    if problem.baseline == problem.baseline:
        ax.axhline(problem.baseline, color="gray", ls=":", lw=1, label="fp16 baseline")
    if mark and mark.get("metric") is not None:
        ax.scatter([mark["bits_per_weight"]], [mark["metric"]], marker="*", s=260, color="#d62728",
                   edgecolor="black", zorder=5, label=mark.get("label", "chosen plan"))
    ax.set_xlabel("bits per weight (all weights, as stored by Core ML)")
    ax.set_ylabel(f"{problem.metric} ({'measured' if measured else 'predicted'})")
    ax.set_title("size vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def layer_bits_png(original, compressed: Sequence) -> bytes:
    """Horizontal bars: bits per weight of each layer in the original and each compressed package."""
    import numpy as np

    plt = _pyplot()
    weights = original.inventory.weights
    names = [w.torch_name or w.name for w in weights]
    series = [("original", {w.name: w for w in weights})] + \
        [(p.label, {w.name: m for w in weights if (m := p.weight_for(w)) is not None}) for p in compressed]
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.16 * len(names) * len(series)))
    ypos = np.arange(len(names))
    for i, (label, by_name) in enumerate(series):
        bits = [8.0 * by_name[w.name].bytes / w.params if w.name in by_name else np.nan for w in weights]
        ax.barh(ypos + i * height, bits, height=height, label=label, color=f"C{i if i < 1 else i + 2}")
    ax.set_yticks(ypos + height * (len(series) - 1) / 2, names)
    ax.invert_yaxis()
    ax.set_xlabel("bits per weight (bytes stored x 8 / parameters)")
    ax.axvline(16, color="gray", ls=":", lw=1)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(series), 3), frameon=False)
    ax.set_title("bits per weight per layer")
    fig.tight_layout()
    return _png(fig)

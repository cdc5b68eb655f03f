"""PNG plots for the report, returned as bytes: the Pareto front with the chosen plan, bits per weight per layer."""
from __future__ import annotations

import io
from typing import Sequence


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

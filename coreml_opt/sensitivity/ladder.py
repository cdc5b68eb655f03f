"""The default candidate ladder, per layer kind (conv, depthwise conv, linear, embedding).

A sweep without ``--candidates`` tries on each layer only its kind's ladder; the ladders were chosen by
measurement on pretrained EfficientNet-Lite0 (``bench/compensation.py``; see the README, "Default
candidate ladder"). Compensated rungs (``+bc``) need calibration data: a sweep without data (or a
package-only sweep, or a workflow whose compress stages run data-free) tries their plain base instead.
"""
from __future__ import annotations

from typing import Sequence

from ..spec import readers

# Bias correction (+bc) cut whole-model KL of uniform per-tensor pal4 on EfficientNet-Lite0 from 1.84 to 0.47
# (report half): every LUT and 4-bit rung of a conv or linear carries it. Embeddings (gather) have no bias.
LADDERS: dict[str, tuple[str, ...]] = {
    "conv": ("int8", "int4/block32+bc", "pal6+bc", "pal4/g8+bc", "pal4+bc", "pal3/g8+bc", "pal2+bc", "prune50"),
    "depthwise conv": ("int8", "int4+bc", "pal6+bc", "pal4/g8+bc", "pal4/pcs+bc", "pal4+bc", "pal2+bc"),
    "linear": ("int8", "int4/block32+bc", "pal6+bc", "pal4/g8+bc", "pal4/pcs+bc", "pal4+bc", "pal3/g8+bc", "pal2+bc",
               "prune50"),
    "embedding": ("int8", "int4/block32", "pal6", "pal4/g8", "pal4", "pal2", "prune50"),
}


def layer_kind(op_type: str, shape: Sequence[int]) -> str:
    """conv, depthwise conv (a grouped conv with one input channel per group), linear or embedding (``gather``),
    from a weight's :func:`~coreml_opt.spec.reader_key` and shape; anything else reads as linear."""
    ops = readers(op_type)
    if any(t == "gather" for t, _ in ops):
        return "embedding"
    if any(t in ("conv", "conv_transpose") for t, _ in ops):
        grouped = any(g > 1 for _, g in ops)
        return "depthwise conv" if grouped and len(shape) > 1 and shape[1] == 1 else "conv"
    return "linear"


def _plain(spec: str, calibrated: bool) -> str:
    return spec if calibrated else spec.replace("+aw", "").replace("+bc", "")


def ladder_for(op_type: str, shape: Sequence[int], calibrated: bool = True) -> tuple[str, ...]:
    """The default candidates of a weight of this kind (without calibration data, compensated rungs' bases)."""
    return tuple(_plain(s, calibrated) for s in LADDERS[layer_kind(op_type, shape)])


def default_ladder(calibrated: bool = True) -> tuple[str, ...]:
    """Every kind's candidates, each once, in ladder order (what a default sweep lists as its candidates)."""
    out: list[str] = []
    for ladder in LADDERS.values():
        out += [_plain(spec, calibrated) for spec in ladder if _plain(spec, calibrated) not in out]
    return tuple(out)

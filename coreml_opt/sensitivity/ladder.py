"""The default candidate ladder, per layer kind (conv, depthwise conv, linear, embedding).

A sweep with data and a built-in metric but no ``--candidates`` tries on each layer only its kind's
ladder; the ladders were chosen by measurement on pretrained EfficientNet-Lite0 (``bench/compensation.py``,
``bench/imagenet.py``; see the README, "Default candidate ladder"). Compensated rungs (``+gptq``, ``+bc``) need calibration data: a sweep without data (or a
package-only sweep, or a workflow whose compress stages run data-free) tries their plain base instead.
"""
from __future__ import annotations

from typing import Sequence

from ..spec import readers

# Measured on pretrained EfficientNet-Lite0, 128 plan-half photos, KL on the report half (bench/imagenet.py; the
# README's "Default candidate ladder"): bias correction (+bc) matters even at 8 bits (int8 on every layer: KL
# 0.027, int8+bc: 0.0044), and GPTQ error feedback with a refit LUT (+gptq) is what makes 3 and 4 bits usable
# (the 11 largest layers at pal4/g8, the rest int8+bc: KL 0.066 with +aw+bc, 0.018 with +gptq+bc; at pal3/g8
# 0.295 and 0.053). Grouped-channel LUTs (/g8) pay on wide layers; per-tensor LUTs stay for narrow ones, where
# eight rows' LUT would cost more than it saves (the planner counts every LUT byte). Embeddings (gather) have no
# bias and no input Hessian: plain rungs.
LADDERS: dict[str, tuple[str, ...]] = {
    "conv": ("int8+bc", "pal6+gptq+bc", "pal4/g8+gptq+bc", "pal4+gptq+bc", "pal3/g8+gptq+bc", "pal3+gptq+bc",
             "pal2/g8+gptq+bc"),
    "depthwise conv": ("int8+bc", "pal6+gptq+bc", "pal4/g8+gptq+bc", "pal4+gptq+bc"),
    "linear": ("int8+bc", "pal6+gptq+bc", "pal4/g8+gptq+bc", "pal4+gptq+bc", "pal3/g8+gptq+bc", "pal3+gptq+bc",
               "pal2/g8+gptq+bc"),
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
    return spec if calibrated else spec.replace("+aw", "").replace("+gptq", "").replace("+bc", "")


def ladder_for(op_type: str, shape: Sequence[int], calibrated: bool = True) -> tuple[str, ...]:
    """The default candidates of a weight of this kind (without calibration data, compensated rungs' bases)."""
    return tuple(_plain(s, calibrated) for s in LADDERS[layer_kind(op_type, shape)])


def default_ladder(calibrated: bool = True) -> tuple[str, ...]:
    """Every kind's candidates, each once, in ladder order (what a default sweep lists as its candidates)."""
    out: list[str] = []
    for ladder in LADDERS.values():
        out += [_plain(spec, calibrated) for spec in ladder if _plain(spec, calibrated) not in out]
    return tuple(out)

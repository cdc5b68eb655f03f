"""scaled_dot_product_attention (iOS18 ``transformers.py``): softmax(Q K^T / sqrt(d) + mask) V; a bool mask keeps True."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Args, Context, Node, Out, register


@register("scaled_dot_product_attention")
def scaled_dot_product_attention(a: Args, node: Node, ctx: Context) -> Out:
    mask = a.get("attn_mask")
    if mask is not None and not mask.dtype.is_floating_point and mask.dtype != torch.bool:
        mask = mask.bool()
    return F.scaled_dot_product_attention(a["query"], a["key"], a["value"], attn_mask=mask)

"""Decode-step attention for the engine on a CPU.

A decode step asks attention for one query position per row against the whole KV cache. torch's CPU
`scaled_dot_product_attention` runs that shape in bf16 about 9× slower than two matmuls and a softmax (1.1 ms
against 0.12 ms per layer for 16 rows over 200 cached positions), a third of a SmolLM2 decode step. So the engine
registers this function with transformers under the name "lorakit" (with sdpa's mask) and switches a model
using sdpa to it while it serves: one query position on a CPU takes the matmul path, with the softmax in
fp32 (at least); everything else goes to transformers' own sdpa function unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

NAME = "lorakit"


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function contract: query (B, H, T, D), key and value (B, KV, L, D), a boolean
    mask (B or 1, 1, T, L) or None → ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or query.device.type != "cpu" or kwargs.get("softcap") is not None or (
            attention_mask is not None and attention_mask.dtype != torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, heads, _, dim = query.shape
    groups = heads // key.shape[1]
    q = query.reshape(b, key.shape[1], groups, dim)  # the heads that share a key/value head, side by side
    scores = torch.matmul(q, key.transpose(-1, -2))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * (dim ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:  # (B, 1, 1, L): True where a row may attend
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (B, KV, groups, D)
    return out.reshape(b, 1, heads, dim), None


def use(model: nn.Module) -> Callable[[], None]:
    """Switch a CPU model that uses sdpa to `attention`; the returned function switches it back."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(
            model, "set_attn_implementation") or next(model.parameters()).device.type != "cpu":
        return lambda: None
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return lambda: model.set_attn_implementation("sdpa")

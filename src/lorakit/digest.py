"""Digests of frozen weights, which adapter files name their base by (files.py's fingerprint).

A leaf beside quant.py: the layers' initialisations that change W0 (residual.py) take the digest first, so
the fingerprint still names the base the adapter was trained on.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from .quant import dequantize, is_quantized


def weight_digest(weight: Tensor) -> str:
    """A hash of a frozen weight: its shape and up to 65,536 evenly strided values in fp32.

    Enough to tell one pretrained base from another without reading every byte of a large model."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // 65536)
    sample = flat[::step][:65536].to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(weight.shape)).encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()


def base_digest(layer: nn.Module) -> str:
    """`weight_digest` of a LoRA layer's W0 (a 4-bit base: of its dequantized weight), taken once and kept
    on the layer (`base_sha`): call it before W0 first changes (a merge, a cast to bf16, sharding, a residual
    initialisation), so the fingerprint still names the base the adapter was trained on."""
    if layer.base_sha is None:
        if layer.merged:
            raise ValueError(f"the base digest of a layer must be taken before {layer.merged} are merged into it")
        layer.base_sha = getattr(layer.base, "lorakit_sha", None) or \
            weight_digest(dequantize(layer.base) if is_quantized(layer.base) else layer.base.weight)
    return layer.base_sha

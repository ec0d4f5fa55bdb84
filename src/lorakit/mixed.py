"""Mixed-adapter batches: row i of a batch uses adapter rows[i] (None: the base alone), in one forward.

Each LoRA layer stacks its adapters' A and s·up, zero-padded to the largest rank R (padding with zeros is
exact), into a bank with one extra all-zero entry for rows without an adapter; a batch gathers each row's
pair from the bank and applies them with two batched matmuls — no Python loop over adapters. Inference
only: no dropout. `lorakit.mixed_batch` sets the rows; `LoraLayer` and `SavedModule` call these functions.

Nothing here imports the rest of lorakit: a layer is anything with adapters, rows, geometry and merged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def lora_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The update of each row of x under its own adapter: (B, ..., out) for x: (B, ..., in), or (B, T, dim)
    for an embedding's ids x: (B, T)."""
    g, rows = layer.geometry, layer.rows
    if not layer.adapters:  # every adapter of this layer was deleted
        return x.new_zeros(())
    if g.kind == "conv2d":
        raise TypeError("mixed-adapter batches support Linear, Conv1D and Embedding layers, not Conv2d")
    if layer.merged:
        raise ValueError(f"adapters {layer.merged} are merged into the base weights; unmerge before a mixed batch")
    if x.shape[0] != len(rows):
        raise ValueError(f"mixed batch has {x.shape[0]} rows but {len(rows)} adapter names were given")
    names = list(layer.adapters)
    index = torch.tensor([names.index(n) if n in layer.adapters else len(names) for n in rows], device=x.device)
    a_bank, up_bank = bank(layer)
    up = up_bank[index]  # (B, out, R)
    if g.kind == "embedding":
        u = a_bank.transpose(1, 2)[index[:, None], x]  # (B, T, R)
        return torch.bmm(u, up.transpose(1, 2))  # (B, T, dim)
    xb = x.to(a_bank.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (B, L, in)
    u = torch.bmm(xb, a_bank[index].transpose(1, 2))  # (B, L, R)
    return torch.bmm(u, up.transpose(1, 2)).reshape(*x.shape[:-1], g.out_features)  # (B, ..., out)


def bank(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """A: (n+1, R, in) and s·up: (n+1, out, R) of the layer's n adapters, zero-padded to the largest rank R.

    Without autograd the bank is kept on the layer and rebuilt only when an adapter's weights change (their
    version counters), so serving mixed batches does not restack it on every call."""
    adapters = list(layer.adapters.values())
    key = tuple((id(a), p.data_ptr(), p._version) for a in adapters for p in (a.lora_a, a.lora_b))
    cached = getattr(layer, "_banked", None)
    if cached is not None and cached[0] == key and not torch.is_grad_enabled():
        return cached[1], cached[2]
    rank, ref = max(a.lora_a.shape[0] for a in adapters), adapters[0].lora_a
    a_bank = ref.new_zeros(len(adapters) + 1, rank, ref.shape[1])  # (n+1, R, in)
    up_bank = ref.new_zeros(len(adapters) + 1, layer.geometry.out_features, rank)  # (n+1, out, R)
    for i, a in enumerate(adapters):
        a_bank[i, :a.lora_a.shape[0]] = a.lora_a
        up_bank[i, :, :a.lora_a.shape[0]] = a.up() * a.scale
    layer._banked = (key, a_bank, up_bank) if not torch.is_grad_enabled() else None
    return a_bank, up_bank


def saved_rows(module: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """A `modules_to_save` module under mixed rows: each row through its adapter's copy (or the original)."""
    rows = module.rows
    if x.shape[0] != len(rows):
        raise ValueError(f"mixed batch has {x.shape[0]} rows but {len(rows)} adapter names were given")
    y = module.original(x, *args, **kwargs)
    for name in {n for n in rows if n in module.adapters}:
        mask = torch.tensor([n == name for n in rows], device=x.device)
        y = torch.where(mask.view(-1, *[1] * (y.ndim - 1)), module.adapters[name](x, *args, **kwargs), y)
    return y

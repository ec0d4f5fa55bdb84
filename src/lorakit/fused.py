"""Fast paths of a LoRA layer: the same update as `LoraAdapter.forward`, computed the cheapest way.

    y + s · B·A·dropout(x)          (x: (..., in), y: (..., out) the base's output)

`add_update` picks the path for a Linear or Conv1D base:
- training on CPU: one autograd node (`FusedLinear`) that saves x and a 1-byte dropout mask instead of a
  dropped fp32 copy of x, folds s into `addmm` and casts A and B itself;
- training on a GPU, where steps of this size are bound by the host launching kernels, not by the matmuls:
  the same update as plain autograd ops (fewer Python steps per layer);
- without autograd: the update added into y in place.
Other bases (Conv2d, Embedding) add `adapter(x)`. Dropout masks come four to a 64-bit random word
(`keep_mask`), and the LoRA layers that read the same input in turn (q, k, v; gate, up) share one mask.
`fast_dropout` gives a model's own nn.Dropout layers the same masks.

Nothing here imports the rest of lorakit: an adapter is anything with lora_a, up(), scale, config.dropout,
geometry and training, as `lorakit.layers.LoraAdapter` has.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def keep_mask(x: Tensor, p: float) -> tuple[Tensor, float]:
    """A bool mask shaped like x, each entry False with probability p rounded to a multiple of 2⁻¹⁶,
    and that rounded p (the caller rescales by 1/(1-p) with it, so the update stays unbiased).

    Four entries come from one 64-bit random draw (its four 16-bit words, each compared with a
    threshold): several times faster on CPU than drawing a float per entry."""
    drop = round(p * 65536)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
    keep = words.view(torch.int16)[:x.numel()].view(x.shape) >= drop - 32768
    return keep, drop / 65536


_draws = threading.local()


def shared_keep_mask(x: Tensor, rows: Tensor, p: float, user: nn.Module) -> tuple[Tensor, float]:
    """`keep_mask` for `rows` (the layer input x as the matmul reads it), shared by the LoRA layers that read
    the same x one after another: q, k and v (gate and up) drop the same entries of their common input, one
    draw instead of three, as a single A for the three would. The last draw is remembered by weak reference
    to x (with its version counter, so an x changed in place draws again) and to the mask (alive while the
    autograd graph that saved it is); a layer that already used it (one called twice) draws anew."""
    last = getattr(_draws, "last", None)
    if last is not None:
        x_ref, version, asked, keep_ref, drawn, users = last
        keep = keep_ref()
        if (x_ref() is x and x._version == version and asked == p and keep is not None
                and keep.shape == rows.shape and id(user) not in users):
            users.add(id(user))
            return keep, drawn
    keep, drawn = keep_mask(rows, p)
    _draws.last = (weakref.ref(x), x._version, p, weakref.ref(keep), drawn, {id(user)})
    return keep, drawn


class FastDropout(nn.Dropout):
    """nn.Dropout whose mask comes from `keep_mask` on CPU: the same Bernoulli keep with the 1/(1-p)
    scale, p rounded to a multiple of 2⁻¹⁶; backward keeps a 1-byte mask. On other devices it is
    nn.Dropout (their fused kernel is already fast)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep, p = keep_mask(x, self.p)
        return (x * keep).mul_(1.0 / (1.0 - p))


def fast_dropout(model: nn.Module) -> int:
    """Replace every plain nn.Dropout of `model` by a `FastDropout` of the same p, in place; returns how
    many were replaced. (LoRA adapters apply their own dropout and hold no nn.Dropout.)"""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Dropout]
    for parent, name, child in swaps:
        setattr(parent, name, FastDropout(child.p, child.inplace))
    return len(swaps)


class FusedLinear(torch.autograd.Function):
    """out = y + s · (dropout(x) · Aᵀ) · upᵀ for a linear base, as one autograd node.

    x: (N, in), y: (N, out) the base's output, both in the compute dtype; a: (p·r, in) and up: (out, p·r)
    the adapter's own weights, cast inside the node and given their gradients back in their own dtype.
    keep: the dropout mask (None without dropout) and p the probability it was drawn with. Saves the bool mask,
    u = dropout(x)·Aᵀ (p·r values a row) and, only while A trains, x itself (shared with every sibling projection
    that reads the same x): A's gradient is all that reads x, so under a frozen A (LoRA-FA) no float tensor of the
    input's size is kept. The scale rides in the matmuls."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, a: Tensor, up: Tensor, scale: float, keep: Tensor | None,
                p: float) -> Tensor:
        ctx.dtypes = a.dtype, up.dtype
        a, up = a.to(x.dtype), up.to(x.dtype)
        u = (x if keep is None else x * keep) @ a.t()  # (N, p·r)
        if keep is not None:
            u.mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, keep, u, a, up)
        ctx.scale, ctx.p = scale, p
        return torch.addmm(y, u, up.t(), alpha=scale)  # (N, out)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, keep, u, a, up = ctx.saved_tensors
        need_x, _, need_a, need_up = ctx.needs_input_grad[:4]
        inv = 1.0 if keep is None else 1.0 / (1.0 - ctx.p)
        gu = torch.mm(g, up).mul_(ctx.scale * inv)  # (N, p·r): ∂L/∂u, with dropout's 1/(1-p) folded in
        grad_x = grad_a = grad_up = None
        if need_x:
            grad_x = gu @ a  # (N, in)
            if keep is not None:
                grad_x.mul_(keep)
        if need_a:
            grad_a = (gu.t() @ (x if keep is None else x * keep)).to(ctx.dtypes[0])  # (p·r, in)
        if need_up:
            grad_up = torch.mm(g.t(), u).mul_(ctx.scale).to(ctx.dtypes[1])  # (out, p·r)
        return grad_x, g, grad_a, grad_up, None, None, None


def plain_update(x: Tensor, y: Tensor, a: Tensor, up: Tensor, scale: float, p: float) -> Tensor:
    """What `FusedLinear` computes, as plain autograd ops in x's dtype: y + s · (dropout(x) · Aᵀ) · upᵀ."""
    xd = F.dropout(x, p, training=True) if p > 0 else x
    return torch.addmm(y, xd @ a.to(x.dtype).t(), up.to(x.dtype).t(), alpha=scale)


def add_update(adapter: nn.Module, x: Tensor, y: Tensor, dropout: bool = True) -> Tensor:
    """y + s · B·A·dropout(x): the base's output y with the adapter's update added, the fastest way for the
    device and mode (see the module docstring); x as it is with dropout=False. The matmuls run in y's dtype
    when it is 16-bit (a bf16 base or autocast) and in the adapter's dtype otherwise."""
    g = adapter.geometry
    if g.kind not in ("linear", "conv1d"):
        return y + adapter(x).to(y.dtype)
    dtype = y.dtype if y.dtype in (torch.bfloat16, torch.float16) else adapter.lora_a.dtype
    x2 = x.reshape(-1, g.in_features).to(dtype)  # (N, in)
    y2 = y.reshape(-1, g.out_features).to(dtype)  # (N, out)
    p = adapter.config.dropout if adapter.training and dropout else 0.0
    device = x.device.type
    if torch.is_grad_enabled() and device != "cpu":
        out = plain_update(x2, y2, adapter.lora_a, adapter.up(), adapter.scale, p)
    else:
        # The dtypes are chosen above; autocast (entered only when on: entering costs time) would recast.
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            if torch.is_grad_enabled():
                keep, p = shared_keep_mask(x, x2, p, adapter) if p > 0 else (None, 0.0)
                out = FusedLinear.apply(x2, y2, adapter.lora_a, adapter.up(), adapter.scale, keep, p)
            else:
                x2 = F.dropout(x2, p, training=True) if p > 0 else x2
                out = y2.addmm_(x2 @ adapter.lora_a.to(dtype).t(), adapter.up().to(dtype).t(), alpha=adapter.scale)
    return out.to(y.dtype).view(y.shape)

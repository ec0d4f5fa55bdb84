"""DoRA (Liu et al. 2024, arXiv 2402.09353): LoRA with the weight split into a magnitude and a direction.

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖      (‖·‖: each output's row of the (out, fan_in) weight)

m (out,) trains and starts at ‖W0‖, so a fresh adapter changes nothing. As the paper suggests (§4.3) and PEFT
does, the norm is a constant in backward: no gradient flows through it. With f = m / ‖W0 + s·B·A‖ the layer
computes, for the base's output y = W0·x + bias,

    h = f ⊙ (W0·x + s·B·A·x) + bias = f ⊙ (y − bias + s·B·A·x) + bias

and, with dropout d on the adapter's input while training, PEFT's definition, which runs the base once more:

    h = y + (f − 1) ⊙ W0·d(x) + f ⊙ s·B·A·d(x)

The row norms never form W0 + s·B·A (out × fan_in values each step, PEFT builds it through a fan_in × fan_in
identity):

    ‖W0ᵢ + s·(BA)ᵢ‖² = ‖W0ᵢ‖² + 2s · Bᵢ·(A·W0ᵢᵀ) + s² · Bᵢ·(A·Aᵀ)·Bᵢᵀ

‖W0ᵢ‖² is taken once per base weight, and A·W0ᵀ is as thin as A.

`LoraLayer` calls these functions (and mixed.py `factor`); nothing here imports the rest of lorakit but
fused.py and quant.py: a layer is anything with base, geometry and factors, an adapter anything with lora_a,
up(), scale, magnitude, config and geometry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused
from .quant import dequantize, is_quantized


def weight_matrix(layer: nn.Module) -> Tensor:
    """W0 as an (out, fan_in) matrix in its own dtype: a view of the base's weight (a 4-bit one dequantized)."""
    w = dequantize(layer.base) if is_quantized(layer.base) else layer.base.weight
    if layer.geometry.kind == "conv2d":
        return w.flatten(1)
    return w.t() if layer.geometry.kind in ("conv1d", "embedding") else w  # those store (in, out)


def along_outputs(geometry, v: Tensor) -> Tensor:
    """A per-output vector v (out,) shaped to broadcast along the outputs of the base's weight."""
    if geometry.kind == "conv2d":
        return v.view(-1, 1, 1, 1)
    return v.view(1, -1) if geometry.kind in ("conv1d", "embedding") else v.view(-1, 1)


def layer_norms(layer: nn.Module, adapter: nn.Module) -> Tensor:
    """‖W0 + s·B·A‖ of each output of `layer` for `adapter` (`norms`): computed on every forward that trains the
    adapter (FSDP gathers new values into the same tensors without a version change), else kept on the adapter
    until A, B, s or W0 change, so inference computes them once."""
    w = layer.base.weight
    # W0's storage, dtype and device too: a cast or a new tensor (`p.data = ...`, `module.to`) keeps id and version
    key = (id(w), w._version, w.data_ptr(), w.dtype, w.device, id(adapter.lora_a), adapter.lora_a._version,
           id(adapter.lora_b), adapter.lora_b._version, adapter.scale)
    kept = adapter.__dict__.get("_norms")
    trains = torch.is_grad_enabled() and any(p.requires_grad for p in (adapter.lora_a, adapter.lora_b))
    if trains or kept is None or kept[0] != key:
        w0 = weight_matrix(layer)
        sq = layer.__dict__.get("_w0_sq")  # ‖W0ᵢ‖², taken once per base weight
        if sq is None or sq[0] != key[:5]:
            sq = layer.__dict__["_w0_sq"] = (key[:5], row_norms_sq(w0))
        kept = adapter.__dict__["_norms"] = (key, norms(w0, sq[1], adapter.lora_a.flatten(1), adapter.up(),
                                                         adapter.scale))
    return kept[1]


def factor(layer: nn.Module, adapter: nn.Module) -> Tensor:
    """f = m / ‖W0 + s·B·A‖ (out,): how DoRA rescales each output; m's gradient flows, the norm's does not."""
    return adapter.magnitude / layer_norms(layer, adapter).to(adapter.magnitude.dtype)


@torch.no_grad()
def init_magnitude(layer: nn.Module, adapter: nn.Module) -> None:
    """m ← ‖W0 + s·B·A‖ for a fresh DoRA adapter, so it changes nothing (‖W0‖ where B·A starts at zero);
    nothing without DoRA, or on the meta device."""
    if adapter.magnitude is not None and adapter.magnitude.device.type != "meta":
        adapter.magnitude.copy_(layer_norms(layer, adapter))


def merge_factor(layer: nn.Module, name: str) -> Tensor:
    """f of adapter `name`, laid along the base weight's outputs, for a merge W' = f ⊙ (W0 + s·ΔW); kept in
    `layer.factors` to unmerge with. Refused on a weight that already holds a merged adapter: f is
    defined on W0."""
    if layer.merged:
        raise ValueError(f"cannot merge DoRA adapter {name!r} on top of {layer.merged}: its magnitude rescales the "
                         f"whole weight it is merged into; unmerge first")
    layer.factors[name] = along_outputs(layer.geometry, factor(layer, layer.adapters[name]).detach().float())
    return layer.factors[name]


def row_norms_sq(w: Tensor) -> Tensor:
    """‖wᵢ‖² of each row of w (out, fan_in), in at least fp32."""
    return w.to(torch.promote_types(w.dtype, torch.float32)).pow(2).sum(1)


@torch.no_grad()
def norms(w: Tensor, w_sq: Tensor, a: Tensor, up: Tensor, scale: float) -> Tensor:
    """‖W0 + s·up·A‖ of each row, in w_sq's dtype. w: W0 (out, fan_in) in its own dtype (a view will do);
    w_sq: `row_norms_sq(w)`; a: (R, fan_in); up: (out, R)."""
    dtype = w_sq.dtype
    cross = (w @ a.to(w.dtype).t()).to(dtype)  # (out, R): W0·Aᵀ
    a, up = a.to(dtype), up.to(dtype)
    gram = a @ a.t()  # (R, R)
    sq = w_sq + (2 * scale) * (up * cross).sum(1) + scale ** 2 * ((up @ gram) * up).sum(1)
    return sq.clamp_min(0).sqrt()


def add_update(layer: nn.Module, adapter: nn.Module, x: Tensor, y: Tensor, base: Callable[[Tensor], Tensor]) -> Tensor:
    """h for the base's output y on input x (see the module docstring); `base` runs the base layer again, on
    dropped-out inputs while training with dropout."""
    g = layer.geometry
    shape = (-1, 1, 1) if g.kind == "conv2d" else (-1,)  # f and the bias along the outputs of y
    f = factor(layer, adapter).to(y.dtype).view(shape)
    bias = getattr(layer.base, "bias", None)
    bias = None if bias is None else bias.to(y.dtype).view(shape)
    p = adapter.config.dropout if adapter.training and g.kind != "embedding" else 0.0
    if p > 0:
        x = F.dropout(x, p, training=True)
        yd = base(x)
        yd = yd if bias is None else yd - bias  # W0·d(x)
        return y - yd + f * _lora(adapter, x, yd)
    z = _lora(adapter, x, y if bias is None else y - bias)  # W0·x + s·B·A·x
    return f * z if bias is None else torch.addcmul(bias, f, z)


def _lora(adapter: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """y + s·B·A·x, x taken as it is (no dropout)."""
    if adapter.geometry.kind in ("linear", "conv1d"):
        return fused.add_update(adapter, x, y, dropout=False)
    return y + adapter(x, dropout=False).to(y.dtype)

"""PiSSA and OLoRA: adapters that start from W0's own principal directions, and leave W0 minus them in the base.

    PiSSA (Meng et al. 2024, arXiv 2404.02948): W0 = U·S·Vᵀ; B0 = U_r·√(S_r/s), A0 = √(S_r/s)·V_rᵀ — the exact SVD
        ("pissa"), or torch.svd_lowrank with K subspace iterations ("pissa_niter_K");
    OLoRA (Büyükakyüz 2024, arXiv 2406.01775): W0 = Q·R; B0 = Q[:, :r], A0 = R[:r];

then W0 ← W0 − s·B0·A0, so the model still computes what it did. Both as PEFT's `init_lora_weights` does them,
on the (out, in) weight of a Linear or Conv1D base.

What such an adapter means depends on the base it is saved for. For the original base it is the change
W0 − s·B0·A0 + s·B·A − W0 = s·[B, −B0]·[A; A0], a plain LoRA of rank 2r (PEFT's
`path_initial_model_for_weight_conversion`), which `save_adapter` writes by default and which loads onto an
unmodified base; for the residual base it is A and B themselves (`save_adapter(..., residual=True)`). The initial
A0 and B0 stay on the adapter (buffers `initial_a`, `initial_b`, outside its state_dict) for that conversion
and to give W0 back when the adapter is deleted.

Nothing here imports the rest of lorakit but digest.py: a layer is anything with base, geometry, adapters,
base_sha and merged.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .digest import base_digest

INITS: tuple[str, ...] = ("pissa", "olora")  # and "pissa_niter_K", K ≥ 1


def is_residual(init: object) -> bool:
    """Whether an init replaces W0 by a residual: "pissa", "pissa_niter_K" (K ≥ 1) or "olora"."""
    return isinstance(init, str) and (init in INITS or re.fullmatch(r"pissa_niter_[1-9]\d*", init) is not None)


def holder(layer: nn.Module) -> str | None:
    """The adapter whose initialisation left W0 a residual on this layer, or None."""
    adapters = getattr(layer, "adapters", {})
    return next((n for n, a in adapters.items() if getattr(a, "initial_a", None) is not None), None)


def check(layer: nn.Module, kind: str, init: str, slices: object, quantized: bool) -> None:
    """Refuse what a residual initialisation cannot do here, before anything changes: `layer` is the module a
    new adapter with `init` goes on (a LoRA layer or the plain base)."""
    if (owner := holder(layer)) is not None:
        raise ValueError(f"its weight is the residual that adapter {owner!r}'s {init_of(layer, owner)} initialisation "
                         f"left (W0 − s·B0·A0), not W0; delete {owner!r} (which restores W0) or adapt a fresh model")
    if not is_residual(init):
        return
    what = "PiSSA" if init.startswith("pissa") else "OLoRA"
    if kind not in ("linear", "conv1d") or slices is not None or quantized:
        case = (f"a {kind} layer" if kind not in ("linear", "conv1d") else
                "output slices" if slices is not None else "a 4-bit base")
        raise TypeError(f"{what} initialises from the SVD/QR of a whole float Linear or Conv1D weight, as PEFT does, "
                        f"not {case}; initialise on the float model and quantize the residual, or use init='kaiming'")
    if getattr(layer, "adapters", None):
        raise ValueError(f"{what} replaces W0 by a residual, and this layer already has adapters "
                         f"({', '.join(layer.adapters)}) trained against W0; put it on a layer of its own")


def init_of(layer: nn.Module, name: str) -> str:
    return layer.adapters[name].config.init


@torch.no_grad()
def init(layer: nn.Module, adapter: nn.Module) -> None:
    """For a fresh adapter whose init is residual: A0, B0 from W0 as its init says, A ← A0, B ← B0,
    W0 ← W0 − s·B0·A0 (in at least fp32, cast back). The base's digest is taken first, so files still name
    the original W0. Nothing for other inits, or on the meta device."""
    if not is_residual(adapter.config.init) or adapter.lora_a.device.type == "meta":
        return
    base_digest(layer)
    w = layer.base.weight
    transposed = layer.geometry.kind == "conv1d"  # stored (in, out)
    w0 = (w.t() if transposed else w).to(torch.promote_types(w.dtype, torch.float32))  # (out, in)
    r, s, how = adapter.config.r, adapter.scale, adapter.config.init
    if how == "olora":
        q, rr = torch.linalg.qr(w0)
        b0, a0 = q[:, :r].contiguous(), rr[:r].contiguous()
    else:
        if how == "pissa":
            u, sv, vh = torch.linalg.svd(w0, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r] / s, vh[:r]
        else:
            u, sv, v = torch.svd_lowrank(w0, r, niter=int(how.rsplit("_", 1)[1]))
            sv, vh = sv / s, v.t()
        a0, b0 = torch.diag(sv.sqrt()) @ vh, u @ torch.diag(sv.sqrt())
    adapter.lora_a.copy_(a0)
    adapter.lora_b.copy_(b0)
    adapter.register_buffer("initial_a", adapter.lora_a.detach().clone(), persistent=False)
    adapter.register_buffer("initial_b", adapter.lora_b.detach().clone(), persistent=False)
    rest = w0 - s * b0 @ a0
    w.copy_(rest.t() if transposed else rest)


@torch.no_grad()
def restore(layer: nn.Module, name: str) -> None:
    """W0 ← W0 + s·B0·A0: the weight as it was before adapter `name`'s residual initialisation."""
    adapter = layer.adapters[name]
    delta = adapter.scale * adapter.initial_b.to(torch.float64) @ adapter.initial_a.to(torch.float64)
    w = layer.base.weight
    w.copy_(w.to(torch.float64) + (delta.t() if layer.geometry.kind == "conv1d" else delta))


def for_original_base(adapter: nn.Module, a: Tensor, b: Tensor) -> tuple[int, float, Tensor, Tensor]:
    """The adapter as a plain LoRA for the original W0: (rank 2r, alpha keeping the scale, [A; A0], [B, −B0])."""
    r = 2 * a.shape[0]
    alpha = adapter.scale * (r ** 0.5 if adapter.config.rslora else r)
    a0, b0 = adapter.initial_a.to(a.device, a.dtype), adapter.initial_b.to(b.device, b.dtype)
    return r, alpha, torch.cat([a, a0.view_as(a)]), torch.cat([b, -b0], dim=1)

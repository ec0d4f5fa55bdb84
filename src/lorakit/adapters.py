"""Many adapters over one frozen base: list, switch, disable, delete, combine, mix within a batch.

Each `LoraLayer` holds its adapters by name, and so does each `SavedModule` (its copies); these functions act
on all of them at once. An adapter may cover only some layers; where it is absent, switching to it
leaves the layer at its base.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from . import mixed, residual
from .layers import LoraAdapter, LoraConfig, LoraLayer, SavedModule


def outside_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """`model` and its modules, not descending into adapters (each holder's `adapters`): the base model's
    modules, the LoRA layers and the modules_to_save holders — a walk that stays short however many
    adapters the model holds."""
    yield model
    for key, child in model.named_children():
        if not (key == "adapters" and isinstance(model, (LoraLayer, SavedModule))):
            yield from outside_adapters(child)


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter outside the adapters; the adapters keep their state."""
    for m in outside_adapters(model):
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)


def holders(model: nn.Module) -> list[LoraLayer | SavedModule]:
    """Every module of `model` that holds adapters: LoRA layers and modules_to_save copies."""
    return [m for m in outside_adapters(model) if isinstance(m, (LoraLayer, SavedModule))]


def check_name(name: object) -> None:
    """An adapter's name keys a ModuleDict: a non-empty string without dots."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer in the model, by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def list_adapters(model: nn.Module) -> list[str]:
    """Adapter names on the model, in the order they were added."""
    return list(dict.fromkeys(n for m in holders(model) for n in m.adapters))


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name, or None when none is active or adapters are disabled."""
    active = {m.active for m in holders(model) if not m.disabled and m.active is not None}
    return active.pop() if len(active) == 1 else None


def _require(model: nn.Module, name: str) -> None:
    names = list_adapters(model)
    if name not in names:
        raise ValueError(f"no adapter {name!r} on {type(model).__name__}; adapters: {', '.join(names) or 'none'}")


def _refuse_merged(model: nn.Module, action: str) -> None:
    merged = sorted({n for m in holders(model) if isinstance(m, LoraLayer) for n in m.merged})
    if merged:
        raise ValueError(f"cannot {action}: adapter(s) {', '.join(merged)} are merged into the base weights; "
                         f"call lorakit.unmerge(model) first")


def _refuse_residual(model: nn.Module, action: str) -> None:
    owners = sorted({n for m in holders(model) if (n := residual.holder(m)) is not None})
    if owners:
        raise ValueError(f"cannot {action}: adapter(s) {', '.join(owners)} left their layers' W0 a residual (PiSSA/OLoRA "
                         f"initialisation), so the base model is not there to run; delete them (which gives W0 back), "
                         f"or save them and load them onto a fresh base")


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the active adapter everywhere (and enable adapters)."""
    _require(model, name)
    _refuse_merged(model, f"switch to adapter {name!r}")
    for m in holders(model):
        m.active = name if name in m.adapters else None
        m.disabled = False


def disable_adapters(model: nn.Module) -> None:
    """Run the model as its base: outputs equal the base model's exactly until `enable_adapters`."""
    _refuse_merged(model, "disable adapters")
    _refuse_residual(model, "disable adapters")
    for m in holders(model):
        m.disabled = True


def enable_adapters(model: nn.Module) -> None:
    for m in holders(model):
        m.disabled = False


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter's weights from every layer. If it was active, no adapter is active after. A PiSSA or
    OLoRA adapter gives the base back the W0 its initialisation took from it."""
    _require(model, name)
    merged = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.merged]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into {merged[0]} and others; unmerge before deleting it")
    for m in holders(model):
        if name in m.adapters:
            if residual.holder(m) == name:
                residual.restore(m, name)
            del m.adapters[name]
        if m.active == name:
            m.active = None


@contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Within the block, row i of every batch uses adapter names[i] (None: the base alone).

    One forward serves many adapters: each LoRA layer keeps its adapters side by side and applies each
    row's own with a few whole-batch matmuls (see `lorakit.mixed`). Inference only: dropout is not applied.

        with lorakit.mixed_batch(model, ["alice", "bob", None, "alice"]):
            logits = model(input_ids).logits   # input_ids: (4, T)
    """
    known = set(list_adapters(model))
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter(s) {', '.join(map(repr, unknown))}; adapters: {', '.join(sorted(known))}")
    _refuse_merged(model, "run a mixed batch")
    if None in names:
        _refuse_residual(model, "run rows with no adapter")
    layers = holders(model)
    rows = mixed.Rows(names, mixed.slots_of(model, layers))
    for m in layers:
        m.rows = rows
    try:
        yield
    finally:
        for m in layers:
            m.rows = None


def combine_adapters(
    model: nn.Module,
    weights: dict[str, float],
    name: str,
    method: Literal["linear", "svd"] = "linear",
    r: int | None = None,
) -> None:
    """Add adapter `name` whose update is Σ wᵢ·ΔWᵢ over the adapters in `weights`.

    linear: exact — A = [w₁s₁A₁; w₂s₂A₂; …] and B = [up₁ up₂ …], so its rank is the sum of ranks.
    svd: the best rank-`r` approximation (Eckart–Young) of Σ wᵢ·ΔWᵢ per layer, B = U·√S, A = √S·Vᵀ.
    The new adapter has scale 1 (alpha = rank), is frozen, and is not made active.
    """
    if not weights:
        raise ValueError("weights is empty; give {adapter name: weight}")
    for n, w in weights.items():
        _require(model, n)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weight of adapter {n!r} must be a finite number, got {w!r}")
    check_name(name)
    if name in list_adapters(model):
        raise ValueError(f"adapter {name!r} already exists; choose a new name")
    doras = sorted({n for _, m in lora_layers(model) for n in weights
                    if n in m.adapters and m.adapters[n].magnitude is not None})
    if doras:
        raise ValueError(f"cannot combine DoRA adapter(s) {', '.join(map(repr, doras))}: DoRA rescales the whole "
                         f"weight, so its change is not a low-rank ΔW that adds up; merge one at a time instead")
    if method not in ("linear", "svd"):
        raise ValueError(f"method must be 'linear' or 'svd', got {method!r}")
    if method == "svd" and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"method='svd' needs a rank r >= 1, got {r!r}")
    factors = {}
    for layer_name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)):
        parts = [(w, layer.adapters[n]) for n, w in weights.items() if n in layer.adapters]
        if not parts:
            continue
        ups = [a.up().detach().float() for _, a in parts]  # (out, rᵢ)
        downs = [(w * a.scale) * a.lora_a.detach().float().flatten(1) for w, a in parts]  # (rᵢ, fan_in)
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        if method == "svd":
            u, sv, vh = torch.linalg.svd(up @ down, full_matrices=False)
            k = min(r, sv.numel())
            root = sv[:k].sqrt()
            up, down = u[:, :k] * root, root[:, None] * vh[:k]
        try:
            LoraAdapter(layer.geometry, LoraConfig(r=up.shape[1]), device="meta")
        except ValueError as e:
            raise ValueError(f"combined adapter on {layer_name!r}: {e}; use method='svd' with a smaller r") from None
        factors[layer_name] = (layer, up, down)
    for layer_name, (layer, up, down) in factors.items():
        rank = up.shape[1]
        adapter = layer.add(name, LoraConfig(r=rank, alpha=rank))
        with torch.no_grad():
            adapter.lora_a.copy_(down.view_as(adapter.lora_a))
            adapter.lora_b.copy_(up)
        adapter.requires_grad_(False)
        if layer.active == name:
            layer.active = None

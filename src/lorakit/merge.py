"""Merge adapters into the frozen weights (no extra inference cost) and take them out again.

Merging is explicit — never a side effect of `train()` or `eval()`. W ← W + s·B·A is computed in fp32
and cast back to W's dtype.
"""

from __future__ import annotations

from torch import nn

from .inject import _set_submodule
from .layers import LoraLayer, SavedModule


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer in the model, by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _require_lora(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers; call lorakit.inject first")
    return layers


def merge(model: nn.Module, adapter: str | None = None) -> None:
    """Fold an adapter (default: each layer's active one) into the base weights. Idempotent.

    A weight shared with another module (tied input and output embeddings) is refused: merging
    would change the other module too."""
    layers = _require_lora(model)
    _refuse_tied(model, layers)
    for name, layer in layers:
        chosen = adapter if adapter is not None else layer.active
        if chosen is None:
            continue
        if chosen not in layer.adapters:
            raise ValueError(f"layer {name!r} has no adapter {chosen!r}; it has: {', '.join(layer.adapters)}")
        layer.merge(chosen)


def _refuse_tied(model: nn.Module, layers: list[tuple[str, LoraLayer]]) -> None:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and not isinstance(module, LoraLayer):
            owners.setdefault(id(w), []).append(name)
    for name, layer in layers:
        others = [n for n in owners.get(id(layer.base.weight), []) if n != f"{name}.base"]
        if others:
            raise ValueError(f"cannot merge into {name!r}: its weight is shared with {', '.join(others)} "
                             f"(tied weights), which merging would change too; keep this adapter unmerged "
                             f"or untie the weights first")


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights, restoring W0 (to fp32 rounding)."""
    for _, layer in _require_lora(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Merge, then put each original layer back in place of its LoRA wrapper.

    The returned model (the same object) is made only of the original layer types — a module in
    `modules_to_save` is replaced by the adapter's trained copy — and its state_dict loads with
    strict=True into a freshly built base model."""
    merge(model, adapter)
    for name, layer in lora_layers(model):
        _set_submodule(model, name, layer.base)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, SavedModule)]:
        chosen = adapter if adapter is not None else module.active
        _set_submodule(model, name, module.adapters[chosen] if chosen in module.adapters else module.original)
    return model

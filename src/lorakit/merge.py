"""Merge adapters into the frozen weights (no extra inference cost) and take them out again.

Merging is explicit — never a side effect of `train()` or `eval()`. W ← W + s·B·A is computed in fp32
and cast back to W's dtype. Into a 4-bit (NF4) base it cannot be exact: W0 is dequantized, W0 + s·ΔW
formed in fp32 and quantized again, and the error that adds is returned and warned, never silent;
`merge_and_unload(model, dtype=torch.float32)` merges into a float copy instead, exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .adapters import lora_layers
from .files import base_digest
from .inject import replace_module
from .layers import LoraLayer, SavedModule
from .qlora import dequantize_all


@dataclass(frozen=True)
class MergeReport:
    """What a merge changed beyond W0 + s·ΔW. Empty for float bases (exact to fp32 rounding).

    requant_error: per layer with a 4-bit base, max |dequantize(W') - (W0 + s·ΔW)| after re-quantizing.
    output_error: with a probe batch, max |merged output - unmerged output| (e.g. logits)."""

    requant_error: dict[str, float] = field(default_factory=dict)
    output_error: float | None = None

    @property
    def max_weight_error(self) -> float:
        return max(self.requant_error.values(), default=0.0)

    def __str__(self) -> str:
        if not self.requant_error:
            return "lorakit: merged exactly (float base weights)"
        out = "" if self.output_error is None else f", output changed by up to {self.output_error:.3g} on the probe batch"
        return (f"lorakit: merged into {len(self.requant_error)} NF4 layers by dequantize → add → re-quantize: "
                f"weights off W0 + s·ΔW by up to {self.max_weight_error:.3g} (max abs){out}")


def _require_lora(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers; call lorakit.inject first")
    return layers


def merge(model: nn.Module, adapter: str | None = None, probe: Tensor | dict | None = None) -> MergeReport:
    """Fold an adapter (default: each layer's active one) into the base weights. Idempotent.

    A weight shared with another module (tied input and output embeddings) is refused: merging
    would change the other module too. On 4-bit bases the re-quantization error is returned and
    warned; with `probe` (an input tensor, or a dict of keyword inputs) the report also holds the
    largest change of the model's output (`.logits` when it has them) that merging caused."""
    layers = _require_lora(model)
    _refuse_tied(model, layers)
    plan = []
    for name, layer in layers:
        chosen = adapter if adapter is not None else layer.active
        if chosen is None:
            continue
        if chosen not in layer.adapters:
            raise ValueError(f"layer {name!r} has no adapter {chosen!r}; it has: {', '.join(layer.adapters)}")
        plan.append((name, layer, chosen))
    before = _run_probe(model, probe) if probe is not None else None
    errors = {}
    for name, layer, chosen in plan:
        base_digest(layer)  # an adapter file names W0 as its base: take its digest before W0 changes
        error = layer.merge(chosen)
        if error is not None:
            errors[name] = error
    output_error = None
    if before is not None:
        output_error = (_run_probe(model, probe).float() - before.float()).abs().max().item()
    report = MergeReport(errors, output_error)
    if errors:
        warnings.warn(f"{report}; unmerge is no longer possible — for an exact merge use "
                      f"merge_and_unload(model, dtype=torch.float32)", stacklevel=2)
    return report


@torch.no_grad()
def _run_probe(model: nn.Module, probe: Tensor | dict) -> Tensor:
    out = model(**probe) if isinstance(probe, dict) else model(probe)
    return getattr(out, "logits", out)


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


def merge_and_unload(model: nn.Module, adapter: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge, then put each original layer back in place of its LoRA wrapper.

    The returned model (the same object) is made only of the original layer types — a module in
    `modules_to_save` is replaced by the adapter's trained copy — and its state_dict loads with
    strict=True into a freshly built base model. With `dtype` (e.g. torch.float32 or bfloat16) every
    4-bit layer of the model is first replaced by an fp32 nn.Linear holding its dequantized weight,
    the adapter is added to it exactly, and those layers are then cast to `dtype`: no 4-bit layer
    is left. Without it, a 4-bit base is merged by re-quantizing (see `merge`)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype such as torch.float32 or torch.bfloat16, got {dtype!r}")
    dequantized = dequantize_all(model) if dtype is not None else []
    merge(model, adapter)
    for linear in dequantized:
        linear.to(dtype)
    for name, layer in lora_layers(model):
        replace_module(model, name, layer.base)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, SavedModule)]:
        chosen = adapter if adapter is not None else module.active
        replace_module(model, name, module.adapters[chosen] if chosen in module.adapters else module.original)
    return model

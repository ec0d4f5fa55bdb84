"""Model surgery: wrap the target layers in `LoraLayer`, freeze the rest, report what changed.

`inject` checks everything before it changes anything (`check_plan`), then carries the plan out
(`apply_plan`) and freezes all but the new adapter (`freeze`). Which modules a target names is targets.py's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

from torch import nn

from . import residual
from .adapters import check_name, freeze_base, holders, outside_adapters
from .layers import Geometry, LoraAdapter, LoraConfig, LoraLayer, SavedModule, Slices, base_of
from .quant import is_quantized
from .summary import InjectReport, Replacement
from .targets import Target, match_suffixes, plan_layers, resolve_targets

def inject(
    model: nn.Module,
    targets: Target | Iterable[Target],
    config: LoraConfig | None = None,
    *,
    rank_pattern: Mapping[str, int] | None = None, alpha_pattern: Mapping[str, float] | None = None,
    modules_to_save: Iterable[str] = (),
    adapter: str = "default",
    dry_run: bool = False,
    **settings,
) -> InjectReport:
    """Swap the target layers of `model` for LoRA layers in place and freeze everything else.

    config: the adapter's settings (default `LoraConfig()`); any LoraConfig field given by keyword (`r=8, alpha=16,
    dropout=0.05`, ...) replaces the config's, and rank_pattern, alpha_pattern ({regex: r}, {regex: alpha}) change r
    and alpha on the layers they name, as PEFT's do (`targets.plan_layers`). Trainable afterwards: B, A (unless
    config.train_a is False), the modules named in `modules_to_save` (by suffix; the adapter trains its own copy)
    and the biases that `config.bias` asks for; other adapters keep their state. On a model that already has
    adapters, a new `adapter` name adds a second adapter to the layers it targets and makes it active. Returns a
    report of every replaced module; with `dry_run=True` the model is left untouched. Raises ValueError for a target
    or pattern that matches nothing (naming the closest names), TypeError for a match LoRA cannot adapt or an unknown
    setting, and ValueError for a layer that already has this adapter or a bad setting — before changing anything.
    """
    config = dataclasses.replace(config or LoraConfig(), **settings)
    saved = match_suffixes(model, modules_to_save)
    plan = plan_layers(resolve_targets(model, targets, exclude=saved), config, rank_pattern, alpha_pattern)
    report = InjectReport(check_plan(plan, saved, model, adapter), config, adapter, saved, dry_run)
    if not dry_run:
        apply_plan(model, plan, saved, adapter)
        for module in holders(model):
            module.active = adapter if adapter in module.adapters else None
        freeze(model, adapter, bias=config.bias)
    return report


Plan = dict[str, tuple[nn.Module, LoraConfig, Slices | None]]


def check_plan(plan: Plan, saved: list[str], model: nn.Module, adapter: str) -> list[Replacement]:
    """Validate a surgery plan without changing anything; return what it would replace.

    Each adapter is built on the meta device, so a bad rank or shape raises here. An adapter's name is a
    non-empty string without dots (it keys a ModuleDict). A module that trains in
    full (`saved`) may not hold or sit inside a LoRA target or another such module: its copy would share the
    target's tensors, and the adapter could never be saved."""
    check_name(adapter)
    for outer in saved:
        for inner in [*plan, *saved]:
            if inner == outer and inner in plan:
                raise ValueError(f"{inner} is both a LoRA target and in modules_to_save; choose one")
            if inner.startswith(outer + "."):
                what = "LoRA target" if inner in plan else "module in modules_to_save"
                raise ValueError(f"modules_to_save {outer!r} contains the {what} {inner!r}: the two would share "
                                 f"tensors; train {outer!r} in full or adapt {inner!r}, not both")
    for name in plan:
        if inside := [s for s in saved if s.startswith(name + ".")]:
            raise ValueError(f"LoRA target {name!r} contains {inside[0]!r} from modules_to_save; choose one")
    replaced = []
    for name, (module, config, slices) in plan.items():
        if isinstance(module, LoraLayer) and adapter in module.adapters:
            raise ValueError(f"module {name!r} is already a LoRA layer with adapter {adapter!r} (adapters: "
                             f"{', '.join(module.adapters)}); use another adapter name or merge_and_unload first")
        g = Geometry.of(base_of(module))
        a_shape, b_shape = LoraAdapter.shapes(g, config, slices)
        residual.check(module, g.kind, config.init, slices, is_quantized(base_of(module)))
        magnitude = g.out_features if config.dora else 0
        replaced.append(Replacement(name, g.kind, g.in_features, g.out_features,
                                    math.prod(a_shape) + math.prod(b_shape) + magnitude, slices, config))
    for name in saved:
        module = model.get_submodule(name)
        if isinstance(module, SavedModule) and adapter in module.adapters:
            raise ValueError(f"module {name!r} already has a trainable copy for adapter {adapter!r}")
    return replaced


def apply_plan(model: nn.Module, plan: Plan, saved: list[str], adapter: str, built: dict | None = None) -> None:
    """Carry out a checked plan: wrap or extend each layer, give each saved module a copy. `built` may hold,
    by module name, the adapter (or saved copy) already made for it (`lorakit.files.prepare_adapter`)."""
    built = built or {}
    for name, (module, config, slices) in plan.items():
        layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
        layer.add(adapter, config, slices, built.get(name))
        if layer is not module:
            replace_module(model, name, layer)
    for name in saved:
        module = model.get_submodule(name)
        holder = module if isinstance(module, SavedModule) else SavedModule(module)
        holder.add(adapter, built.get(name))
        if holder is not module:
            replace_module(model, name, holder)


def freeze(model: nn.Module, adapter: str = "default", bias: str = "none") -> None:
    """Make `adapter` trainable (its B, its A unless its config has train_a=False, its copies of saved modules;
    found by type) with the biases that `bias` names; freeze the base model. Other adapters are left as they are."""
    freeze_base(model)
    modules = list(outside_adapters(model))
    frozen_originals = {id(p) for m in modules if isinstance(m, SavedModule) for p in m.original.parameters()}
    adapted = {id(m.base) for m in modules if isinstance(m, LoraLayer) and adapter in m.adapters}
    for m in modules:
        if isinstance(m, (LoraLayer, SavedModule)) and adapter in m.adapters:
            m.adapters[adapter].requires_grad_(True)
            if isinstance(m, LoraLayer):  # LoRA-FA: A keeps its initial value
                m.adapters[adapter].lora_a.requires_grad_(m.adapters[adapter].config.train_a)
        b = getattr(m, "bias", None)
        if not isinstance(b, nn.Parameter) or id(b) in frozen_originals:
            continue
        if bias == "all" or (bias == "lora_only" and id(m) in adapted):
            b.requires_grad_(True)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at `name` (a dotted path from `get_submodule`) in place of what is there."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

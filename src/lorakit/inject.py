"""Model surgery: choose layers, wrap them in `LoraLayer`, freeze the rest, report what changed.

Targets, in any mix inside a list:
- a name suffix, `"query"`, matches `bert.encoder.layer.0.attention.self.query` (whole components);
- a layer type, `nn.Linear`, matches every instance;
- a compiled regex, `re.compile(r".*\\.(q|v)_proj")`, matches full names (`fullmatch`);
- a dict of fused-projection slices, `{"c_attn": ("q", "v")}` (thirds named q, k, v) or
  `{"qkv": ((0, 512), (768, 1024))}` (explicit [start, stop) output ranges).
A plain string other than `"all-linear"` is a regex, as in PEFT; `"all-linear"` is every Linear and
Conv1D except the output head.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from .layers import SUPPORTED, Geometry, LoraAdapter, LoraConfig, LoraLayer, SavedModule, Slices, check_name, kind_of

QKV = ("q", "k", "v")
Target = str | type | re.Pattern | Mapping[str, tuple]


@dataclass(frozen=True)
class Replacement:
    """One module swapped for a LoRA layer."""

    name: str
    kind: str
    in_features: int
    out_features: int
    params: int
    slices: Slices | None = None


@dataclass(frozen=True)
class InjectReport:
    """Everything `inject` replaced (or, with dry_run, would replace)."""

    replaced: list[Replacement]
    config: LoraConfig
    adapter: str
    modules_to_save: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def params_added(self) -> int:
        return sum(r.params for r in self.replaced)

    def __str__(self) -> str:
        c = self.config
        head = "would replace" if self.dry_run else "replaced"
        lines = [f"lorakit: {head} {len(self.replaced)} modules with LoRA adapter {self.adapter!r} "
                 f"(r={c.r}, alpha={c.r if c.alpha is None else c.alpha}, dropout={c.dropout}, "
                 f"scale={c.scale:g})"]
        width = max([len(r.name) for r in self.replaced] + [6])
        lines.append(f"  {'module':<{width}}  {'kind':<9}  {'in':>6}  {'out':>6}  {'params':>9}  slices")
        for r in self.replaced:
            sl = "-" if r.slices is None else ",".join(f"{a}:{b}" for a, b in r.slices)
            lines.append(f"  {r.name:<{width}}  {r.kind:<9}  {r.in_features:>6}  {r.out_features:>6}  "
                         f"{r.params:>9,}  {sl}")
        lines.append(f"  adapter parameters added: {self.params_added:,}")
        if self.modules_to_save:
            lines.append(f"  fully trainable (modules_to_save): {', '.join(self.modules_to_save)}")
        return "\n".join(lines)


def inject(
    model: nn.Module,
    targets: Target | Iterable[Target],
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    *,
    rslora: bool = False,
    init: str = "kaiming",
    bias: str = "none",
    modules_to_save: Iterable[str] = (),
    adapter: str = "default",
    dry_run: bool = False,
) -> InjectReport:
    """Swap the target layers of `model` for LoRA layers in place and freeze everything else.

    Trainable afterwards: the new A and B, the modules named in `modules_to_save` (by suffix; the
    adapter trains its own copy), and the biases that `bias` asks for; other adapters keep their
    state. On a model that already has adapters, a new `adapter` name adds a second adapter to the
    layers it targets and makes it active. Returns a report of every replaced module; with
    `dry_run=True` the model is left untouched. Raises ValueError for a target that matches nothing
    (naming the closest module names), TypeError for a match LoRA cannot adapt, and ValueError for a
    layer that already has this adapter or a bad setting — always before changing anything.
    """
    config = LoraConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init, bias=bias)
    if isinstance(modules_to_save, str):
        raise TypeError(f"modules_to_save must be a list of module-name suffixes, got the string {modules_to_save!r}")
    saved = list(dict.fromkeys(_match_modules_to_save(model, list(modules_to_save))))
    chosen = resolve_targets(model, targets, exclude=saved)
    plan = {name: (module, config, slices) for name, (module, slices) in chosen.items()}
    report = InjectReport(check_plan(plan, saved, model, adapter), config, adapter, saved, dry_run)
    if not dry_run:
        apply_plan(model, plan, saved, adapter)
        for module in model.modules():
            if isinstance(module, (LoraLayer, SavedModule)):
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
        inside = [s for s in saved if s.startswith(name + ".")]
        if inside:
            raise ValueError(f"LoRA target {name!r} contains {inside[0]!r} from modules_to_save; choose one")
    replaced = []
    for name, (module, config, slices) in plan.items():
        if isinstance(module, LoraLayer) and adapter in module.adapters:
            raise ValueError(f"module {name!r} is already a LoRA layer with adapter {adapter!r} (adapters: "
                             f"{', '.join(module.adapters)}); use another adapter name or merge_and_unload first")
        base = module.base if isinstance(module, LoraLayer) else module
        a = LoraAdapter(Geometry.of(base), config, slices, device="meta")
        replaced.append(Replacement(name, a.geometry.kind, a.geometry.in_features, a.geometry.out_features,
                                    sum(p.numel() for p in a.parameters()), a.slices))
    for name in saved:
        module = model.get_submodule(name)
        if isinstance(module, SavedModule) and adapter in module.adapters:
            raise ValueError(f"module {name!r} already has a trainable copy for adapter {adapter!r}")
    return replaced


def apply_plan(model: nn.Module, plan: Plan, saved: list[str], adapter: str) -> None:
    """Carry out a checked plan: wrap or extend each layer, give each saved module a copy."""
    for name, (module, config, slices) in plan.items():
        layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
        layer.add(adapter, config, slices)
        if layer is not module:
            _set_submodule(model, name, layer)
    for name in saved:
        module = model.get_submodule(name)
        holder = module if isinstance(module, SavedModule) else SavedModule(module)
        holder.add(adapter)
        if holder is not module:
            _set_submodule(model, name, holder)


def freeze(model: nn.Module, adapter: str = "default", bias: str = "none") -> None:
    """Make `adapter` trainable (its A and B and its copies of saved modules, found by type) with
    the biases that `bias` names; freeze the base model. Other adapters are left as they are."""
    owned: set[int] = set()  # parameters that belong to some adapter
    for m in model.modules():
        if isinstance(m, (LoraLayer, SavedModule)):
            owned.update(id(p) for p in m.adapters.parameters())
    for p in model.parameters():
        if id(p) not in owned:
            p.requires_grad_(False)
    frozen_originals = {id(p) for m in model.modules() if isinstance(m, SavedModule) for p in m.original.parameters()}
    adapted = {id(m.base) for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.adapters}
    for m in model.modules():
        if isinstance(m, (LoraLayer, SavedModule)) and adapter in m.adapters:
            m.adapters[adapter].requires_grad_(True)
        b = getattr(m, "bias", None)
        if not isinstance(b, nn.Parameter) or id(b) in owned or id(b) in frozen_originals:
            continue
        if bias == "all" or (bias == "lora_only" and id(m) in adapted):
            b.requires_grad_(True)


def resolve_targets(
    model: nn.Module, targets: Target | Iterable[Target], exclude: Iterable[str] = ()
) -> dict[str, tuple[nn.Module, Slices | None]]:
    """Map each module name the targets select to (module, output slices or None)."""
    modules = _candidate_modules(model)
    excluded = set(exclude)
    if isinstance(targets, str):  # a bare string is a regex, as in PEFT; in a list it is a suffix
        entries = [targets if targets == "all-linear" else _BareRegex(targets)]
    elif isinstance(targets, (type, re.Pattern, Mapping)):
        entries = [targets]
    else:
        entries = list(targets)
    if not entries:
        raise ValueError("targets is empty; give module-name suffixes, layer types, a regex or 'all-linear'")
    chosen: dict[str, tuple[nn.Module, Slices | None]] = {}
    for entry in entries:
        if isinstance(entry, Mapping):
            for suffix, spec in entry.items():
                for name in _require(model, suffix, _suffix_matches(modules, suffix)):
                    _choose(chosen, name, modules[name], _parse_slices(name, modules[name], spec))
            continue
        if isinstance(entry, str) and entry == "all-linear":
            head = output_head(model)
            names = [n for n, m in modules.items() if kind_of(m) in ("linear", "conv1d") and m is not head
                     and not any(n == e or n.startswith(e + ".") for e in excluded)]
        elif isinstance(entry, str):
            names = _suffix_matches(modules, entry)
        elif isinstance(entry, (re.Pattern, _BareRegex)):
            names = [n for n in modules if re.fullmatch(entry.pattern, n)]
        elif isinstance(entry, type):
            names = [n for n, m in modules.items() if isinstance(m, entry)
                     or (isinstance(m, LoraLayer) and isinstance(m.base, entry))]
        else:
            raise TypeError(f"unsupported target {entry!r}; expected a name suffix, a layer type, a regex, "
                            f"'all-linear' or a dict of fused slices")
        for name in _require(model, entry, names):
            _choose(chosen, name, modules[name], None)
    order = {name: i for i, name in enumerate(modules)}
    return dict(sorted(chosen.items(), key=lambda item: order[item[0]]))


@dataclass(frozen=True)
class _BareRegex:
    pattern: str


def output_head(model: nn.Module) -> nn.Module | None:
    """The layer that produces the model's outputs, which 'all-linear' leaves alone.

    Hugging Face models name it through `get_output_embeddings()`; otherwise it is the last
    Linear or Conv1D registered (a classifier such as `classifier` or `fc3`)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        return head
    linears = [m for m in model.modules() if kind_of(m) in ("linear", "conv1d")]
    return linears[-1] if linears else None


def _candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules a target may select: everything except the insides of LoRA layers."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if name == "" or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (LoraLayer, SavedModule)):
            inside.append(name)
        out[name] = module
    return out


def _suffix_matches(modules: Mapping[str, nn.Module], suffix: str) -> list[str]:
    return [n for n in modules if n == suffix or n.endswith("." + suffix)]


def _require(model: nn.Module, target: object, names: list[str]) -> list[str]:
    """Refuse a target that selects nothing, pointing at the names the user probably meant."""
    if names:
        return names
    modules = _candidate_modules(model)
    if isinstance(target, type):
        present = sorted({type(m).__name__ for m in modules.values() if kind_of(m)})
        raise ValueError(f"target type {target.__name__} matches no module; adaptable types in the model: "
                         f"{', '.join(present) or 'none'}")
    text = target if isinstance(target, str) else getattr(target, "pattern", str(target))
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if kind_of(m)})
    close = difflib.get_close_matches(text, leaves, n=5, cutoff=0.5) or \
        difflib.get_close_matches(text, list(modules), n=5, cutoff=0.5)
    hint = f"closest module names: {', '.join(close)}" if close else f"adaptable module names: {', '.join(leaves[:20])}"
    if isinstance(target, _BareRegex) and _suffix_matches(modules, text):
        hint = f"a plain string is a regex over full module names; for a name suffix pass a list: [{text!r}]"
    raise ValueError(f"target {text!r} matches no module in {type(model).__name__}; {hint}")


def _choose(chosen: dict, name: str, module: nn.Module, slices: Slices | None) -> None:
    if kind_of(module) is None and not isinstance(module, LoraLayer):
        raise TypeError(f"target matched {name!r} of type {type(module).__name__}, which LoRA cannot adapt; "
                        f"supported: {SUPPORTED}")
    if name in chosen and chosen[name][1] != slices:
        raise ValueError(f"module {name!r} is selected twice with different output slices: "
                         f"{chosen[name][1]} and {slices}")
    chosen[name] = (module, slices)


def _parse_slices(name: str, module: nn.Module, spec: object) -> Slices:
    """('q', 'v') → thirds of the output; ((start, stop), ...) → explicit output ranges."""
    module = module.base if isinstance(module, LoraLayer) else module
    kind = kind_of(module)
    if kind not in ("linear", "conv1d"):
        raise TypeError(f"fused slices need a Linear or Conv1D, but {name!r} is {type(module).__name__}")
    out = Geometry.of(module).out_features
    if not isinstance(spec, (tuple, list)) or not spec:
        raise ValueError(f"slice spec for {name!r} must be a non-empty tuple such as ('q', 'v') or "
                         f"((0, 768), (1536, 2304)), got {spec!r}")
    if all(isinstance(s, str) for s in spec):
        bad = [s for s in spec if s not in QKV]
        if bad:
            raise ValueError(f"unknown slice name {bad[0]!r} for {name!r}; expected some of {QKV}")
        if out % 3:
            raise ValueError(f"{name!r} has {out} outputs, not divisible into q, k, v thirds; give (start, stop) ranges")
        third = out // 3
        ranges = [(QKV.index(s) * third, (QKV.index(s) + 1) * third) for s in spec]
    else:
        ranges = [tuple(s) for s in spec]
    ranges.sort()
    for i, rng in enumerate(ranges):
        ok = len(rng) == 2 and all(isinstance(v, int) for v in rng) and 0 <= rng[0] < rng[1] <= out
        if not ok or (i and rng[0] < ranges[i - 1][1]):
            raise ValueError(f"bad output slice {rng!r} for {name!r}: slices must be non-overlapping "
                             f"[start, stop) ranges within 0..{out}")
    return tuple(ranges)


def _match_modules_to_save(model: nn.Module, suffixes: list[str]) -> list[str]:
    modules = _candidate_modules(model)
    return [n for s in suffixes for n in _require(model, s, _suffix_matches(modules, s))]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@dataclass(frozen=True)
class Summary:
    """Parameter counts of a model; `str()` is the totals line."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def summary(model: nn.Module, print_fn=print) -> Summary:
    """Print every parameter (name, shape, trainable or frozen) and the totals line; return the counts.

    Shared (tied) parameters are counted once."""
    params = list(model.named_parameters())
    width = max([len(n) for n, _ in params] + [9])
    lines = [f"{'parameter':<{width}}  {'shape':<20}  status"]
    lines += [f"{n:<{width}}  {str(tuple(p.shape)):<20}  {'trainable' if p.requires_grad else 'frozen'}"
              for n, p in params]
    counts = Summary(sum(p.numel() for _, p in params if p.requires_grad), sum(p.numel() for _, p in params))
    lines.append(str(counts))
    print_fn("\n".join(lines))
    return counts

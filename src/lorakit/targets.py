"""Which modules a LoRA target names.

Targets, in any mix inside a list:
- a name suffix, `"query"`, matches `bert.encoder.layer.0.attention.self.query` (whole components);
- a layer type, `nn.Linear`, matches every instance;
- a compiled regex, `re.compile(r".*\\.(q|v)_proj")`, matches full names (`fullmatch`);
- a dict of fused-projection slices, `{"c_attn": ("q", "v")}` (thirds named q, k, v) or
  `{"qkv": ((0, 512), (768, 1024))}` (explicit [start, stop) output ranges).
A plain string other than `"all-linear"` is a regex, as in PEFT; `"all-linear"` is every Linear and
Conv1D except the output head. A target that matches nothing is refused, naming the closest module names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from .layers import SUPPORTED, Geometry, LoraLayer, SavedModule, Slices, base_of, kind_of

QKV = ("q", "k", "v")
Target = str | type | re.Pattern | Mapping[str, tuple]


def matches_suffix(name: str, suffix: str) -> bool:
    """Whether module `name` ends with the whole components `suffix` ("query" matches "a.b.query", not "a.subquery")."""
    return name == suffix or name.endswith("." + suffix)


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
    return [n for n in modules if matches_suffix(n, suffix)]


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
    module = base_of(module)
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
    return check_slices(sorted(ranges), out, name)


def check_slices(ranges, out: int, name: str) -> Slices:
    """Output slices as a LoRA layer takes them: sorted, non-overlapping [start, stop) pairs of integers
    within 0..out; ValueError naming the first that is not."""
    for i, rng in enumerate(ranges):
        ok = len(rng) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in rng) \
            and 0 <= rng[0] < rng[1] <= out
        if not ok or (i and rng[0] < ranges[i - 1][1]):
            raise ValueError(f"bad output slice {rng!r} for {name!r}: slices must be sorted, non-overlapping "
                             f"[start, stop) ranges within 0..{out}")
    return tuple(tuple(r) for r in ranges)


def match_suffixes(model: nn.Module, suffixes: Iterable[str]) -> list[str]:
    """The module names that the suffixes select (modules_to_save), each suffix required to match, in order."""
    modules = _candidate_modules(model)
    return list(dict.fromkeys(n for s in suffixes for n in _require(model, s, _suffix_matches(modules, s))))

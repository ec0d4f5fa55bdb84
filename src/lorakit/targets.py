"""Which modules a LoRA target names.

Targets, in any mix inside a list:
- a name suffix, `"query"`, matches `bert.encoder.layer.0.attention.self.query` (whole components);
- a layer type, `nn.Linear`, matches every instance;
- a compiled regex, `re.compile(r".*\\.(q|v)_proj")`, matches full names (`fullmatch`);
- a dict of fused-projection slices, `{"c_attn": ("q", "v")}` (thirds named q, k, v) or
  `{"qkv": ((0, 512), (768, 1024))}` (explicit [start, stop) output ranges).
A plain string other than `"all-linear"` is a regex, as in PEFT; `"all-linear"` is every Linear and
Conv1D except the output head. A target that matches nothing is refused, naming the closest module names.

Per-layer rank and alpha (`rank_pattern`, `alpha_pattern`) take PEFT's names and matching rule (`pattern_key`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from .layers import SUPPORTED, Geometry, LoraConfig, LoraLayer, SavedModule, Slices, base_of, kind_of

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
    close = _closest(text, leaves, list(modules))
    hint = f"closest module names: {', '.join(close)}" if close else f"adaptable module names: {', '.join(leaves[:20])}"
    if isinstance(target, _BareRegex) and _suffix_matches(modules, text):
        hint = f"a plain string is a regex over full module names; for a name suffix pass a list: [{text!r}]"
    raise ValueError(f"target {text!r} matches no module in {type(model).__name__}; {hint}")


def _closest(text: str, leaves: list[str], names: list[str]) -> list[str]:
    """Up to five names like `text`: among the last components of module names, else among the whole names."""
    return (difflib.get_close_matches(text, leaves, n=5, cutoff=0.5)
            or difflib.get_close_matches(text, names, n=5, cutoff=0.5))


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
    if isinstance(suffixes, str):
        raise TypeError(f"modules_to_save must be a list of module-name suffixes, got the string {suffixes!r}")
    modules = _candidate_modules(model)
    return list(dict.fromkeys(n for s in suffixes for n in _require(model, s, _suffix_matches(modules, s))))


def pattern_key(patterns: Collection[str], name: str) -> str | None:
    r"""The key of `patterns` that names module `name`, or None: PEFT's rule (`peft.utils.other.get_pattern_key`).

    A key is a regex that must match the whole name or a whole dotted suffix of it, `re.match(rf"(.*\.)?({key})$",
    name)`: "q_proj" names "model.layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj" names layer 1's but not
    layer 11's, and "^" ties a key to the full name. When several keys name a layer, the first in order wins; when
    none does, a key equal to the name itself (one the regex reading missed) still names it."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), name if name in patterns else None)


def check_patterns(rank_pattern: Mapping[str, int], alpha_pattern: Mapping[str, float]) -> None:
    """ValueError unless every key is a regex, every rank_pattern value a rank and every alpha_pattern value an
    alpha, as `LoraConfig` takes them."""
    for what, patterns, field in (("rank_pattern", rank_pattern, "r"), ("alpha_pattern", alpha_pattern, "alpha")):
        if not isinstance(patterns, Mapping):
            raise ValueError(f"{what} must be a dict of regex → {field}, got {patterns!r}")
        for key, value in patterns.items():
            if not isinstance(key, str):
                raise ValueError(f"{what} keys must be strings (regexes over module names), got {key!r}")
            if value is None:
                raise ValueError(f"{what}[{key!r}] must be a number, got None")
            try:
                re.compile(key)
                LoraConfig(**{field: value})
            except re.error as e:
                raise ValueError(f"{what} key {key!r} is not a valid regex ({e})") from None
            except ValueError as e:
                raise ValueError(f"{what}[{key!r}]: {e}") from None


def plan_layers(chosen: Mapping[str, tuple[nn.Module, Slices | None]], config: LoraConfig,
                rank_pattern: Mapping[str, int] | None = None, alpha_pattern: Mapping[str, float] | None = None
                ) -> dict[str, tuple[nn.Module, LoraConfig, Slices | None]]:
    """The chosen layers (`resolve_targets`) with each one's settings, as surgery takes them: `config`, with r from
    the rank_pattern key and alpha from the alpha_pattern key that name the layer (`pattern_key`). (An alpha of
    None stays None: each layer's alpha is then its own r.)

    ValueError (`check_patterns`) for a bad key or value, and for a key that sets no layer: one that names none of
    the chosen layers (the closest are named) or only layers that an earlier key already sets."""
    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    check_patterns(rank_pattern, alpha_pattern)
    names = list(chosen)
    configs = {name: config for name in names}
    for what, patterns, field in (("rank_pattern", rank_pattern, "r"), ("alpha_pattern", alpha_pattern, "alpha")):
        used = set()
        for name in names:
            if (key := pattern_key(patterns, name)) is not None:
                configs[name] = dataclasses.replace(configs[name], **{field: patterns[key]})
                used.add(key)
        for key in patterns:
            if key in used:
                continue
            named = [n for n in names if pattern_key([key], n)]
            if named:
                raise ValueError(f"{what} key {key!r} sets no layer: {named[0]!r} and any other layer it names are "
                                 f"set by the earlier key {pattern_key(patterns, named[0])!r} (the first key that "
                                 f"names a layer wins, as in PEFT); put {key!r} first")
            close = _closest(key, sorted({n.rsplit(".", 1)[-1] for n in names}), names)
            hint = f"closest layer names: {', '.join(close)}" if close else f"targeted layers: {', '.join(names[:8])}"
            raise ValueError(f"{what} key {key!r} names none of the {len(names)} targeted layers; {hint}")
    return {name: (module, configs[name], slices) for name, (module, slices) in chosen.items()}

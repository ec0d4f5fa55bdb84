"""What surgery changed and what trains: `inject`'s report, and every parameter of a model with its status.

    print(lorakit.inject(model, ...))   # every module replaced: name, kind, in/out, parameters added
    lorakit.summary(model)              # the parameter table, then "trainable params: N || all params: M || ..."
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from .layers import LoraConfig, Slices


@dataclass(frozen=True)
class Replacement:
    """One module swapped for a LoRA layer."""

    name: str
    kind: str
    in_features: int
    out_features: int
    params: int
    slices: Slices | None = None
    config: LoraConfig | None = None  # the layer's own settings: rank_pattern and alpha_pattern may change r, alpha


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
        settings = ", ".join(f"{f.name}={getattr(self.config, f.name)}" for f in dataclasses.fields(self.config))
        head = "would replace" if self.dry_run else "replaced"
        lines = [f"lorakit: {head} {len(self.replaced)} modules with LoRA adapter {self.adapter!r} "
                 f"({settings}; scale={self.config.scale:g})"]
        width = max([len(r.name) for r in self.replaced] + [6])
        # Where rank_pattern or alpha_pattern gave some layers their own r or alpha, every row shows its own.
        own = any(r.config is not None and r.config != self.config for r in self.replaced)
        lines.append(f"  {'module':<{width}}  {'kind':<9}  {'in':>6}  {'out':>6}  {'params':>9}  "
                     + (f"{'r':>4}  {'alpha':>6}  " if own else "") + "slices")
        for r in self.replaced:
            sl = "-" if r.slices is None else ",".join(f"{a}:{b}" for a, b in r.slices)
            c = r.config or self.config
            ranks = f"{c.r:>4}  {c.r if c.alpha is None else c.alpha:>6g}  " if own else ""
            lines.append(f"  {r.name:<{width}}  {r.kind:<9}  {r.in_features:>6}  {r.out_features:>6}  "
                         f"{r.params:>9,}  {ranks}{sl}")
        lines.append(f"  adapter parameters added: {self.params_added:,}")
        if self.modules_to_save:
            lines.append(f"  fully trainable (modules_to_save): {', '.join(self.modules_to_save)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Summary:
    """Parameter counts of a model and its parameters as (name, shape, trainable); `str()` is the totals line.
    Shared (tied) parameters are counted once."""

    trainable: int
    total: int
    rows: tuple[tuple[str, tuple[int, ...], bool], ...] = ()

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"

    def table(self, trainable_only: bool = False) -> str:
        """One line per parameter (only the trainable ones if asked), then the totals line."""
        rows = [r for r in self.rows if r[2] or not trainable_only]
        width = max([len(name) for name, _, _ in rows] + [9])
        lines = [f"{'parameter':<{width}}  {'shape':<20}  status"]
        lines += [f"{name:<{width}}  {str(shape):<20}  {'trainable' if trains else 'frozen'}" for name, shape, trains in rows]
        return "\n".join(lines + [str(self)])


def summary(model: nn.Module, print_fn=print) -> Summary:
    """The model's parameters and counts; printed as a table unless print_fn is None."""
    params = list(model.named_parameters())
    counts = Summary(sum(p.numel() for _, p in params if p.requires_grad), sum(p.numel() for _, p in params),
                     tuple((n, tuple(p.shape), p.requires_grad) for n, p in params))
    if print_fn is not None:
        print_fn(counts.table())
    return counts

"""The module tree as text: one line per module, identical numbered siblings collapsed into one.

    ◆       query (Linear) (384, 384)  147,840 params  + 6,144 LoRA params   [2×10×384] → [2×10×384]
      layer.0–5 (BertLayer) × 6, identical: layer.0 shown
"""

from __future__ import annotations

from torch import nn

from ..layers import kind_of

Shapes = dict[str, tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]]


def _shape(shapes: tuple[tuple[int, ...], ...]) -> str:
    return ", ".join("[" + "×".join(map(str, s)) + "]" for s in shapes) or "-"


def tree_lines(model: nn.Module, marks: dict[str, str] | None = None, notes: dict[str, str] | None = None,
               shapes: Shapes | None = None) -> list[str]:
    """A line per module (mark, indented name, class, weight shape, own parameters, note, traced shapes),
    a run of identical numbered siblings (same classes, parameter shapes, marks, notes and shapes inside)
    as one line with the first of them opened."""
    marks, notes, shapes = marks or {}, notes or {}, shapes or {}
    memo: dict[str, str] = {}

    def signature(name: str, module: nn.Module) -> str:
        """What a module's lines would say, names relative to it."""
        if name not in memo:
            inside = [(n, signature(f"{name}.{n}", c)) for n, c in module.named_children()]
            memo[name] = repr((type(module).__name__, [tuple(p.shape) for p in module.parameters(recurse=False)],
                               marks.get(name), notes.get(name), shapes.get(name), inside))
        return memo[name]

    lines: list[str] = []

    def walk(prefix: str, module: nn.Module, depth: int) -> None:
        children = list(module.named_children())
        i = 0
        while i < len(children):
            name, child = children[i]
            full = f"{prefix}.{name}" if prefix else name
            j = i + 1
            if name.isdigit():
                while (j < len(children) and children[j][0].isdigit()
                       and signature(f"{prefix}.{children[j][0]}" if prefix else children[j][0], children[j][1])
                       == signature(full, child)):
                    j += 1
            own = sum(p.numel() for p in child.parameters(recurse=False))
            weight = f" {tuple(child.weight.shape)}" if kind_of(child) else ""
            label = name if j == i + 1 else f"{name}–{children[j - 1][0]}"
            runs = f" × {j - i}, identical: {name} shown" if j > i + 1 else ""
            traced = f"   {_shape(shapes[full][0])} → {_shape(shapes[full][1])}" if full in shapes else ""
            lines.append(f"{marks.get(full, ' ')} {'  ' * depth}{label} ({type(child).__name__}){weight}"
                         f"{f'  {own:,} params' if own else ''}{notes.get(full, '')}{runs}{traced}")
            walk(full, child, depth + 1)
            i = j

    walk("", model, 0)
    return lines

"""The graph a page draws from a trace: one view per composite call, edges lifted to that level.

A view shows one call's children — module calls and torch ops — with an edge for every tensor that
flows between them, from the call's inputs ("in") and to its outputs ("out"). An edge inside a child is
not in the view; it is in the child's own view. A run of identical consecutive calls (BertLayer × 6)
is drawn as one group block, which opens into its first call. A LoRA layer's view holds its base call and
what the surgery added around it; `before` names the base call, which stands in for the LoRA layer when
the page shows the model as it was.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ..layers import Geometry, LoraLayer, SavedModule, kind_of
from ..targets import QKV
from .trace import Trace

Edge = tuple[str, str, int]  # (source block, destination block, Var id); blocks: node ids, "g<id>", "in", "out"


@dataclass
class Graph:
    """What the page draws, as plain data: `data()` is its JSON."""

    trace: Trace
    views: dict[int, list[Edge]]  # composite node id → its edges
    blocks: dict[int, list[str]]  # composite node id → the blocks it shows, in the order they ran
    groups: dict[str, list[int]]  # group block → its calls
    chains: dict[int, list[int]]  # node id → the calls from the model's down to it
    title: str

    def data(self) -> dict[str, Any]:
        t = self.trace
        used = {v for edges in self.views.values() for _, _, v in edges}
        used |= {v for n in t.nodes for v in n.statics}
        nodes = {str(n.id): _node(t, n.id) for n in t.nodes}
        taken: dict[tuple[int | None, str], int] = defaultdict(int)
        for n in t.nodes:  # ops named uniquely in their view: view, view_1, ...
            if n.kind == "op":
                k = taken[n.parent, n.name]
                taken[n.parent, n.name] += 1
                nodes[str(n.id)]["name"] = f"{n.name}_{k}" if k else n.name
        for gid, members in self.groups.items():
            first = t.nodes[members[0]]
            nodes[gid] = {"kind": "group", "parent": first.parent,
                          "name": f"{_short(first.name)}–{t.nodes[members[-1]].name.rsplit('.', 1)[-1]}",
                          "path": first.name, "op": f"{first.op} × {len(members)}", "members": members,
                          "params": sum(nodes[str(m)]["params"] for m in members),
                          "loraInside": sum(nodes[str(m)]["loraInside"] for m in members),
                          "loraParams": sum(nodes[str(m)]["loraParams"] for m in members)}
        member = {m: gid for gid, ms in self.groups.items() for m in ms}
        views = {str(c): {"blocks": self.blocks[c], "edges": [list(e) for e in edges],
                          "names": _var_names(t, c, edges, nodes, self.chains, member)}
                 for c, edges in self.views.items()}
        return {"title": self.title, "nodes": nodes, "views": views,
                "vars": {str(v.id): [v.name, list(v.shape), v.dtype, v.kind, _producer_op(t, v.producer)]
                         for v in t.vars if v.id in used},
                "surgery": surgery(t)}


def _short(name: str) -> str:
    """A module's name on its block: the last component, with its list's name for a numbered one (layer.0)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].isdigit() else parts[-1] or "model"


def _producer_op(t: Trace, producer: int | None) -> str:
    return "" if producer is None else t.nodes[producer].op


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _slices(layer: LoraLayer, name: str) -> list[list]:
    adapter = layer.adapters[name]
    if adapter.slices is None:
        return []
    out = adapter.geometry.out_features
    third = out // 3 if out % 3 == 0 else None
    named = {(i * third, (i + 1) * third): q for i, q in enumerate(QKV)} if third else {}
    return [[a, b, named.get((a, b), "")] for a, b in adapter.slices]


def lora_info(layer: LoraLayer) -> dict[str, Any] | None:
    """The active adapter of a LoRA layer: rank, alpha, scale, slices and parameters added."""
    name = layer.active
    if name is None or name not in layer.adapters:
        return None
    a = layer.adapters[name]
    return {"adapter": name, "method": "DoRA" if a.config.dora else "LoRA", "r": a.config.r,
            "alpha": a.config.alpha or a.config.r, "scale": a.scale,
            "params": _params(a), "kind": a.geometry.kind, "slices": _slices(layer, name),
            "in": a.geometry.fan_in, "out": a.geometry.out_features, "base": type(layer.base).__name__,
            "merged": name in layer.merged, "disabled": layer.disabled, "adapters": list(layer.adapters)}


def _node(t: Trace, i: int) -> dict[str, Any]:
    n = t.nodes[i]
    module = t.modules.get(i)
    parent = t.modules.get(n.parent) if n.parent is not None else None
    info: dict[str, Any] = {"kind": n.kind, "name": _short(n.name) if n.kind == "module" else n.name,
                            "path": n.name, "op": n.op, "parent": n.parent, "view": bool(n.children), "statics": n.statics,
                            "params": _params(module) if module is not None else
                            sum(math.prod(t.vars[v].shape) for v in n.statics if t.vars[v].kind == "param")}
    if isinstance(parent, LoraLayer) and not (module is not None and module is parent.base):
        info["added"] = True
    if isinstance(module, LoraLayer):
        info["lora"] = lora_info(module)
        info["before"] = next((c for c in n.children if t.modules.get(c) is module.base), None)
    if isinstance(module, SavedModule):
        info["saved"] = module.active
    inside = [lora_info(m) for c in t.subtree(i) if isinstance(m := t.modules.get(c), LoraLayer)]
    info["loraInside"], info["loraParams"] = len(inside), sum(x["params"] for x in inside if x)
    return info


def _var_names(t: Trace, view: int, edges: list[Edge], nodes: dict[str, Any], chains: dict[int, list[int]],
               groups: dict[int, str]) -> dict[str, str]:
    """A name for each tensor on one view: the name of the block that sent it; for a tensor from outside the
    view, the block that made it as seen where it was made, or the model input's own name. Tensors that would
    share a name are numbered (split.0, split.1)."""
    bases: dict[int, str] = {}
    for s, _, v in edges:
        var = t.vars[v]
        if v in bases:
            continue
        if var.kind == "input":
            bases[v] = var.name
            continue
        if s == "in":
            made, here = chains[var.producer], chains[view]
            depth = next(i for i, (a, b) in enumerate(zip(made, here + [None])) if a != b)
            s = groups.get(made[depth], str(made[depth]))
        bases[v] = nodes[s]["name"]
    count = defaultdict(int)
    for b in bases.values():
        count[b] += 1
    seen: dict[str, int] = defaultdict(int)
    names = {}
    for v, b in bases.items():
        names[str(v)] = b if count[b] == 1 else f"{b}.{seen[b]}"
        seen[b] += 1
    return names


def _chain(t: Trace, node: int) -> list[int]:
    out = []
    while node is not None:
        out.append(node)
        node = t.nodes[node].parent
    return out[::-1]


def _signature(t: Trace, i: int, memo: dict[int, str]) -> str:
    """Equal for calls that did the same thing: same class or op, shapes, parameters' shapes and calls inside."""
    if i not in memo:
        n = t.nodes[i]
        module = t.modules.get(i)
        params = tuple(tuple(p.shape) for p in module.parameters()) if module is not None else ()
        memo[i] = repr((n.op, [t.vars[v].shape for v in n.outputs], params,
                        [_signature(t, c, memo) for c in n.children]))
    return memo[i]


def _runs(t: Trace, children: list[int], memo: dict[int, str]) -> list[list[int]]:
    """Children split into runs of identical consecutive module calls (a run of one: no group)."""
    runs: list[list[int]] = []
    for c in children:
        if (runs and t.nodes[c].kind == "module" and t.nodes[runs[-1][-1]].kind == "module"
                and _signature(t, c, memo) == _signature(t, runs[-1][-1], memo)):
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs


def build(t: Trace, title: str = "") -> Graph:
    """Every composite call's view of the trace."""
    raw: dict[int, set[tuple[int | str, int | str, int]]] = defaultdict(set)
    chains = {n.id: _chain(t, n.id) for n in t.nodes}
    for x in t.nodes:
        for v in x.inputs:
            p = t.vars[v].producer
            cx = chains[x.id]
            cp = chains[p] if p is not None else []
            k = 0
            while k < min(len(cx), len(cp)) and cx[k] == cp[k]:
                k += 1
            if p is not None:
                raw[cx[k - 1]].add((cp[k], cx[k], v))
            for i in range(k, len(cx) - 1):
                raw[cx[i]].add(("in", cx[i + 1], v))
            for i in range(k, len(cp) - 1):
                raw[cp[i]].add((cp[i + 1], "out", v))
    for m in t.nodes:  # what a call returns leaves its view even when nothing reads it
        if m.kind == "module":
            for v in m.outputs:
                p = t.vars[v].producer
                if p is not None and m.id in chains[p]:
                    cp = chains[p]
                    for i in range(cp.index(m.id), len(cp) - 1):
                        raw[cp[i]].add((cp[i + 1], "out", v))
    memo: dict[int, str] = {}
    views, blocks, groups = {}, {}, {}
    for c in (n.id for n in t.nodes if n.children):
        display: dict[int | str, str] = {"in": "in", "out": "out"}
        shown = []
        for run in _runs(t, t.nodes[c].children, memo):
            block = str(run[0]) if len(run) == 1 else f"g{run[0]}"
            if len(run) > 1:
                groups[block] = run
            for m in run:
                display[m] = block
            shown.append(block)
        edges = {(display[s], display[d], v) for s, d, v in raw[c]}
        views[c] = sorted((e for e in edges if e[0] != e[1]), key=lambda e: (e[2], str(e[0]), str(e[1])))
        blocks[c] = shown
    return Graph(t, views, blocks, groups, chains, title or type(t.modules[0]).__name__)


def surgery(t: Trace) -> list[dict[str, Any]]:
    """Each LoRA layer and fully trained module the forward called: before (the original) and after."""
    rows, seen = [], set()
    for n in t.nodes:
        module = t.modules.get(n.id)
        if module is None or id(module) in seen or not isinstance(module, (LoraLayer, SavedModule)):
            continue
        seen.add(id(module))
        if isinstance(module, LoraLayer):
            info = lora_info(module)
            rows.append({"node": n.id, "path": n.name, "before": _describe(module.base),
                         "after": f"{info['method']} r={info['r']} α={info['alpha']:g}" if info else "LoRA (no active adapter)",
                         "params": info["params"] if info else 0, "slices": info["slices"] if info else []})
        else:
            rows.append({"node": n.id, "path": n.name, "before": _describe(module.original),
                         "after": f"trains in full ({module.active})", "params": _params(module.current()),
                         "slices": []})
    return rows


def _describe(module) -> str:
    """A layer as `Linear(384→384)`."""
    if not kind_of(module):
        return type(module).__name__
    g = Geometry.of(module)
    return f"{type(module).__name__}({g.in_features}→{g.out_features})"

"""Trace a model on an example input: every module call and every torch operation, with its tensors.

    t = trace(model, {"input_ids": ids, "attention_mask": mask})
    t.nodes[0]                       # the model's own call; its children are the calls inside it
    t.module_shapes()["encoder.layer.0.attention.self.query"]   # ((2, 10, 384),) → ((2, 10, 384),)

The model runs once, eagerly, in eval mode under no_grad (its training flags are restored afterwards), so
the trace shows the ops that really ran on that input, whatever Python control flow the forward has:
module calls through forward hooks, operations through a `TorchFunctionMode` that sees each call into
torch's API (F.linear, Tensor.view, torch.matmul, ...) without the ops it makes inside.

Parameters, buffers and constants are *static*: an op whose tensor inputs are all static (A.t(), a mask
built from a constant) is folded into a static value, so the graph shows only the data that flows from
the inputs. An op that returns one of its inputs unchanged (`.to()` to the same dtype) is no op.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

VarKind = Literal["input", "value", "param", "buffer", "const"]


@dataclass
class Var:
    """One tensor value. An in-place op makes a new Var of the same tensor."""

    id: int
    shape: tuple[int, ...]
    dtype: str  # "float32", "int64", ...
    kind: VarKind
    name: str  # the input's or parameter's name, a static value's expression, or "" for an op's output
    producer: int | None = None  # the node that computed it ("value" only)

    @property
    def static(self) -> bool:
        return self.kind in ("param", "buffer", "const")


@dataclass
class Node:
    """A module call (`kind="module"`, op = its class name) or a torch operation (op = "F.linear", ...)."""

    id: int
    kind: Literal["module", "op"]
    name: str  # module: its qualified name ("" for the model); op: the function's short name
    op: str
    parent: int | None
    inputs: list[int] = field(default_factory=list)  # Var ids that flow (ops only: a module's come from its ops)
    statics: list[int] = field(default_factory=list)  # static Var ids the op read
    outputs: list[int] = field(default_factory=list)  # Var ids returned
    children: list[int] = field(default_factory=list)


@dataclass
class Trace:
    """Every call of one forward, in the order they ran; nodes[0] is the model's own call."""

    nodes: list[Node]
    vars: list[Var]
    modules: dict[int, nn.Module]  # module-call node id → the module called

    def module_shapes(self) -> dict[str, tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]]:
        """Qualified module name → (input shapes, output shapes) of its first call."""
        shapes = {}
        for n in self.nodes:
            if n.kind == "module" and n.name not in shapes:
                shapes[n.name] = (tuple(self.vars[v].shape for v in self.inputs_of(n.id)),
                                  tuple(self.vars[v].shape for v in n.outputs))
        return shapes

    def subtree(self, node: int) -> list[int]:
        """The node and every call made inside it."""
        out, stack = [], [node]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(self.nodes[n].children)
        return out

    def inputs_of(self, node: int) -> list[int]:
        """The flowing Vars a call reads that were made outside it, in first-use order."""
        inside = set(self.subtree(node))
        seen: dict[int, None] = {}
        for n in sorted(inside):
            for v in self.nodes[n].inputs:
                if self.vars[v].producer not in inside:
                    seen.setdefault(v)
        return list(seen)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in a (nested) result: tuples, lists, dicts, dataclasses such as ModelOutput."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if is_dataclass(value) and not isinstance(value, type):
        return [t for f in fields(value) for t in _tensors(getattr(value, f.name, None))]
    return []


def op_name(func: Any) -> tuple[str, str]:
    """(short name, qualified op) of a torch callable: ("linear", "F.linear"), ("add", "Tensor.__add__")."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a property such as Tensor.T
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", "get")
        return name, f"Tensor.{name}"
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch.nn.functional"):
        qual = f"F.{name}"
    elif getattr(func, "__objclass__", None) is not None or getattr(torch.Tensor, name, None) is func:
        qual = f"Tensor.{name}"
    else:
        qual = f"torch.{name}"
    short = name.strip("_") if name.startswith("__") else name
    return short.replace("getitem", "index").replace("setitem", "index_put"), qual


def _in_place(name: str, qual: str) -> bool:
    return qual in ("Tensor.__setitem__",) or (name.endswith("_") and not name.startswith("_")) or (
        qual.startswith("Tensor.__i") and qual.endswith("__"))


class _Recorder(TorchFunctionMode):
    def __init__(self, tracer: _Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self.tracer.op(func, args, kwargs, result)
        return result


class _Tracer:
    def __init__(self, model: nn.Module) -> None:
        self.nodes: list[Node] = []
        self.vars: list[Var] = []
        self.modules: dict[int, nn.Module] = {}
        self.current: dict[int, int] = {}  # id(tensor) → its latest Var
        self.keep: list[Tensor] = []  # every tensor seen stays alive, so no id() is reused during the trace
        self.stack: list[int] = []
        self.static_names = {id(t): (n, "param") for n, t in model.named_parameters(remove_duplicate=False)}
        self.static_names.update({id(t): (n, "buffer") for n, t in model.named_buffers(remove_duplicate=False)})
        self.module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}

    def new_var(self, t: Tensor, kind: VarKind, name: str, producer: int | None = None) -> int:
        v = Var(len(self.vars), tuple(t.shape), _dtype_name(t.dtype), kind, name, producer)
        self.vars.append(v)
        self.current[id(t)] = v.id
        self.keep.append(t)
        return v.id

    def var_of(self, t: Tensor) -> int:
        """t's latest Var; a tensor first seen here is a parameter, a buffer or a constant."""
        if id(t) in self.current:
            return self.current[id(t)]
        name, kind = self.static_names.get(id(t), ("const", "const"))
        return self.new_var(t, kind, name)  # type: ignore[arg-type]

    def new_node(self, kind: Literal["module", "op"], name: str, op: str) -> Node:
        node = Node(len(self.nodes), kind, name, op, self.stack[-1] if self.stack else None)
        self.nodes.append(node)
        if node.parent is not None:
            self.nodes[node.parent].children.append(node.id)
        return node

    def inputs(self, names: list[str], values: list[Any]) -> None:
        for name, value in zip(names, values):
            for i, t in enumerate(_tensors(value)):
                self.new_var(t, "input", name if i == 0 else f"{name}[{i}]")

    def enter(self, module: nn.Module) -> None:
        node = self.new_node("module", self.module_names.get(id(module), type(module).__name__), type(module).__name__)
        self.modules[node.id] = module
        self.stack.append(node.id)

    def leave(self, output: Any) -> None:
        """A value the call returns that it did not compute (its input, as Dropout in eval; a constant, as a
        rotary table) passes through a `returns` op inside it, so the graph shows where it came from."""
        module = self.stack[-1]
        outs = []
        for t in _tensors(output):
            v = self.var_of(t)
            producer = self.vars[v].producer
            if producer is None or producer < module:
                node = self.new_node("op", "returns", "returned as is")
                (node.statics if self.vars[v].static else node.inputs).append(v)
                v = self.new_var(t, "value", "", node.id)
                node.outputs = [v]
            outs.append(v)
        self.nodes[self.stack.pop()].outputs = outs

    def op(self, func: Any, args: tuple, kwargs: dict, result: Any) -> None:
        if not self.stack:
            return
        outs = _tensors(result)
        ins = _tensors(args) + _tensors(kwargs)
        name, qual = op_name(func)
        if qual == "Tensor.__setitem__" and ins:
            outs = [ins[0]]  # it returns None and changes its first argument
        if not outs:
            return
        in_vars = [self.var_of(t) for t in ins]
        in_ids = {id(t) for t in ins}
        in_place = _in_place(name, qual)
        if not in_place and all(id(t) in in_ids for t in outs):
            return  # returned an input unchanged: no op
        flowing = [v for v in dict.fromkeys(in_vars) if not self.vars[v].static]
        if not flowing:  # static in, static out: folded into a named static value
            args_text = ", ".join(self.vars[v].name.rsplit(".", 1)[-1] for v in dict.fromkeys(in_vars))
            for t in outs:
                self.new_var(t, "const", f"{name}({args_text})")
            return
        node = self.new_node("op", name, qual)
        node.inputs = flowing
        node.statics = [v for v in dict.fromkeys(in_vars) if self.vars[v].static]
        node.outputs = [self.new_var(t, "value", "", node.id) for t in outs]


def _call_args(model: nn.Module, example: Any) -> tuple[tuple, dict, list[str], list[Any]]:
    """(args, kwargs) for model(...) and the example's parts named for the graph's inputs."""
    if isinstance(example, Mapping):
        kwargs = dict(example)
        return (), kwargs, list(kwargs), list(kwargs.values())
    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [params[i] if i < len(params) else f"input{i}" for i in range(len(args))]
    return args, {}, names, list(args)


def trace(model: nn.Module, example: Any) -> Trace:
    """Run model on example (a tensor, a tuple of positional inputs, or a dict of keyword inputs such as a
    tokenizer's output) once, recording every module call and torch operation with its tensors' shapes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace needs an nn.Module, got {type(model).__name__}")
    args, kwargs, names, values = _call_args(model, example)
    if not any(_tensors(v) for v in values):
        raise ValueError(f"the example input holds no tensor (got {type(example).__name__}); give a tensor, "
                         f"a tuple of them or a dict such as a tokenizer's output")
    tracer = _Tracer(model)
    tracer.inputs(names, values)
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(lambda m, a: tracer.enter(m)))
        handles.append(module.register_forward_hook(lambda m, a, out: tracer.leave(out)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), _Recorder(tracer):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    if not tracer.nodes or tracer.stack:
        raise RuntimeError("the forward did not complete under the trace; run the model on this input first")
    return Trace(tracer.nodes, tracer.vars, tracer.modules)

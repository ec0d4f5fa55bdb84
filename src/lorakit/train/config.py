"""Run configuration: typed dataclasses, loaded from a TOML or YAML recipe, overridden from the CLI.

    lorakit train recipes/sentiment.toml --lora.r 16 --train.epochs 1 --lora.targets query,key,value

Every field has a default, so `RunConfig()` is the default job (sentiment on the packaged MiniLM).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..layers import LoraConfig
from ..quant import QUANTIZE, Quantize
from ..targets import check_patterns

Task = Literal["classify", "causal-lm", "image"]
Method = Literal["lora", "full", "head"]
TASKS: tuple[str, ...] = typing.get_args(Task)
METHODS: tuple[str, ...] = typing.get_args(Method)


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and the bad value."""


@dataclass
class ModelConfig:
    """path: a Hugging Face model directory (None: the packaged model for the task — all-MiniLM-L6-v2
    for classify, SmolLM2-135M for causal-lm, a small ConvNet for image).
    max_length: tokens kept per text example.
    quantize: "nf4" stores the frozen Linear layers in 4-bit NormalFloat (QLoRA; the task head and
    embeddings stay float), "none" keeps the model as loaded. double_quant: with nf4, store the
    per-block scales in 8 bits too."""

    path: str | None = None
    max_length: int = 64
    quantize: Quantize = "none"
    double_quant: bool = True

    def __post_init__(self) -> None:
        _positive(self, "max_length", "model")
        _choice(self, "quantize", QUANTIZE, "model")
        _flag(self, "double_quant", "model")
        _text(self, "path", "model", optional=True)


@dataclass
class DataConfig:
    """path: CSV/TSV/JSONL (classify), a text file (causal-lm), a data folder (image); None: the
    packaged set (Rotten Tomatoes, Hamlet, Fashion-MNIST). Text data is split 80/10/10 (causal-lm 90/5/5)
    by a hash of each text; val_path / test_path: the user's own validation / test file (same format and
    columns), and then path is all training data (with val_path alone, the run has no test set).
    dataset: image format, "fashion-mnist" (IDX) or "cifar10" (python batches). max_train: cap on
    training examples."""

    path: str | None = None
    val_path: str | None = None
    test_path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    block_size: int = 128
    dataset: Literal["fashion-mnist", "cifar10"] = "fashion-mnist"
    max_train: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "block_size", "data")
        _choice(self, "dataset", ("fashion-mnist", "cifar10"), "data")
        if self.max_train is not None:
            _positive(self, "max_train", "data")
        for name in ("path", "val_path", "test_path"):
            _text(self, name, "data", optional=True)
        _text(self, "text_column", "data")
        _text(self, "label_column", "data")


@dataclass(frozen=True)
class LoraSection(LoraConfig):
    """[lora]: the adapter's settings — every field of `lorakit.LoraConfig` (r, alpha, dropout, rslora, init,
    train_a, bias, ...: see it; the default job takes alpha 16 and dropout 0.1) — and what trains:
    method: "lora" (adapters only), "full" (every weight trains), "head" (only the task head).
    targets: module-name suffixes, or "all-linear"; None picks per architecture (BERT query,value;
    Llama q_proj,v_proj; GPT-2 c_attn's q and v slices; ConvNet fc1,fc2,fc3).
    modules_to_save: modules that train in full (None: the task head, when the task adds one).
    rank_pattern, alpha_pattern: {regex: r} and {regex: alpha} for the targeted layers whose rank or alpha differ,
    as PEFT names them (`lorakit.inject`); a TOML table, or JSON on the command line:
    --lora.rank_pattern '{"layer.0.attention.self.query": 16}'."""

    alpha: float | None = 16.0
    dropout: float = 0.1
    method: Method = "lora"
    targets: list[str] | None = None
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
            check_patterns(self.rank_pattern, self.alpha_pattern)
        except ValueError as e:
            raise ConfigError(f"lora.{e}") from None
        _choice(self, "method", METHODS, "lora")
        for name in ("targets", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                raise ConfigError(f"lora.{name} must be a list of module-name suffixes, got {value!r}")
        if self.targets is not None and not self.targets:
            raise ConfigError("lora.targets is empty; give module-name suffixes such as query,value or all-linear")

    @property
    def adapter(self) -> LoraConfig:
        """The adapter's settings alone, as `lorakit.inject` and the adapter file take them."""
        return LoraConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoraConfig)})


@dataclass
class TrainSection:
    """AdamW on trainable parameters, warmup then linear or cosine decay, accumulation, clipping.
    bf16: autocast the forward to bfloat16 (LoRA weights stay fp32); unless every weight trains (or the
    base is NF4, or FSDP shards it), the frozen weights are stored in bf16 too. "auto": bf16 where the
    hardware computes it natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX), fp32 elsewhere;
    a run records what it resolved to. device: "auto" (CUDA when
    available, else CPU), "cpu", "cuda" or "cuda:N". group_by_length: batch texts of
    similar length together (less padding). checkpoint_every: optimizer steps between checkpoints
    (one is also written at each epoch's end and on Ctrl-C). max_steps: stop early (smoke tests).
    distributed: how several ranks (torchrun, or `lorakit train --nproc N`) share the model: "ddp"
    (each holds all of it; trainable gradients are averaged) or "fsdp" (FSDP2: every weight sharded
    across ranks); batch_size is per rank, so a step sees ranks × batch_size examples. loraplus_ratio: LoRA+
    (Hayou et al. 2024): every adapter's B trains at lr × this, the rest at lr (the paper suggests 16)."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    bf16: bool | Literal["auto"] = "auto"
    device: str = "auto"
    seed: int = 0
    group_by_length: bool = True
    eval_batch_size: int = 128
    log_every: int = 10
    checkpoint_every: int = 50
    max_steps: int | None = None
    distributed: Literal["ddp", "fsdp"] = "ddp"
    loraplus_ratio: float = 1.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "log_every", "checkpoint_every"):
            _positive(self, name, "train")
        if self.max_steps is not None:
            _positive(self, "max_steps", "train")
        _number(self, "lr", "train", "> 0", lambda v: v > 0)
        _number(self, "weight_decay", "train", ">= 0", lambda v: v >= 0)
        _number(self, "loraplus_ratio", "train", "> 0 (B's learning rate over A's; 1 for plain LoRA)", lambda v: v > 0)
        _number(self, "warmup", "train", "in [0, 1) (a fraction of the steps)", lambda v: 0 <= v < 1)
        if self.max_grad_norm is not None:
            _number(self, "max_grad_norm", "train", "> 0, or none for no clipping", lambda v: v > 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"train.seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.bf16 != "auto":
            _flag(self, "bf16", "train")
        _flag(self, "group_by_length", "train")
        _choice(self, "schedule", ("linear", "cosine", "constant"), "train")
        _choice(self, "distributed", ("ddp", "fsdp"), "train")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {self.device!r}")


@dataclass
class RunConfig:
    """One training run. out: the run directory (adapter, config, metrics, plot, checkpoints)."""

    task: Task = "classify"
    out: str = "runs/sentiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        _choice(self, "task", TASKS, "")
        _text(self, "out", "")
        if self.model.quantize != "none" and self.lora.method == "full":
            raise ConfigError(f"model.quantize = {self.model.quantize} freezes the base in 4 bits, so lora.method = full "
                              f"cannot train it; use lora.method = lora or head")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(obj: object, name: str, section: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{_key(section, name)} must be an integer >= 1, got {value!r}")


def _number(obj: object, name: str, section: str, allowed: str, ok: Callable[[float], bool]) -> None:
    """A finite real number that `ok` accepts; `allowed` says which ones, for the message."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{_key(section, name)} must be a finite number {allowed}, got {value!r}")


def _flag(obj: object, name: str, section: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        raise ConfigError(f"{_key(section, name)} must be true or false, got {value!r}")


def _text(obj: object, name: str, section: str, optional: bool = False) -> None:
    value = getattr(obj, name)
    if (value is None and optional) or (isinstance(value, str) and value and "\0" not in value):
        return
    raise ConfigError(f"{_key(section, name)} must be a non-empty string{' or none' if optional else ''}, got {value!r}")


def _choice(obj: object, name: str, allowed: tuple[str, ...], section: str) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"{_key(section, name)} must be one of {', '.join(allowed)}; got {value!r}")


def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) recipe into a nested dict."""
    from .data import read_text

    p = Path(path)
    if p.is_file() and p.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"recipe {p} must end in .toml, .yaml or .yml")
    text = read_text(p, "recipe", ConfigError)
    try:
        if p.suffix == ".toml":
            return tomllib.loads(text)
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"recipe {p} must hold a mapping of sections, got {type(data).__name__}")
            return data
    except (tomllib.TOMLDecodeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"recipe {p} is not valid {p.suffix[1:].upper()}: {e}") from None
    except Exception as e:  # yaml.YAMLError without importing yaml at module level
        raise ConfigError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    raise ConfigError(f"recipe {p} must end in .toml, .yaml or .yml")


def build_config(recipe: dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """RunConfig from a recipe dict plus `--section.key value` overrides (later wins)."""
    data: dict[str, Any] = json.loads(json.dumps(recipe or {}))
    for key, raw in _pairs(overrides or []):
        *sections, name = key.split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {s} is not a section")
        node[name] = None if raw.lower() in ("none", "null") else raw
    return _construct(RunConfig, data, "")


def _pairs(overrides: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --section.key value")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(overrides):
            key, value = token[2:], overrides[i + 1]
            i += 2
        else:
            raise ConfigError(f"{token} needs a value")
        pairs.append((key, value))
    return pairs


def _construct(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'} must be a section (a table of keys), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - fields))
    if unknown:
        raise ConfigError(f"unknown key {_key(prefix, unknown[0])}; {prefix or 'the recipe'} has: "
                          f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = _key(prefix, name)
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _construct(hint, value, key)
        else:
            kwargs[name] = _coerce(hint, value, key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or 'recipe'}: {e}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Convert a recipe or command-line value to the field's declared type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value is None and "none" in args:  # `--model.quantize none` reads as None, like every override
            return "none"
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is dict:  # a table in a recipe, a JSON object on the command line
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key} must be a JSON object such as '{{\"query\": 16}}', got {value!r} "
                                  f"({e.msg} at character {e.pos})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table (a JSON object on the command line), got {value!r}")
        return {_coerce(args[0], k, f"{key} key"): _coerce(args[1], v, f"{key}[{k!r}]") for k, v in value.items()}
    if origin is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v.strip() if isinstance(v, str) else v, key) for v in items if v != ""]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = hint(value) if not isinstance(value, float) or hint is float else value
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {'an integer' if hint is int else 'a number'}, got {value!r}") from None
        if hint is int and (isinstance(number, float) or (isinstance(value, str) and not value.strip().lstrip("-").isdigit())):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")

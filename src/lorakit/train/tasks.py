"""The three tasks the trainer knows: what model, what data, how to batch, what loss, what metric.

`prepare(cfg)` returns a `Prepared` task; the training loop only calls its `forward` and splits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import hub, tensorfile
from ..models import ConvNet
from ..qlora import QuantReport, quantize_base
from ..targets import matches_suffix
from . import data as D
from .config import ConfigError, RunConfig
from .distributed import Dist

# Per architecture (config.model_type): LoRA targets and the head a new task trains in full.
DEFAULT_TARGETS: dict[str, list | dict] = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gpt2": [{"c_attn": ("q", "v")}], "convnet": ["fc1", "fc2", "fc3"],
}
HEADS: dict[str, list[str]] = {"bert": ["classifier"], "roberta": ["classifier"], "distilbert": ["classifier"],
                               "llama": ["score"], "mistral": ["score"], "qwen2": ["score"], "gpt2": ["score"]}


@dataclass
class Batch:
    inputs: dict[str, Tensor]
    labels: Tensor
    size: int  # examples (sequences or images)

    def to(self, device: torch.device) -> Batch:
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device), self.size)


@dataclass
class Split:
    """One split: `size` examples, batched by `batches`, turned into tensors by `collate`."""

    size: int
    batches: Callable[[int, int, bool], list[list[int]]]  # (batch_size, epoch, shuffle) → index lists
    collate: Callable[[list[int]], Batch]


@dataclass
class Prepared:
    model: nn.Module
    splits: dict[str, Split]
    arch: str
    metric: str  # "accuracy" (higher is better) or "perplexity" (lower is better)
    tokenizer: Any = None
    label_names: list[str] = field(default_factory=list)
    texts: dict[str, list[str]] = field(default_factory=dict)  # for showing examples
    device: torch.device = torch.device("cpu")
    bf16: bool = False
    quant: QuantReport | None = None  # what model.quantize converted

    def autocast(self):
        """bf16 autocast on the task's device when the run asked for bf16, else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def forward(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """(mean loss, logits) of a batch, on the task's device, under bf16 autocast if asked."""
        batch = batch.to(self.device)
        with self.autocast():
            if self.arch == "convnet":
                logits = model(batch.inputs["pixels"])
                return F.cross_entropy(logits, batch.labels), logits
            out = model(**batch.inputs, labels=batch.labels)
            return out.loss, out.logits

    def example(self, n: int = 2, tokens: int = 16) -> Tensor | dict[str, Any]:
        """A small real input for tracing the model: the first n examples of the train split, texts cut
        to `tokens` tokens (and no KV cache for a causal LM)."""
        split = self.splits["train"] if "train" in self.splits else next(iter(self.splits.values()))
        batch = split.collate(list(range(min(n, split.size)))).to(self.device)
        if self.arch == "convnet":
            return batch.inputs["pixels"]
        inputs: dict[str, Any] = {k: v[:, :tokens] for k, v in batch.inputs.items()}
        if self.metric == "perplexity":
            inputs["use_cache"] = False
        return inputs

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    @property
    def held_out(self) -> str:
        """The split scored before and after training: test, or val when the run has no test set."""
        return "test" if "test" in self.splits else "val"


def trained_in_full(cfg: RunConfig, arch: str) -> list[str]:
    """The modules that train in full beside the adapters: lora.modules_to_save, or by default the freshly
    initialised head a classification task adds."""
    if cfg.lora.modules_to_save is not None:
        return list(cfg.lora.modules_to_save)
    return HEADS.get(arch, []) if cfg.task == "classify" else []


def default_targets(arch: str) -> list:
    if arch not in DEFAULT_TARGETS:
        raise ConfigError(f"no default LoRA targets for architecture {arch!r}; set lora.targets "
                          f"(known: {', '.join(sorted(DEFAULT_TARGETS))})")
    return list(DEFAULT_TARGETS[arch])


def model_dir(path: str | None, packaged: Callable[[], Path]) -> Path:
    """A Hugging Face model directory that can be loaded without unpickling: config.json a JSON object,
    weights in complete safetensors files. ConfigError naming what is wrong."""
    if path is None:
        return packaged()
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"model.path {p} is a file, not a model directory" if p.exists()
                          else f"model.path {p} not found")
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path {p} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.path {p}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(f"model.path {p}: config.json is not a model config (no model_type)")
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        pickles = sorted(f.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for f in p.glob(ext))
        if pickles:
            raise ConfigError(f"model directory {p} holds only pickled weights ({', '.join(pickles[:3])}), which "
                              f"lorakit never loads (unpickling can run code); convert them to safetensors")
        raise ConfigError(f"model directory {p} holds no weights (*.safetensors)")
    for f in weights:
        try:
            tensorfile.check_file(f)
        except tensorfile.TensorFileError as e:
            raise ConfigError(f"model.path: {e}") from None
    return p


def load_part(what: str, path: Path, load: Callable[[], Any]) -> Any:
    """`load()` of a model directory's part, any failure of the loader a one-line ConfigError."""
    try:
        return load()
    except ConfigError:
        raise
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError, ...) for a bad directory
        text = " ".join(str(e).split())
        raise ConfigError(f"model.path {path}: cannot load its {what} ({text[:300] or type(e).__name__})") from None


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def load_tokenizer(path: Path) -> Any:
    """The model directory's own tokenizer. Refused when the directory has none: transformers would build an
    empty one that reads every word as unknown, and training would run on nothing."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.path {path}: cannot load its tokenizer (no tokenizer file; expected one of "
                          f"{', '.join(TOKENIZER_FILES)})")
    tokenizer = load_part("tokenizer", path, lambda: AutoTokenizer.from_pretrained(path))
    if len(tokenizer) <= len(tokenizer.all_special_tokens) + 1:
        raise ConfigError(f"model.path {path}: cannot load its tokenizer (its vocabulary is empty)")
    return tokenizer


def _check_positions(config: Any, length: int, key: str, path: Path) -> None:
    """Refuse sequences longer than the model's position table, which would fail (or read garbage) mid-run."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        raise ConfigError(f"{key} = {length} exceeds the {limit} positions of the model in {path}; "
                          f"use at most {limit}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name} but this torch sees no CUDA device; use cpu or auto")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX
    (read from /proc/cpuinfo; elsewhere, no)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolved(cfg: RunConfig) -> RunConfig:
    """`cfg` with train.bf16 = "auto" replaced by what this machine's device does natively."""
    if cfg.train.bf16 != "auto":
        return cfg
    bf16 = native_bf16(resolve_device(cfg.train.device))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, bf16=bf16))


def prepare(cfg: RunConfig, with_model: bool = True) -> Prepared:
    """Build the model (on `train.device`) and the train/val/test splits for `cfg.task`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = resolved(cfg)
    device = resolve_device(cfg.train.device)
    build = {"classify": _classify, "causal-lm": _causal}.get(cfg.task)
    task = build(cfg, with_model) if build else _image(cfg)
    task.device, task.bf16 = device, cfg.train.bf16
    if task.model is not None and device.type == "cpu":
        eager_attention_for_dropout(task.model)
    if task.model is not None and cfg.model.quantize == "nf4":
        task.quant = quantize_frozen(cfg, task)
    if task.model is not None:
        task.model.to(device)
    return task


def eager_attention_for_dropout(model: nn.Module) -> bool:
    """On CPU, a Hugging Face model whose attention has dropout trains faster with the eager attention
    (softmax, then the model's own dropout module, which `lorakit.fast_dropout` speeds up) than with SDPA,
    whose CPU kernel draws the dropout mask slowly (benchmarks/results.md has the measurement). Switches the model
    to eager attention if so; True if it did."""
    config = getattr(model, "config", None)
    p = max((getattr(config, k, 0.0) or 0.0 for k in ("attention_probs_dropout_prob", "attention_dropout")),
            default=0.0)
    if not p or getattr(config, "_attn_implementation", None) != "sdpa" or \
            not hasattr(model, "set_attn_implementation"):
        return False
    model.set_attn_implementation("eager")
    return True


def quantize_frozen(cfg: RunConfig, task: Prepared) -> QuantReport:
    """QLoRA's base: every Linear except the output head and the modules that train in full, in NF4,
    computing in bf16 when the run autocasts to it."""
    saved = trained_in_full(cfg, task.arch)
    exclude = [n for n, _ in task.model.named_modules() if any(matches_suffix(n, s) for s in saved)]
    try:
        return quantize_base(task.model, "all-linear", exclude=exclude, double_quant=cfg.model.double_quant,
                             compute_dtype=torch.bfloat16 if cfg.train.bf16 else torch.float32)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.quantize = {cfg.model.quantize}: {e}") from None


def _classify(cfg: RunConfig, with_model: bool) -> Prepared:
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    sets, names = _text_sets(cfg)
    path = model_dir(cfg.model.path, hub.minilm_dir)
    config = load_part("config", path, lambda: AutoConfig.from_pretrained(path))
    _check_positions(config, cfg.model.max_length, "model.max_length", path)
    heads = [a for a in (getattr(config, "architectures", None) or []) if a.endswith("ForSequenceClassification")]
    if heads and config.num_labels != len(names):
        raise ConfigError(f"model.path {path} already has a {config.num_labels}-label classification head but the "
                          f"data has {len(names)} labels ({', '.join(names[:5])}); give a model directory without a "
                          f"head, or data with its labels")
    tokenizer = load_tokenizer(path)
    model = None
    if with_model:
        torch.manual_seed(cfg.train.seed)
        model = load_part("weights", path, lambda: AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(names), use_safetensors=True))
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    splits = {name: text_split(cfg, tokenizer, items) for name, items in sets.items()}
    texts = {name: [e.text for e in items] for name, items in sets.items()}
    return Prepared(model, splits, config.model_type, "accuracy", tokenizer, names, texts)


def _text_sets(cfg: RunConfig) -> tuple[dict[str, list[D.TextExample]], list[str]]:
    """The train / val (/ test) examples and the label names. data.path alone is split 80/10/10 by hash; with
    data.val_path and data.test_path, data.path is all training data and those files the other two; with one
    of them, data.path gives the other by hash (val_path alone: no test set)."""
    d = cfg.data
    examples, names = D.load_text_classification(d.path, d.text_column, d.label_column)
    own = lambda path: D.load_text_classification(path, d.text_column, d.label_column, names)[0]  # noqa: E731
    if d.val_path or d.test_path:
        train, val = (examples, own(d.val_path)) if d.val_path else \
            D.split_by_hash(examples, key=lambda e: e.text, fractions=(0.9, 0.1, 0.0))[:2]
        sets = {"train": train, "val": val} | ({"test": own(d.test_path)} if d.test_path else {})
    else:
        sets = dict(zip(("train", "val", "test"), D.split_by_hash(examples, key=lambda e: e.text)))
    if d.max_train:
        sets["train"] = sets["train"][:d.max_train]
    for name, items in sets.items():
        if not items:
            raise D.DataError(f"the {name} split is empty ({len(examples)} examples in data.path); give more data")
    return sets, names


def text_split(cfg: RunConfig, tokenizer: Any, items: list[D.TextExample]) -> Split:
    """Labelled texts as a split: tokenized once (model.max_length), batched by similar length (or shuffled
    when train.group_by_length is off), padded per batch."""
    ids = D.tokenize_texts(tokenizer, [e.text for e in items], cfg.model.max_length)
    labels = torch.tensor([e.label for e in items])
    lengths = [len(x) for x in ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batches(batch_size: int, epoch: int, shuffle: bool) -> list[list[int]]:
        if shuffle and not cfg.train.group_by_length:
            return D.shuffled_batches(len(ids), batch_size, cfg.train.seed, epoch)
        return D.length_grouped_batches(lengths, batch_size, cfg.train.seed, epoch, shuffle=shuffle)

    def collate(index: list[int]) -> Batch:
        input_ids, mask = D.pad_batch([ids[i] for i in index], pad)
        return Batch({"input_ids": input_ids, "attention_mask": mask}, labels[index], len(index))

    return Split(len(items), batches, collate)


def _causal(cfg: RunConfig, with_model: bool) -> Prepared:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_dir(cfg.model.path, hub.smollm2_dir)
    config = load_part("config", path, lambda: AutoConfig.from_pretrained(path))
    _check_positions(config, cfg.data.block_size, "data.block_size", path)
    tokenizer = load_tokenizer(path)
    d = cfg.data
    blocks = text_blocks(tokenizer, d.path or hub.hamlet_path(), d.block_size)
    if d.val_path or d.test_path:
        train, val = (blocks, text_blocks(tokenizer, d.val_path, d.block_size)) if d.val_path else \
            D.split_blocks(blocks, (0.95, 0.05, 0.0))[:2]
        sets = {"train": train, "val": val} | ({"test": text_blocks(tokenizer, d.test_path, d.block_size)}
                                               if d.test_path else {})
    else:
        try:
            sets = dict(zip(("train", "val", "test"), D.split_blocks(blocks)))
        except D.DataError as e:
            raise D.DataError(f"{d.path or hub.hamlet_path()}: {e}") from None
    if d.max_train:
        sets["train"] = sets["train"][:d.max_train]
    model = None
    if with_model:
        torch.manual_seed(cfg.train.seed)
        model = load_part("weights", path, lambda: AutoModelForCausalLM.from_pretrained(path, use_safetensors=True))
    return Prepared(model, {name: block_split(cfg, x) for name, x in sets.items()}, config.model_type, "perplexity",
                    tokenizer)


def text_blocks(tokenizer: Any, path: str | Path, block_size: int) -> Tensor:
    """A UTF-8 text file tokenized and cut into (N, block_size) blocks; DataError naming the file."""
    try:
        return D.causal_blocks(tokenizer(D.load_text_file(path))["input_ids"], block_size)
    except D.DataError as e:
        raise e if str(path) in str(e) else D.DataError(f"{path}: {e}") from None


def block_split(cfg: RunConfig, x: Tensor) -> Split:
    """(N, block_size) token blocks as a split; each block is its own label sequence."""
    def batches(batch_size: int, epoch: int, shuffle: bool) -> list[list[int]]:
        return D.shuffled_batches(len(x), batch_size, cfg.train.seed, epoch, shuffle)

    def collate(index: list[int]) -> Batch:
        ids = x[index]
        return Batch({"input_ids": ids}, ids, len(index))

    return Split(len(x), batches, collate)


def _image(cfg: RunConfig) -> Prepared:
    if cfg.data.val_path or cfg.data.test_path:
        raise ConfigError("data.val_path and data.test_path are for text data (classify, causal-lm); the image task "
                          "holds out the last tenth of the training images and tests on the test set")
    if cfg.data.dataset == "cifar10" and not cfg.data.path:
        raise ConfigError("data.dataset = cifar10 needs data.path: the folder holding data_batch_1..5 and test_batch")
    images = (D.load_fashion_mnist(cfg.data.path or D.FASHION_MNIST_DIR) if cfg.data.dataset == "fashion-mnist"
              else D.load_cifar10(cfg.data.path))
    # Hold out the last tenth of the training images for validation; the test set stays the test set.
    n_val = len(images.train_x) // 10
    parts = {"train": (images.train_x[:-n_val], images.train_y[:-n_val]),
             "val": (images.train_x[-n_val:], images.train_y[-n_val:]),
             "test": (images.test_x, images.test_y)}
    if cfg.data.max_train:
        parts["train"] = tuple(t[:cfg.data.max_train] for t in parts["train"])
    torch.manual_seed(cfg.train.seed)
    model = ConvNet(in_channels=images.train_x.shape[1], classes=len(images.classes))
    if cfg.model.path:
        state_path = Path(cfg.model.path)
        if not state_path.is_file():
            raise ConfigError(f"model.path {state_path} not found (for the image task: a ConvNet .safetensors)")
        try:
            state = tensorfile.read(state_path)[0]
        except tensorfile.TensorFileError as e:
            raise ConfigError(f"model.path: {e}") from None
        load_part("weights", state_path, lambda: model.load_state_dict(state))

    def split(x: Tensor, y: Tensor) -> Split:
        def batches(batch_size: int, epoch: int, shuffle: bool) -> list[list[int]]:
            return D.shuffled_batches(len(x), batch_size, cfg.train.seed, epoch, shuffle)

        return Split(len(x), batches, lambda index: Batch({"pixels": x[index]}, y[index], len(index)))

    return Prepared(model, {k: split(*v) for k, v in parts.items()}, "convnet", "accuracy",
                    label_names=list(images.classes))


@torch.no_grad()
def evaluate(task: Prepared, model: nn.Module, split: str, batch_size: int, dist: Dist = Dist()) -> dict[str, float]:
    """Mean loss and the task metric (accuracy or perplexity) on a split.

    Distributed: each rank evaluates every N-th batch, and the sums Σ loss·count, correct and count
    are added over ranks, so every rank returns the metrics of the whole split."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    s = task.splits[split]
    for index, counts in dist.eval_batches(s.batches(batch_size, 0, False)):
        batch = s.collate(index)
        loss, logits = task.forward(model, batch)
        if not counts:
            continue
        total_loss += loss.float().item() * batch.size
        count += batch.size
        if task.metric == "accuracy":
            correct += (logits.argmax(-1).cpu() == batch.labels).sum().item()
    model.train(was_training)
    total_loss, correct, count = dist.sum([total_loss, correct, count])
    mean = total_loss / max(count, 1)
    if task.metric == "accuracy":
        return {"loss": mean, "accuracy": correct / max(count, 1)}
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}

"""Run folders: what `lorakit train` leaves behind, and what can be done with a finished run — score it on
a split or on a file of one's own, label texts, continue a prompt, merge it into a plain model.

A run folder holds config.json (the resolved config), metrics.jsonl, the adapter (lora) or
model.safetensors (full / head), curves.png, and checkpoint/ for --resume.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import atomic, tensorfile
from ..adapters import holders
from ..files import BaseMismatch, base_digest, load_adapter
from ..layers import LoraLayer
from . import data as D
from .checkpoint import run_params, strict
from .config import ConfigError, RunConfig, build_config
from .distributed import shard_like
from .tasks import Prepared, block_split, evaluate, prepare, text_blocks, text_split


class RunError(RuntimeError):
    """The run cannot start or had to stop; the message says why and what to do."""


class Interrupted(RunError):
    """Ctrl-C or SIGTERM: a checkpoint was saved and the run can be resumed."""


def run_config_data(run: Path) -> dict[str, Any]:
    """The JSON object of a run folder's config.json, or RunError saying what is wrong with it."""
    path = run / "config.json"
    if not run.is_dir():
        raise RunError(f"{run} is not a run directory ({'a file' if run.exists() else 'no such folder'}); "
                       f"give the --out folder of `lorakit train`")
    if not path.is_file():
        raise RunError(f"{run} is not a run directory (no config.json); give the --out folder of `lorakit train`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({e}); the run's config is damaged") from None
    except OSError as e:
        raise RunError(f"cannot read {path} ({e.strerror or e})") from None
    sections = ("model", "data", "lora", "train")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for k, v in data.items() if k in sections):
        raise RunError(f"{path} must hold a JSON object of sections (model, data, lora, train); it is damaged")
    return data


def load_weights(model: nn.Module, path: Path, trainable_only: bool) -> list[nn.Parameter]:
    """Copy the tensors of a weights file lorakit wrote into the model's parameters of those names, after
    checking the file (its checksum, when it has one) and that every tensor fits; RunError otherwise.
    Returns the parameters it set."""
    try:
        tensors = tensorfile.read(path)[0]
    except tensorfile.TensorFileError as e:
        raise RunError(str(e)) from None
    named = run_params(model) if trainable_only else dict(model.named_parameters())
    for n, t in tensors.items():
        if n not in named:
            raise RunError(f"{path} holds {n!r}, which is not a {'trainable ' if trainable_only else ''}parameter "
                           f"of the run's model; the file is from another run")
        if tuple(t.shape) != tuple(named[n].shape):
            raise RunError(f"{path}: {n} has shape {tuple(t.shape)}, the model's is {tuple(named[n].shape)}")
    if not tensors:
        raise RunError(f"{path} holds no tensors")
    with torch.no_grad():
        for n, t in tensors.items():
            named[n].copy_(shard_like(t, named[n]))
    return [named[n] for n in tensors]


class Metrics:
    """metrics.jsonl: one JSON record a line, strict JSON (a non-finite number is written as null); `count` is
    how many records the file holds. write False: a rank other than 0, which reads but never writes."""

    def __init__(self, path: Path, write: bool = True) -> None:
        self.path, self.writes = path, write
        self.count = len(self.read()) if write else 0

    def write(self, **record: Any) -> None:
        if not self.writes:
            return
        atomic.append_line(self.path, json.dumps(strict(record), allow_nan=False))
        self.count += 1

    def read(self) -> list[dict]:
        """The records; a last line that a kill cut short is not one. RunError if the file is damaged."""
        if not self.path.exists():
            return []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError) as e:
            raise RunError(f"cannot read {self.path} ({e}); the run's metrics are damaged") from None
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1 and not line.endswith("\n"):
                    break  # torn by a kill while it was written
                raise RunError(f"{self.path}: line {i + 1} is not JSON; the run's metrics are damaged") from None
            if not isinstance(record, dict):
                raise RunError(f"{self.path}: line {i + 1} is not a JSON object; the run's metrics are damaged")
            records.append(record)
        return records

    def truncate(self, n: int) -> None:
        """Keep the first n records: what was logged after the checkpoint is logged again on resume."""
        records = self.read()
        if n > len(records):
            raise RunError(f"{self.path} holds {len(records)} records but the checkpoint counts {n}; the run's "
                           f"metrics are damaged")
        atomic.write_file(self.path, "".join(json.dumps(strict(r), allow_nan=False) + "\n" for r in records[:n]))
        self.count = n


def finished(run: Path) -> bool:
    """Whether a run completed: its last record is the final test and its adapter (or weights) is there."""
    records = Metrics(run / "metrics.jsonl", write=False).read()
    done = any(r.get("event") == "test_after" for r in records)
    return done and ((run / "adapter").is_dir() or (run / "model.safetensors").is_file())


def stores_bf16(cfg: RunConfig) -> bool:
    """Whether a run keeps its frozen weights in bf16: a bf16 run whose base is float and does not all train."""
    return cfg.train.bf16 is True and cfg.lora.method != "full" and cfg.model.quantize == "none"


def frozen_to_bf16(model: nn.Module, trained: Iterable[nn.Parameter]) -> int:
    """Store the fp32 weights of a bf16-autocast run that do not train in bf16, in place; returns how many values.

    Autocast casts every frozen Linear weight to bf16 again at each forward; stored in bf16 they are cast
    once (LayerNorm and embedding weights, which autocast leaves in fp32, are rounded to bf16 too, as in
    any bf16 base). The `trained` parameters stay fp32. Each LoRA layer's base fingerprint is taken first,
    from the fp32 weights, so an adapter still names the base it was trained on."""
    for m in model.modules():
        if isinstance(m, LoraLayer):
            base_digest(m)
    keep, n = {id(p) for p in trained}, 0
    for p in model.parameters():
        if id(p) not in keep and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
            n += p.numel()
    return n


def load_run(run: str | Path, with_adapter: bool = True, quantize: str | None = None,
             as_trained: bool = True) -> tuple[RunConfig, Prepared]:
    """A finished run's config, task data and model, with the run's adapter (or weights) applied.

    quantize: base precision to load instead of the run's own model.quantize ("none" or "nf4").
    as_trained: a bf16 run's frozen weights stored in bf16, as the run computed its scores (False: the base
    as it is on disk, for a merge at full precision)."""
    path = Path(run)
    data = run_config_data(path)
    if quantize is not None:
        data.setdefault("model", {})["quantize"] = quantize
    try:
        cfg = build_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None
    task = prepare(cfg)
    trained: list[nn.Parameter] = []
    if with_adapter:
        if (path / "adapter").is_dir():
            load_adapter(task.model, path / "adapter")
            trained = [p for h in holders(task.model) for p in h.adapters.parameters()]
            if cfg.lora.bias != "none":
                trained += [p for n, p in task.model.named_parameters() if n.endswith(".bias")]
        elif (path / "model.safetensors").is_file():
            trained = load_weights(task.model, path / "model.safetensors", trainable_only=False)
        else:
            raise RunError(f"{path} has no adapter/ or model.safetensors: the run has not finished; "
                           f"`lorakit train --resume --out {path}` completes it")
    if as_trained and stores_bf16(cfg):  # as the run computed its scores: the weights that did not train in bf16
        frozen_to_bf16(task.model, trained)
    task.model.eval()
    return cfg, task


def evaluate_run(run: str | Path, split: str = "test", base: bool = False, quantize: str | None = None,
                 file: str | Path | None = None, text_column: str | None = None,
                 label_column: str | None = None) -> dict[str, Any]:
    """The run's metrics (loss and accuracy or perplexity) on one of its splits, or on `file` — a data file
    of the run's kind (labelled texts with the run's columns, or the given ones; a text file for a language
    model), scored whole. base: without the adapter. The result also names any base mismatch noted while
    loading (an NF4-trained adapter on the float base, say)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BaseMismatch)
        cfg, task = load_run(run, with_adapter=not base, quantize=quantize)
    notes = [str(w.message) for w in caught if issubclass(w.category, BaseMismatch)]
    if file is not None:
        split = str(file)
        if cfg.task == "classify":
            examples = D.load_text_classification(file, text_column or cfg.data.text_column,
                                                  label_column or cfg.data.label_column, task.label_names)[0]
            task.splits[split] = text_split(cfg, task.tokenizer, examples)
        elif cfg.task == "causal-lm":
            task.splits[split] = block_split(cfg, text_blocks(task.tokenizer, file, cfg.data.block_size))
        else:
            raise RunError(f"scoring a file of one's own is for text runs (classify, causal-lm); this run's task "
                           f"is {cfg.task}")
    elif split not in task.splits:
        raise RunError(f"the run in {run} has no {split} split (it was trained with data.val_path and no "
                       f"data.test_path); give --split val, or a file to score")
    result = evaluate(task, task.model, split, cfg.train.eval_batch_size)
    return {"run": str(run), "split": split, "adapter": not base, "quantize": cfg.model.quantize, **result,
            **({"base_mismatch": notes} if notes else {})}


@dataclass(frozen=True)
class Prediction:
    """One labelled text: the most probable label and the probability of every label."""

    text: str
    label: str
    probabilities: dict[str, float]


def predict(run: str | Path, texts: list[str]) -> list[Prediction]:
    """Label texts with a classification run, in batches of 64."""
    cfg, task = load_run(run)
    if cfg.task != "classify":
        raise RunError(f"predict labels texts; this run's task is {cfg.task}")
    ids = D.tokenize_texts(task.tokenizer, texts, cfg.model.max_length)
    pad = task.tokenizer.pad_token_id or 0
    out = []
    with torch.no_grad(), task.autocast():
        for i in range(0, len(ids), 64):
            input_ids, mask = D.pad_batch(ids[i:i + 64], pad)
            probs = task.model(input_ids=input_ids.to(task.device),
                               attention_mask=mask.to(task.device)).logits.float().softmax(-1).cpu()
            for text, p in zip(texts[i:i + 64], probs):
                out.append(Prediction(text, task.label_names[int(p.argmax())],
                                      {name: float(q) for name, q in zip(task.label_names, p)}))
    return out


def write_predictions(predictions: list[Prediction], path: str | Path) -> Path:
    """Predictions as CSV (.csv: text, label, then one probability column per label) or JSON Lines (.jsonl),
    written whole."""
    import csv
    import io

    path = Path(path)
    if path.suffix == ".jsonl":
        body = "".join(json.dumps({"text": p.text, "label": p.label, "probabilities": p.probabilities}) + "\n"
                       for p in predictions)
    elif path.suffix == ".csv":
        buffer = io.StringIO()
        names = list(predictions[0].probabilities) if predictions else []
        writer = csv.writer(buffer)
        writer.writerow(["text", "label", *(f"p_{n}" for n in names)])
        writer.writerows([p.text, p.label, *(f"{p.probabilities[n]:.6f}" for n in names)] for p in predictions)
        body = buffer.getvalue()
    else:
        raise D.DataError(f"--output {path} must end in .csv or .jsonl")
    return atomic.write_file(path, body)


def generate(run: str | Path, prompt: str, max_new_tokens: int = 40, seed: int = 0) -> dict[str, str]:
    """The greedy continuation of `prompt` by a causal-LM run, without its adapter and with it."""
    from ..adapters import disable_adapters, enable_adapters

    if not prompt.strip():
        raise D.DataError("the prompt is empty; give the text to continue")
    cfg, task = load_run(run)
    if cfg.task != "causal-lm":
        raise RunError(f"generate needs a causal-lm run; this run's task is {cfg.task}")
    enc = task.tokenizer(prompt, return_tensors="pt").to(task.device)
    limit = getattr(task.model.config, "max_position_embeddings", None)
    length = enc["input_ids"].shape[1] + max_new_tokens
    if isinstance(limit, int) and length > limit:
        raise D.DataError(f"the prompt ({enc['input_ids'].shape[1]} tokens) and {max_new_tokens} new tokens make "
                          f"{length} positions; the model has {limit}")
    outputs = {}
    for label, switch in (("without adapter", disable_adapters), ("with adapter", enable_adapters)):
        switch(task.model)
        torch.manual_seed(seed)
        with torch.no_grad(), task.autocast():
            out = task.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=task.tokenizer.pad_token_id or task.tokenizer.eos_token_id)
        outputs[label] = task.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outputs


def merge_run(run: str | Path, out: str | Path, overwrite: bool = False, print_fn=print) -> Path:
    """Write the run's model with its adapter merged in: a Hugging Face folder (a ConvNet: model.safetensors),
    whole. An NF4 base is dequantized to fp32 and the adapter added exactly. `out` must be new, empty, or (with
    overwrite) a model folder."""
    from ..merge import merge_and_unload

    out = Path(out)

    def free(target: Path) -> None:
        if target.exists() and not target.is_dir():
            raise RunError(f"--out {target} is a file; give a folder for the merged model")
        if target.is_dir() and any(target.iterdir()):
            if not overwrite:
                raise RunError(f"{target} is not empty; pass --overwrite to replace the model there")
            if not any((target / f).is_file() for f in ("config.json", "model.safetensors")):
                raise RunError(f"{target} holds files that are not a model; --overwrite replaces a model folder, "
                               f"so give a new or empty folder")

    free(out)
    cfg, task = load_run(run, as_trained=False)
    quantized = cfg.model.quantize != "none"
    model = merge_and_unload(task.model, dtype=torch.float32 if quantized else None)
    if quantized:
        print_fn(f"lorakit: the {cfg.model.quantize} base was dequantized to fp32 and the adapter added exactly")

    def fill(tmp: Path) -> None:
        if cfg.task == "image":
            (tmp / "model.safetensors").write_bytes(tensorfile.dumps(model.state_dict()))
        else:
            model.save_pretrained(tmp)
            task.tokenizer.save_pretrained(tmp)

    return atomic.write_dir(out, fill, check=free)

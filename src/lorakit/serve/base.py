"""What a server serves: one frozen base — a causal LM, or a classifier whose adapters carry their own heads —
with its tokenizer, the name requests use for it, its labels and its context length.

    base_for(None)                 the packaged SmolLM2-135M-Instruct
    base_for(run="runs/hamlet")    a run's base (its adapter is served under the run folder's name)
    base_for(path="my-model")      a Hugging Face model folder; task from its config, or given
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .. import hub
from ..files import remember_base
from ..train import data as D
from ..train.config import ConfigError, build_config
from ..train.runs import run_config_data
from ..train.tasks import load_part, load_tokenizer, model_dir

Task = Literal["causal-lm", "classify"]
PACKAGED = {"causal-lm": ("SmolLM2-135M-Instruct", hub.smollm2_dir), "classify": ("all-MiniLM-L6-v2", hub.minilm_dir)}


@dataclass
class Base:
    model: nn.Module
    tokenizer: Any
    name: str
    task: Task
    labels: list[str]
    context: int  # positions the model has

    @property
    def bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def run_base(run: str | Path) -> tuple[str | None, Task, list[str]]:
    """A run folder's base: its model path (None: the packaged one), its task and (classify) its labels."""
    cfg = build_config(run_config_data(Path(run)))
    if cfg.task not in ("causal-lm", "classify"):
        raise ConfigError(f"{run} is a {cfg.task} run; the server serves causal-lm and classify runs")
    labels = D.load_text_classification(cfg.data.path, cfg.data.text_column, cfg.data.label_column)[1] \
        if cfg.task == "classify" else []
    return cfg.model.path, cfg.task, labels


def load_base(path: str | None, task: Task | None, device: torch.device, bf16: bool,
              labels: list[str] | None = None) -> Base:
    """The base model in eval mode on `device`, in bf16 if asked. Its layers' fingerprints are taken first,
    from the weights as stored, so adapters trained on it are recognised after the cast."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if path is None:
        task = task or "causal-lm"
        name, packaged = PACKAGED[task]
        folder = model_dir(None, packaged)
    else:
        folder = model_dir(path, lambda: None)
        name = folder.resolve().name
    config = load_part("config", folder, lambda: AutoConfig.from_pretrained(folder))
    if task is None:
        heads = [a for a in (getattr(config, "architectures", None) or []) if a.endswith("ForSequenceClassification")]
        task = "classify" if heads else "causal-lm"
    tokenizer = load_tokenizer(folder)
    if task == "classify":
        labels = labels or [config.id2label[i] for i in range(config.num_labels)]
        model = load_part("weights", folder, lambda: AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=len(labels), use_safetensors=True))
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        labels = []
        model = load_part("weights", folder, lambda: AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True))
    remember_base(model)
    if bf16:
        model.to(torch.bfloat16)
    context = getattr(config, "max_position_embeddings", None) or 512
    return Base(model.to(device).eval(), tokenizer, name, task, labels, int(context))

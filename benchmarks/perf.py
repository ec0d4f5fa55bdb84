"""Speed and memory of LoRA training, inference and mixed-adapter batches: lorakit and PEFT side by side,
both against the floor, measured in one process with interleaved steps.

    python -m benchmarks                       # ~10 min on 2 CPU cores; rewrites its section of benchmarks/results.md
    make bench                                 # the same, from the project's .venv
    python -m benchmarks --quick               # tiny random models, 2 steps: checks the runner works (~30 s);
                                               # writes to a temp dir, never to results.md
    python -m benchmarks --device cuda --dtype bf16          # the GPU section
    python -m benchmarks --weights random      # MiniLM and SmolLM2 built from benchmarks/configs/, random weights
    python -m benchmarks --cases minilm-train,minilm-infer --steps 30

The floor of a LoRA training step is the work no implementation can avoid: the frozen model's forward plus
the backward through its activations. It is measured on the same model with every parameter frozen except
the head, and the embedding output made to require grad (a forward hook), so autograd walks back through
every layer without computing any frozen weight's gradient. A step is forward + loss + backward (no
optimizer step; gradients are set to None before each step, outside the timed region), with
`torch.manual_seed(step)` before it so every model starts the step from the same random state. The variants
of a case run round-robin, the starting variant rotating each round, after warm-up steps; times are medians.

Peak memory of a training step is measured for every variant in a separate process (forked from a server
that imported torch, transformers, peft and lorakit when the run began, and built nothing; spawned on
CUDA): on CPU the peak resident set size (`ru_maxrss`) after the steps, and the resident size after building
the model and batch, with the kernel's peak counter reset at that point (/proc/self/clear_refs), so the
difference is the memory the steps add; on CUDA `torch.cuda.max_memory_allocated` and `memory_allocated` instead.

The numbers go to a section of results.md and, raw, to perf.json beside it (perf-<device>-<dtype>.json for
anything but CPU fp32). The end-to-end goal (the sentiment job against PEFT + Trainer) is
benchmarks/sentiment.py's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import hashlib
import json
import math
import multiprocessing
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers 5, called by peft

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lorakit  # noqa: E402
from lorakit.experiments.report import machine, versions  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.md"
TITLE = "## Performance: lorakit and PEFT against the floor"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MB = 2**20

# ---------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class Lora:
    """One LoRA setting, given to `lorakit.inject` and to `peft.LoraConfig` alike."""

    targets: tuple[str, ...]
    r: int
    alpha: int
    dropout: float

    def __str__(self) -> str:
        return f"LoRA {','.join(self.targets)} r={self.r} dropout {self.dropout:g}"


@dataclass(frozen=True)
class Case:
    """A model, the batch it runs (B rows of T tokens), the LoRA settings, and how many timed steps.

    kind: "train" (floor vs LoRA steps, full fine-tuning if `full`), "infer" (base vs adapter unmerged
    and merged) or "mixed" (`adapters` adapters, rows spread over them, vs a single-adapter forward).
    warmup: untimed steps per variant before the timed ones."""

    name: str
    kind: Literal["train", "infer", "mixed"]
    model: str
    batch: int
    seq: int
    loras: tuple[Lora, ...]
    steps: int
    warmup: int = 2
    full: bool = False
    adapters: int = 1
    random_weights: bool = False

    def describe(self) -> str:
        what = f"{MODEL_NAMES[self.model]}{' (random weights)' if self.random_weights else ''}, " \
               f"B={self.batch}, T={self.seq}"
        if self.kind == "mixed":
            return f"{what}, {self.adapters} adapters × {self.batch // self.adapters} rows, {self.loras[0]}"
        return f"{what}, " + "; ".join(map(str, self.loras)) + ("; full fine-tuning" if self.full else "")


@dataclass(frozen=True)
class Variant:
    """One model of a case: impl is floor, full, lorakit or peft; lora the setting (for lorakit and peft)."""

    name: str
    impl: str
    lora: Lora | None = None


MODEL_NAMES = {"minilm": "MiniLM", "smollm2": "SmolLM2-135M", "tiny-bert": "tiny BERT", "tiny-llama": "tiny Llama"}
HEADS = {"minilm": "classifier", "tiny-bert": "classifier", "smollm2": None, "tiny-llama": None}
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV = ("query", "value")


def cases(quick: bool) -> list[Case]:
    """The issue's cases; --quick swaps in tiny random models and tiny batches with the same structure."""
    qv0, qv1 = Lora(QV, 8, 16, 0.0), Lora(QV, 8, 16, 0.1)
    every = Lora(LLAMA_LINEAR, 16, 32, 0.05)
    served = Lora(LLAMA_LINEAR, 16, 32, 0.0)
    if quick:
        return [Case("minilm-train", "train", "tiny-bert", 4, 16, (qv0, qv1), 2, 1, full=True),
                Case("smollm2-train", "train", "tiny-llama", 2, 16, (every,), 2, 1),
                Case("minilm-infer", "infer", "tiny-bert", 4, 16, (qv0,), 2, 1),
                Case("smollm2-mixed", "mixed", "tiny-llama", 16, 8, (served,), 2, 1, adapters=8)]
    return [Case("minilm-train", "train", "minilm", 32, 64, (qv0, qv1), 20, 2, full=True),
            Case("smollm2-train", "train", "smollm2", 4, 256, (every,), 10, 1),
            Case("minilm-infer", "infer", "minilm", 32, 64, (qv0,), 30, 2),
            Case("smollm2-mixed", "mixed", "smollm2", 16, 64, (served,), 10, 1, adapters=8)]


def train_variants(case: Case) -> list[Variant]:
    def label(impl: str, lora: Lora) -> str:
        return impl if len(case.loras) == 1 else f"{impl} dropout {lora.dropout:g}"

    out = [Variant("floor", "floor")]
    out += [Variant(label(impl, lora), impl, lora) for lora in case.loras for impl in ("lorakit", "peft")]
    return out + ([Variant("full", "full")] if case.full else [])


# ---------------------------------------------------------------- models and batches


def load_base(name: str, dtype: torch.dtype, device: str, random_weights: bool = False) -> nn.Module:
    """The base model, its new classifier head (if any) drawn from seed 0, in `dtype` on `device`.

    random_weights: build MiniLM or SmolLM2 from its architecture alone (benchmarks/configs/NAME.json), with
    transformers' random initialisation, for machines without the packaged weights. Time and memory depend
    on the shapes, not the values."""
    from transformers import (AutoConfig, AutoModelForCausalLM, BertConfig, BertForSequenceClassification,
                              LlamaConfig, LlamaForCausalLM)
    from transformers.utils import logging as hf_logging

    from lorakit import hub

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    if random_weights and name in ("minilm", "smollm2"):
        config = AutoConfig.from_pretrained(HERE / "configs" / f"{name}.json")
        model = (BertForSequenceClassification(BertConfig(**config.to_dict(), num_labels=2)) if name == "minilm"
                 else LlamaForCausalLM(config))
    elif name == "minilm":
        model = BertForSequenceClassification.from_pretrained(hub.minilm_dir(), num_labels=2)
    elif name == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(hub.smollm2_dir())
    elif name == "tiny-bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=2))
    elif name == "tiny-llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    else:
        raise ValueError(f"unknown model {name!r}; models: {', '.join(MODEL_NAMES)}")
    return model.to(device=device, dtype=dtype)


def make_batch(model: nn.Module, case: Case, device: str, labels: bool) -> dict[str, torch.Tensor]:
    """B×T random token ids (the same for every variant), no padding; labels for the loss if asked."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (case.batch, case.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        batch["labels"] = torch.randint(0, 2, (case.batch,), generator=g) if HEADS[case.model] else ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


def embedding_output(model: nn.Module) -> nn.Module:
    """The module whose output feeds the first layer: BERT's embeddings block, else the token embedding."""
    return getattr(model.base_model, "embeddings", None) or model.get_input_embeddings()


def build(model: nn.Module, v: Variant, head: str | None) -> nn.Module:
    """Turn `model` (changed in place, so pass a copy) into variant `v`."""
    if v.impl == "floor":
        model.requires_grad_(False)
        if head:
            model.get_submodule(head).requires_grad_(True)
        embedding_output(model).register_forward_hook(lambda module, args, out: out.requires_grad_())
        return model
    if v.impl == "full":
        return model.requires_grad_(True)
    lora = v.lora
    assert lora is not None, v
    if v.impl == "lorakit":
        lorakit.inject(model, list(lora.targets), r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                       modules_to_save=[head] if head else [])
        return model
    from peft import LoraConfig, get_peft_model

    # task_type SEQ_CLS puts the classifier in modules_to_save, as lorakit's modules_to_save does.
    config = LoraConfig(task_type="SEQ_CLS" if head else "CAUSAL_LM", target_modules=list(lora.targets),
                        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout)
    return get_peft_model(model, config)


@torch.no_grad()
def randomize_b(model: nn.Module, seed: int = 2) -> None:
    """Give lorakit's B matrices small random values (a trained-looking adapter; merging then changes W)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, lorakit.LoraAdapter):
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.02)


@torch.no_grad()
def copy_to_peft(src: nn.Module, dst: nn.Module) -> None:
    """Copy every lorakit adapter's A and B into the PEFT model's adapter of the same name and layer."""
    inner = dst.base_model.model
    for name, layer in lorakit.lora_layers(src):
        target = inner.get_submodule(name)
        for adapter, a in layer.adapters.items():
            target.lora_A[adapter].weight.copy_(a.lora_a)
            target.lora_B[adapter].weight.copy_(a.lora_b)


def out_of(model: nn.Module, batch: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}, **extra).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], device: str) -> Callable[[int], float]:
    """A function running one timed training step (forward, loss, backward) with seed `i`."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i: int) -> float:
        for p in params:
            p.grad = None
        torch.manual_seed(i)
        sync(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        sync(device)
        return time.perf_counter() - start

    return step


def infer_step(forward: Callable[[], Any], device: str) -> Callable[[int], float]:
    def step(i: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            forward()
        sync(device)
        return time.perf_counter() - start

    return step


def interleave(steps: dict[str, Callable[[int], float]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Run every step function `warmup` times, then `rounds` timed rounds, each variant once per round;
    round i starts at variant i mod n, so no variant always runs first. Seconds per variant."""
    names = list(steps)
    for i in range(warmup):
        for name in names:
            steps[name](i)
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(steps[name](warmup + i))
    return times


def summarize(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {name: {"median_ms": 1000 * statistics.median(t), "ms": [1000 * s for s in t]} for name, t in times.items()}


# ---------------------------------------------------------------- the three kinds of case


def run_train(case: Case, device: str, dtype: torch.dtype, log: Callable[..., None]) -> dict[str, Any]:
    base = load_base(case.model, dtype, device, case.random_weights)
    head = HEADS[case.model]
    batch = make_batch(base, case, device, labels=True)
    variants = train_variants(case)
    models = {v.name: build(copy.deepcopy(base), v, head) for v in variants}
    del base
    check = {}
    for lora in case.loras:  # same adapter weights in both, then the same logits (dropout off in eval)
        (lk, lk_model), (pf, pf_model) = [(v.name, models[v.name]) for v in variants if v.lora == lora]
        randomize_b(lk_model)
        copy_to_peft(lk_model, pf_model)
        with torch.no_grad():
            check[f"{lk} vs {pf}"] = max_diff(out_of(lk_model.eval(), batch), out_of(pf_model.eval(), batch))
    for m in models.values():
        m.train()
    log(f"built {', '.join(models)}; logits max |lorakit − peft|: {check}")
    times = interleave({n: train_step(m, batch, device) for n, m in models.items()}, case.steps, case.warmup)
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()}
    return {"variants": summarize(times), "trainable_params": trainable, "check_max_abs_logit_diff": check}


def run_infer(case: Case, device: str, dtype: torch.dtype, log: Callable[..., None]) -> dict[str, Any]:
    base = load_base(case.model, dtype, device, case.random_weights).eval()
    head = HEADS[case.model]
    batch = make_batch(base, case, device, labels=False)
    lora = case.loras[0]
    lk = build(copy.deepcopy(base), Variant("lorakit", "lorakit", lora), head).eval()
    pf = build(copy.deepcopy(base), Variant("peft", "peft", lora), head).eval()
    randomize_b(lk)
    copy_to_peft(lk, pf)
    lk_merged, pf_merged = copy.deepcopy(lk), copy.deepcopy(pf)
    lorakit.merge(lk_merged)  # W0 += s·B·A in place; the LoRA layers stay, holding merged adapters
    pf_merged.merge_adapter()
    models = {"base": base, "lorakit unmerged": lk, "lorakit merged": lk_merged,
              "peft unmerged": pf, "peft merged": pf_merged}
    with torch.inference_mode():
        out = {n: out_of(m, batch) for n, m in models.items()}
    check = {"lorakit unmerged vs peft unmerged": max_diff(out["lorakit unmerged"], out["peft unmerged"]),
             "lorakit merged vs unmerged": max_diff(out["lorakit merged"], out["lorakit unmerged"]),
             "peft merged vs unmerged": max_diff(out["peft merged"], out["peft unmerged"]),
             "lorakit unmerged vs base": max_diff(out["lorakit unmerged"], out["base"])}
    log(f"built {', '.join(models)}; checks: {check}")
    steps = {n: infer_step(lambda m=m: m(**batch), device) for n, m in models.items()}
    return {"variants": summarize(interleave(steps, case.steps, case.warmup)), "check_max_abs_logit_diff": check}


def run_mixed(case: Case, device: str, dtype: torch.dtype, log: Callable[..., None]) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    base = load_base(case.model, dtype, device, case.random_weights).eval()
    batch = make_batch(base, case, device, labels=False)
    lora = case.loras[0]
    names = [f"a{i}" for i in range(case.adapters)]
    rows = [names[i % len(names)] for i in range(case.batch)]  # each adapter's rows spread through the batch
    lk = copy.deepcopy(base)
    for name in names:
        lorakit.inject(lk, list(lora.targets), r=lora.r, alpha=lora.alpha, dropout=lora.dropout, adapter=name)
    randomize_b(lk)
    lorakit.set_adapter(lk, names[0])
    lk.eval()
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=list(lora.targets), r=lora.r, lora_alpha=lora.alpha,
                        lora_dropout=lora.dropout)
    pf = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        pf.add_adapter(name, config)
    pf.set_adapter(names[0])
    copy_to_peft(lk, pf)
    pf.eval()
    del base

    def lk_mixed() -> Any:
        with lorakit.mixed_batch(lk, rows):
            return lk(**batch)

    forwards = {"lorakit single": lambda: lk(**batch), "lorakit mixed": lk_mixed,
                "peft single": lambda: pf(**batch), "peft mixed": lambda: pf(**batch, adapter_names=rows)}
    with torch.inference_mode():
        out = {n: f().logits.float() for n, f in forwards.items()}
    first = [i for i, name in enumerate(rows) if name == names[0]]  # the rows whose adapter is the single one
    check = {"lorakit mixed vs peft mixed": max_diff(out["lorakit mixed"], out["peft mixed"]),
             "lorakit single vs peft single": max_diff(out["lorakit single"], out["peft single"]),
             f"lorakit mixed vs single, rows of {names[0]}": max_diff(out["lorakit mixed"][first],
                                                                      out["lorakit single"][first]),
             "lorakit mixed vs single, all rows (should differ)": max_diff(out["lorakit mixed"], out["lorakit single"])}
    del out
    log(f"built lorakit and peft with {len(names)} adapters; checks: {check}")
    steps = {n: infer_step(f, device) for n, f in forwards.items()}
    return {"variants": summarize(interleave(steps, case.steps, case.warmup)), "rows": rows,
            "check_max_abs_logit_diff": check}


RUNNERS = {"train": run_train, "infer": run_infer, "mixed": run_mixed}


# ---------------------------------------------------------------- memory, one process per variant


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux ≥ 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe_memory(case: Case, variant: Variant, device: str, dtype_name: str, steps: int) -> dict[str, Any]:
    """In a fresh process: build one variant, run `steps` training steps; memory after building and at peak."""
    head = HEADS[case.model]
    model = build(load_base(case.model, DTYPES[dtype_name], device, case.random_weights), variant, head).train()
    batch = make_batch(model, case, device, labels=True)
    step = train_step(model, batch, device)
    with torch.no_grad():  # page in weights loaded by mmap, which would otherwise count as the step's memory
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        built = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        reset = True
    else:
        reset = reset_peak_rss()
        built = rss_bytes() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for i in range(steps):
        step(i)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case.name, "variant": variant.name, "impl": variant.impl,
            "dropout": variant.lora.dropout if variant.lora else None, "steps": steps,
            "built_mb": built / MB, "peak_mb": peak / MB, "step_mb": (peak - built) / MB, "peak_reset": reset}


PRELOAD = ["torch", "transformers", "peft", "lorakit", "benchmarks.perf", "transformers.models.bert.modeling_bert",
           "transformers.models.llama.modeling_llama"]


def probe_pool(parallel: int, cuda: bool) -> ProcessPoolExecutor:
    """Workers that each run one task in a fresh process, forked from a server that imports the libraries
    (and lorakit's code as it is now, the code the timings run) before this returns, and nothing else.
    With `cuda`, spawned instead: importing peft imports bitsandbytes, which starts CUDA, and a process
    forked after that cannot use the GPU. A spawned worker imports lorakit when it starts."""
    ctx = multiprocessing.get_context("spawn" if cuda else "forkserver")
    if not cuda:
        ctx.set_forkserver_preload(PRELOAD)
    pool = ProcessPoolExecutor(max_workers=parallel, mp_context=ctx, max_tasks_per_child=1)
    pool.submit(os.getpid).result()
    return pool


def run_memory(pool: ProcessPoolExecutor, todo: list[Case], device: str, dtype_name: str, steps: int,
               log: Callable[..., None]) -> list[dict[str, Any]]:
    """`probe_memory` for every (case, variant), each in its own process."""
    jobs = [(case, v) for case in todo for v in train_variants(case)]
    futures = [pool.submit(probe_memory, case, v, device, dtype_name, steps) for case, v in jobs]
    out = []
    for (case, v), f in zip(jobs, futures):
        out.append(r := f.result())
        log(f"memory {case.name} {v.name}: built {r['built_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB, "
            f"step {r['step_mb']:.0f} MB")
    return out


# ---------------------------------------------------------------- goals and the report


def ratio_row(what: str, reference: str, ref_ms: dict[str, float], ms: dict[str, float | None],
              goal: float | None, issue: str) -> dict[str, Any]:
    """One line of the speed table: each implementation's median and its ratio to its reference."""
    x = {k: (v / ref_ms[k] if v is not None else None) for k, v in ms.items()}
    met = None if goal is None or x.get("lorakit") is None else x["lorakit"] <= goal
    return {"what": what, "reference": reference, "reference_ms": ref_ms, "ms": ms, "x": x, "goal_x": goal,
            "issue_figure": issue, "met": met}


def speed_rows(results: dict[str, dict[str, Any]], by_name: dict[str, Case]) -> list[dict[str, Any]]:
    """The speed table, from the medians of the cases that ran; goals and PEFT's figures are the issue's."""
    def medians(name: str) -> dict[str, float]:
        return {n: v["median_ms"] for n, v in results[name]["variants"].items()}

    rows = []
    if "minilm-train" in results:
        case, med = by_name["minilm-train"], medians("minilm-train")
        names = {lora.dropout: (f"lorakit dropout {lora.dropout:g}", f"peft dropout {lora.dropout:g}")
                 for lora in case.loras}
        floor = {"lorakit": med["floor"], "peft": med["floor"]}
        for (d, (lk, pf)), goal, issue in zip(names.items(), (1.02, None), ("1.01×", "1.10×")):
            rows.append(ratio_row(f"training step: {MODEL_NAMES[case.model]} B={case.batch} T={case.seq}, LoRA "
                                  f"query,value r=8, dropout {d:g}", "floor", floor,
                                  {"lorakit": med[lk], "peft": med[pf]}, goal, issue))
        (lk0, pf0), (lk1, pf1) = names.values()
        rows.append(ratio_row(f"cost of dropout {case.loras[1].dropout:g} (same case)", "same library, dropout 0",
                              {"lorakit": med[lk0], "peft": med[pf0]}, {"lorakit": med[lk1], "peft": med[pf1]},
                              1.03, "1.09×"))
        if case.full:
            rows.append(ratio_row(f"full fine-tuning of {MODEL_NAMES[case.model]}, same batch (plain PyTorch, every "
                                  f"weight trains; in the lorakit column)", "floor", floor,
                                  {"lorakit": med["full"], "peft": None}, None, "1.48× (full)"))
    if "smollm2-train" in results:
        case, med = by_name["smollm2-train"], medians("smollm2-train")
        lora = case.loras[0]
        rows.append(ratio_row(f"training step: {MODEL_NAMES[case.model]} B={case.batch} T={case.seq}, LoRA on all "
                              f"{len(lora.targets)} linear kinds r={lora.r}, dropout {lora.dropout:g}", "floor",
                              {"lorakit": med["floor"], "peft": med["floor"]},
                              {"lorakit": med["lorakit"], "peft": med["peft"]}, 1.05, "1.25×"))
    if "minilm-infer" in results:
        case, med = by_name["minilm-infer"], medians("minilm-infer")
        for state, goal, issue in (("unmerged", 1.03, "1.04×"), ("merged", 1.01, "1.03×")):
            rows.append(ratio_row(f"inference: {MODEL_NAMES[case.model]} B={case.batch} T={case.seq}, adapter {state}",
                                  "base model", {"lorakit": med["base"], "peft": med["base"]},
                                  {"lorakit": med[f"lorakit {state}"], "peft": med[f"peft {state}"]}, goal, issue))
    if "smollm2-mixed" in results:
        case, med = by_name["smollm2-mixed"], medians("smollm2-mixed")
        rows.append(ratio_row(f"mixed batch: {MODEL_NAMES[case.model]}, {case.adapters} adapters × "
                              f"{case.batch // case.adapters} rows, T={case.seq}",
                              "single-adapter forward, same library",
                              {"lorakit": med["lorakit single"], "peft": med["peft single"]},
                              {"lorakit": med["lorakit mixed"], "peft": med["peft mixed"]}, 1.15, "1.60×"))
    return rows


def memory_rows(memory: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Goals per LoRA setting: lorakit's peak ≤ PEFT's, and with dropout > 0 ≥ 20% less step memory."""
    by = {(m["case"], m["variant"]): m for m in memory}
    rows = []
    for m in memory:
        row = dict(m, goal="", met=None)
        if m["impl"] == "lorakit":
            peft = by.get((m["case"], m["variant"].replace("lorakit", "peft")))
            if peft:
                goals = [("peak ≤ PEFT's", m["peak_mb"] <= peft["peak_mb"])]
                if m["dropout"]:
                    goals.append(("step memory ≤ 0.8× PEFT's", m["step_mb"] <= 0.8 * peft["step_mb"]))
                row.update(goal="; ".join(g for g, _ in goals), met=all(ok for _, ok in goals),
                           vs_peft_peak=m["peak_mb"] / peft["peak_mb"],
                           vs_peft_step=m["step_mb"] / peft["step_mb"] if peft["step_mb"] > 0 else None)
        rows.append(row)
    return rows


def _ms(v: float | None, x: float | None) -> str:
    return "—" if v is None else f"{v:,.1f} ({x:.3f}×)"


def _met(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "**no**")


def section(raw: dict[str, Any]) -> str:
    env, quick = raw["environment"], raw["quick"]
    title = TITLE if (raw["device"], raw["dtype"]) == ("cpu", "fp32") else f"{TITLE} ({raw['device']}, {raw['dtype']})"
    lines = [
        title,
        "",
        "<!-- written by `python -m benchmarks` (benchmarks/perf.py); rerun it rather than editing the numbers -->",
        "",
        *(["**Quick smoke test** (`--quick`): tiny random models and batches, not a benchmark.", ""] if quick else []),
        *(["The goals are the issue's, set for the CPU. At these batch sizes a GPU step is bound by the host's "
           "kernel launches, not by arithmetic, so the floor is far cheaper relative to each extra operation and "
           "LoRA's small matmuls weigh far more than their share of the FLOPs.", ""]
          if raw["device"] == "cuda" else []),
        "Speed and memory of one LoRA training step, of inference, and of a mixed-adapter batch, lorakit and "
        "HF PEFT side by side on the same base weights and the same batch. The **floor** is the same model with "
        "every parameter frozen except the head (none for the causal LM, whose head is tied to its embeddings and "
        "which trains nothing else), and the embedding output made to require grad: the forward plus the backward "
        "through the activations that any LoRA step needs. A training step is forward + loss + backward, no "
        "optimizer step. The variants of a case run round-robin in one process (the first variant rotating each "
        "round) after warm-up; each time is the median over the timed steps. lorakit's adapters get random B "
        "and PEFT the same A and B, so both compute the same function (the logit check below).",
        "",
        f"- date: {env['date']}",
        f"- machine: {env['machine']}",
        f"- versions: {env['versions']}; lorakit tree `{env['git']}`"
        + (f" (uncommitted changes in {', '.join(env['dirty'])})" if env["dirty"] else "")
        + (" — **the source changed while this ran**" if env.get("source_changed_during_run") else ""),
        f"- device {raw['device']}, {raw['precision']}",
        f"- command: `{raw['command']}`",
        "- timed steps per variant (after warm-up steps): "
        + ", ".join(f"{c['name']} {c['steps']} (after {c['warmup']})" for c in raw["cases"].values()),
        "",
        "| case | reference | reference ms | lorakit ms (× ref.) | PEFT ms (× ref.) | goal for lorakit "
        "| PEFT's figure in the issue | met? |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in raw["speed"]:
        ref = r["reference_ms"]
        ref_text = f"{ref['lorakit']:,.1f}" if ref["lorakit"] == ref["peft"] else \
            f"{ref['lorakit']:,.1f} / {ref['peft']:,.1f}"
        goal = "—" if r["goal_x"] is None else f"≤ {r['goal_x']:.2f}×"
        lines.append(f"| {r['what']} | {r['reference']} | {ref_text} | {_ms(r['ms']['lorakit'], r['x']['lorakit'])} "
                     f"| {_ms(r['ms']['peft'], r['x']['peft'])} | {goal} | {r['issue_figure']} | {_met(r['met'])} |")
    checks = [f"{c['name']}: " + ", ".join(f"{k} {v:.1e}" for k, v in c["check_max_abs_logit_diff"].items())
              for c in raw["cases"].values() if "check_max_abs_logit_diff" in c]
    lines += ["", "Largest logit difference between the models of a case (eval mode, before timing): "
              + "; ".join(checks) + ".", ""]
    if raw["memory"]:
        what = ("peak `torch.cuda.max_memory_allocated`; built = `memory_allocated` after building"
                if raw["device"] == "cuda" else
                "peak RSS (`ru_maxrss`); built = RSS after building model and batch and reading every weight once, "
                "where the peak counter is reset")
        again = raw.get("memory_run")
        lines += [
            f"Memory of {raw['memory'][0]['steps']} training step(s), each variant in its own process ({what}; "
            "step = peak − built: activations, gradients and temporaries)"
            + (f"; measured again on {again['date']} by `{again['command']}` (lorakit tree `{again['git']}`)"
               if again else "") + ".",
            "",
            "| case | variant | built MB | peak MB | step MB | lorakit ÷ PEFT (peak / step) | goal | met? |",
            "|---|---|---:|---:|---:|---:|---|---|",
        ]
        for m in raw["memory_rows"]:
            vs = "" if m.get("vs_peft_peak") is None else \
                f"{m['vs_peft_peak']:.3f} / " + ("—" if m["vs_peft_step"] is None else f"{m['vs_peft_step']:.3f}")
            lines.append(f"| {m['case']} | {m['variant']} | {m['built_mb']:,.0f} | {m['peak_mb']:,.0f} | "
                         f"{m['step_mb']:,.0f} | {vs} | {m['goal'] or '—'} | {_met(m['met'])} |")
        lines.append("")
    lines += ["The cases: " + "; ".join(f"**{c['name']}** {c['description']}" for c in raw["cases"].values()) + ".",
              "The end-to-end goal (the default sentiment job against PEFT + Trainer) is measured by "
              "`python -m benchmarks.sentiment`, in its own section.", ""]
    return "\n".join(lines)


def replace_section(path: Path, title: str, body: str) -> None:
    """Put `body` (which starts with `title`) in place of the `title` section of `path`, from its title line to
    the next '## ' line, keeping every other section; append it if absent. Written atomically."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# lorakit benchmarks\n\nEach section is " \
        "written by the script it names; rerun the script rather than editing the numbers.\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == title), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        text = "".join(lines[:start]) + body + ("\n" + rest if rest else "")
    write_atomic(path, text)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=HERE.parent, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def tree() -> str:
    """$LORAKIT_GIT where set (a copy of the tree sent to another machine, whose .git, if any, is not the
    source's), else `git describe` of the checkout, else "unknown"."""
    return os.environ.get("LORAKIT_GIT") or _git("describe", "--always", "--dirty").strip() or "unknown"


def source_state() -> str:
    """A hash of lorakit's source as the working tree has it: the commit plus any uncommitted changes."""
    state = _git("rev-parse", "HEAD") + _git("diff", "HEAD", "--", "src") + _git("status", "--porcelain", "--", "src")
    return hashlib.sha256(state.encode()).hexdigest()[:16]


def environment(device: str) -> dict[str, Any]:
    dirty = [] if os.environ.get("LORAKIT_GIT") else \
        [line.split(maxsplit=1)[1] for line in _git("status", "--porcelain", "--", "src").splitlines() if line.strip()]
    name = machine() + (f"; device {torch.cuda.get_device_name(0)}" if device == "cuda" else "")
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": name,
            "versions": versions(), "git": tree(), "dirty": dirty,
            "source_state": source_state(),
            "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------- main


def measure(todo: list[Case], device: str, dtype_name: str, pool: ProcessPoolExecutor | None, memory_steps: int,
            log: Callable[..., None]) -> dict[str, Any]:
    """Run the cases on one device and dtype, then the memory probes of the training cases (if a pool is
    given); everything the report needs."""
    dtype = DTYPES[dtype_name]
    precision = ("fp32 throughout" if dtype_name == "fp32" else
                 f"base weights cast to {dtype_name} (`model.to({dtype})`), LoRA A and B stored in fp32 in "
                 "both libraries, the trained head copy in the base dtype")
    raw: dict[str, Any] = {"environment": environment(device), "device": device, "dtype": dtype_name,
                           "precision": precision, "cases": {}, "speed": [], "memory": [], "memory_rows": []}
    log(f"{device} {dtype_name}: {', '.join(c.name for c in todo)}; torch threads {torch.get_num_threads()}")
    for case in todo:
        start = time.perf_counter()
        result = RUNNERS[case.kind](case, device, dtype, log)
        raw["cases"][case.name] = {"name": case.name, "description": case.describe(), **asdict(case), **result}
        log(f"{case.name}: " + ", ".join(f"{n} {v['median_ms']:.1f} ms" for n, v in result["variants"].items())
            + f" ({time.perf_counter() - start:.0f} s)")
    raw["speed"] = speed_rows(raw["cases"], {c.name: c for c in todo})
    for r in raw["speed"]:
        for impl, v in r["ms"].items():
            if v is not None and not (math.isfinite(v) and v > 0):
                raise SystemExit(f"non-finite or non-positive time for {impl} in {r['what']}: {v}")
    train_cases = [c for c in todo if c.kind == "train"]
    if pool is not None and train_cases:
        raw["memory"] = run_memory(pool, train_cases, device, dtype_name, memory_steps, log)
        raw["memory_rows"] = memory_rows(raw["memory"])
    if source_state() != raw["environment"]["source_state"]:
        raw["environment"]["source_changed_during_run"] = True
        log("lorakit's source changed while the benchmark ran; the report says so")
    return raw


def pick(parser: argparse.ArgumentParser, text: str, allowed: list[str] | tuple[str, ...], what: str) -> list[str]:
    """The comma-separated names in `text`, in order; a parser error naming the first unknown one (or none)."""
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        parser.error(f"unknown {what} {unknown[0] if unknown else ''!r}; {what}s: {', '.join(allowed)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    all_cases = [c.name for c in cases(False)]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny random models and batches, 2 steps: checks that the runner works")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cpu, and then cuda with bf16 too when a CUDA GPU is available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="the frozen base's weights (adapters stay fp32); default fp32 on cpu, bf16 on cuda")
    parser.add_argument("--cases", default=",".join(all_cases), help=f"comma-separated, from: {', '.join(all_cases)}")
    parser.add_argument("--weights", choices=("packaged", "random"), default="packaged",
                        help="random: MiniLM and SmolLM2 built from benchmarks/configs/ with random weights, for a "
                             "machine without the packaged models (a GPU machine that cannot install them)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: per case, ≥ 10)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per variant first (default: 2 for MiniLM, 1 for SmolLM2 and in --quick)")
    parser.add_argument("--memory-steps", type=int, default=None,
                        help="training steps per memory probe (default 3; quick 1); 0 skips the memory probes")
    parser.add_argument("--memory-only", action="store_true",
                        help="run only the memory probes, into the JSON beside --out from an earlier run (its "
                             "timings are kept), and rewrite the section")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file whose section to rewrite (default benchmarks/results.md; with --quick, a "
                             "new temporary directory); the JSON goes beside it")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    chosen = pick(parser, args.cases, all_cases, "case")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    for flag, value in (("--warmup", args.warmup), ("--memory-steps", args.memory_steps)):
        if value is not None and value < 0:
            parser.error(f"{flag} must be >= 0, got {value}")
    if args.memory_only and args.memory_steps == 0:
        parser.error("--memory-only with --memory-steps 0 has nothing to do")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available to torch")
    runs = [(args.device, args.dtype or ("bf16" if args.device == "cuda" else "fp32"))] if args.device else \
        [("cpu", args.dtype or "fp32")] + ([("cuda", "bf16")] if torch.cuda.is_available() else [])
    out = args.out or (Path(tempfile.mkdtemp(prefix="lorakit-perf-")) / "results.md" if args.quick else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    memory_steps = args.memory_steps if args.memory_steps is not None else (1 if args.quick else 3)
    command = " ".join(["python -m benchmarks", *map(shlex.quote, argv)])

    began = time.perf_counter()

    def log(*parts: Any) -> None:
        print(f"[perf {time.perf_counter() - began:5.0f} s]", *parts, flush=True)

    # The probes' server starts now, before any timing, so it imports the lorakit source the timings use.
    pool = probe_pool(2 if args.quick else 1, any(d == "cuda" for d, _ in runs)) if memory_steps > 0 else None
    try:
        for device, dtype_name in runs:
            todo = [c for c in cases(args.quick) if c.name in chosen]
            if args.steps is not None:
                todo = [dataclasses.replace(c, steps=args.steps) for c in todo]
            if args.warmup is not None:
                todo = [dataclasses.replace(c, warmup=args.warmup) for c in todo]
            if args.weights == "random" and not args.quick:
                todo = [dataclasses.replace(c, random_weights=True) for c in todo]
            name = "perf.json" if (device, dtype_name) == ("cpu", "fp32") else f"perf-{device}-{dtype_name}.json"
            if args.memory_only:
                if not out.with_name(name).is_file():
                    parser.error(f"--memory-only needs the JSON of an earlier run at {out.with_name(name)}")
                raw = json.loads(out.with_name(name).read_text(encoding="utf-8"))
                train_cases = [c for c in todo if c.kind == "train"]
                raw["memory"] = run_memory(pool, train_cases, device, dtype_name, memory_steps, log)
                raw["memory_rows"] = memory_rows(raw["memory"])
                raw["memory_run"] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                     "command": command, "git": tree()}
            else:
                raw = measure(todo, device, dtype_name, pool, memory_steps, log)
                raw.update(command=command, quick=args.quick)
            body = section(raw)
            replace_section(out, body.splitlines()[0], body)
            write_atomic(out.with_name(name), json.dumps(raw, indent=2) + "\n")
            print("\n" + body)
            print(f"wrote {out} and {out.with_name(name)}")
    finally:
        if pool is not None:
            pool.shutdown()
    return 0

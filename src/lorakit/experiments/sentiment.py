"""Study `sentiment`: the PEFT walkthrough's LoRA setting against three other ways to fine-tune.

The walkthrough (RoBERTa on SST-2) adapts the query projections only, r=4, α=32, dropout 0.01, lr 1e-3.
Here that setting fine-tunes the packaged all-MiniLM-L6-v2 for Rotten Tomatoes sentiment, next to LoRA on
query and value at r=8 (lorakit's default job), full fine-tuning, and training the classifier head alone,
on the same split and budget; the report has test accuracy, trainable parameters, the size of the saved
weights file and each job's wall-clock.

`fit` is the training job both this study and `rank-targets` run: `lorakit train`'s loop, optimizer,
schedule, batching and clipping, without its per-epoch validation and checkpoints, so a study of many runs
spends its time training.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train.config import RunConfig, build_config
from .report import Report, command_line

EPOCHS = 2
FULL_LR = 5e-5  # the usual BERT fine-tuning rate; at LoRA's 1e-3 full fine-tuning collapses to one class
HEAD_LR = 1e-2  # a linear probe: 770 weights on frozen features take a larger step than adapters do
EVAL_BATCH = 128  # evaluation batches are sorted by length, so a large one pads little
QUICK = {"data": {"max_train": 256}, "train": {"epochs": 1}}


# ---------------------------------------------------------------- one training job


def merged(*recipes: dict[str, Any]) -> dict[str, Any]:
    """Recipe dicts merged section by section (top-level plain values replaced); later ones win."""
    out: dict[str, Any] = {}
    for recipe in recipes:
        for key, value in recipe.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def accuracy(task, model: nn.Module, split: str = "test") -> float:
    from ..train.tasks import evaluate

    return evaluate(task, model, split, EVAL_BATCH)["accuracy"]


def fit(cfg: RunConfig, save_to: Path | None = None, before: bool = True) -> dict[str, Any]:
    """One job: load, test before (if asked), train `cfg.train.epochs` epochs, test after, save (if asked).

    As `lorakit train` does it, through the same loop (`lorakit.train.loop.fit`): `train.seed` seeds the
    classifier's and the adapters' init and orders the batches (grouped by length); AdamW on the trainable
    parameters, warmup then decay, gradient clipping. Unlike it: no validation pass, so the last weights are
    tested, not the best epoch's.
    Returns test accuracies, trainable and LoRA parameters, the adapted layers' names, steps, the saved
    weights file's bytes and the job's seconds."""
    from .. import LoraAdapter, atomic, lora_layers, save_adapter, tensorfile
    from ..train.loop import RunState
    from ..train.loop import fit as run_epochs
    from ..train.recipe import apply_method, schedule
    from ..train.tasks import prepare

    start = time.perf_counter()
    task = prepare(cfg)  # seeds torch with train.seed before building the model
    apply_method(cfg, task, print_fn=lambda *_: None)
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    adapters = [m for m in model.modules() if isinstance(m, LoraAdapter)]
    result: dict[str, Any] = {"trainable": sum(p.numel() for p in params),
                              "lora_params": sum(p.numel() for m in adapters for p in m.parameters()),
                              "adapted": [name for name, _ in lora_layers(model)]}
    if before:
        result["before"] = accuracy(task, model)
    split, t = task.splits["train"], cfg.train
    total = t.epochs * len(split.batches(t.batch_size, 0, True))
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg, total))
    model.train()
    state = run_epochs(model, task.forward, split, optimizer, scheduler, params, RunState(), t, progress_bar=False)
    result.update(after=accuracy(task, model), steps=state.step)
    if save_to is not None:
        if cfg.lora.method == "lora":  # the adapters plus the classifier (modules_to_save)
            weights = save_adapter(model, save_to, overwrite=True, print_fn=lambda *_: None)
        else:  # what `lorakit train` writes for full and head runs: every trained tensor
            weights = atomic.write_file(save_to / "model.safetensors", tensorfile.dumps(
                {n: p for n, p in model.named_parameters() if p.requires_grad}))
        result.update(file=weights.name, file_bytes=weights.stat().st_size)
    result["seconds"] = time.perf_counter() - start
    return result


def load_note(start: float, end: float | None = None) -> str:
    """A sentence on the machine's load over a study (`end`: now, if not given), which says how far its
    wall-clock can be trusted."""
    end, cores = os.getloadavg()[0] if end is None else end, os.cpu_count() or 1
    shared = max(start, end) > cores + 0.5  # the study itself keeps about `cores` threads busy
    return (f"Load average (1 min): {start:.1f} at the start, {end:.1f} at the end, on {cores} cores"
            + ("; other work shared the machine, so the times are longer than the runs' own." if shared else "."))


def split_facts(cfg: RunConfig) -> dict[str, Any]:
    """Sizes of the train/val/test splits of `cfg`, and the test split's majority label and its share."""
    from ..train.tasks import prepare

    task = prepare(cfg, with_model=False)
    test = task.splits["test"]
    counts = test.collate(list(range(test.size))).labels.bincount(minlength=len(task.label_names))
    k = int(counts.argmax())
    return {"sizes": {name: s.size for name, s in task.splits.items()},
            "majority_label": task.label_names[k], "majority": counts[k].item() / test.size}


# ---------------------------------------------------------------- the study


@dataclass
class Setting:
    name: str
    what: str
    recipe: dict[str, Any]


SETTINGS = [
    Setting("walkthrough: LoRA query r=4",
            "the walkthrough's `LoraConfig`: LoRA on query only, r=4, α=32, dropout 0.01; lr 1e-3",
            {"lora": {"targets": ["query"], "r": 4, "alpha": 32, "dropout": 0.01}, "train": {"lr": 1e-3}}),
    Setting("LoRA query+value r=8",
            "lorakit's default job: LoRA on query and value, r=8, α=16, dropout 0.1; lr 1e-3",
            {"lora": {"targets": ["query", "value"], "r": 8, "alpha": 16, "dropout": 0.1}, "train": {"lr": 1e-3}}),
    Setting("full fine-tuning",
            f"`lora.method = \"full\"`: every weight trains, at lr {FULL_LR:g}, the usual rate for BERT — at the "
            f"adapters' 1e-3, full fine-tuning of BERT collapses to answering one class for every text",
            {"lora": {"method": "full"}, "train": {"lr": FULL_LR}}),
    Setting("classifier head only",
            f"`lora.method = \"head\"`: only the new 384→2 classifier trains, on the frozen encoder, at lr "
            f"{HEAD_LR:g} — a linear probe, given the larger step such probes usually take",
            {"lora": {"method": "head"}, "train": {"lr": HEAD_LR}}),
]


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s:.0f} s ({s / 60:.1f} min)"


def run(out: Path, quick: bool = False, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # fp32, as the published numbers were measured (the default job runs bf16 where the hardware has it)
    common = merged({"train": {"epochs": EPOCHS, "seed": seed, "bf16": False}}, QUICK if quick else {})
    cfg = build_config(common)
    facts = split_facts(cfg)
    results: dict[str, dict[str, Any]] = {}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lorakit-sentiment-") as tmp:
        for i, s in enumerate(SETTINGS):
            r = results[s.name] = fit(build_config(merged(common, s.recipe)), save_to=Path(tmp) / str(i))
            print(f"  {s.name}: test accuracy {r['before']:.4f} → {r['after']:.4f}, {r['trainable']:,} trainable "
                  f"parameters, {r['seconds']:.0f} s", flush=True)

    sizes, t = facts["sizes"], cfg.train
    report = Report("LoRA on the query projections against LoRA q+v, full fine-tuning and the head alone", out)
    report.header(
        f"all-MiniLM-L6-v2 (BERT, 6 layers, hidden size 384) fine-tuned for Rotten Tomatoes sentiment four "
        f"ways on one split — {sizes['train']:,} train / {sizes['test']:,} test snippets, split by a hash of the "
        f"text (the {sizes['val']:,} validation snippets are not used), at most {cfg.model.max_length} tokens — "
        f"and one budget: {t.epochs} epoch{'s' * (t.epochs != 1)}, batch {t.batch_size} grouped by length, AdamW "
        f"(weight decay {t.weight_decay:g}), {t.warmup:.0%} warmup then {t.schedule} decay, clipping at norm "
        f"{t.max_grad_norm:g}; the last weights are tested. The walkthrough trained RoBERTa-base on SST-2 for 5 "
        f"epochs at batch 16; model, data and budget here are smaller, the adapter setting is the same. In both "
        f"LoRA settings the new classifier trains in full, as PEFT's `task_type=\"SEQ_CLS\"` has it.",
        command_line(), [seed], quick)

    names = [s.name for s in SETTINGS]
    rows = [[n, f"{results[n]['trainable']:,}", f"{results[n]['before']:.4f} → **{results[n]['after']:.4f}**",
             _size(results[n]["file_bytes"]), _secs(results[n]["seconds"])] for n in names]
    report.table(["setting", "trainable params", "test accuracy (before → after)", "file size", "wall-clock"], rows)
    report.add(*[f"- **{s.name}**: {s.what}." for s in SETTINGS],
               f"- Always answering the majority class ({facts['majority_label']!r}) scores "
               f"{facts['majority']:.4f} on the test split.",
               f"- File size: the saved weights, as `lorakit train` writes them ({results[names[0]]['file']} for "
               f"the adapters, with the classifier; {results[names[2]]['file']} of the trained tensors otherwise). "
               f"Wall-clock: the whole job — load model and data, test, train "
               f"({results[names[0]]['steps']:,} steps), test, save — one job at a time. {load_note(load[0])}", "")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = ["tab:blue", "tab:cyan", "tab:red", "tab:grey"]
    labels = ["walkthrough\nq, r=4", "LoRA\nq+v, r=8", "full\nfine-tuning", "head\nonly"]
    acc = [100 * results[n]["after"] for n in names]
    axes[0].bar(range(4), acc, color=colors)
    axes[0].axhline(100 * facts["majority"], color="black", ls="--", lw=1, label="majority class")
    axes[0].set(ylabel="test accuracy (%)", ylim=(max(0.0, min(acc + [100 * facts["majority"]]) - 10), 100),
                title="test accuracy after training")
    axes[0].legend(loc="lower right", fontsize=8)
    for i, a in enumerate(acc):
        axes[0].text(i, a + 0.5, f"{a:.1f}", ha="center", fontsize=8)
    axes[1].bar(range(4), [results[n]["trainable"] for n in names], color=colors)
    axes[1].set(yscale="log", ylabel="trainable parameters", title="trainable parameters (log scale)")
    axes[2].bar(range(4), [results[n]["seconds"] for n in names], color=colors)
    axes[2].set(ylabel="seconds", title="wall-clock of the job")
    for ax in axes:
        ax.set_xticks(range(4), labels, fontsize=8)
    fig.tight_layout()
    report.figure(fig, "sentiment", "test accuracy, trainable parameters and wall-clock of the four settings")
    plt.close(fig)

    report.add("## What the numbers say", "", *findings(results, facts))
    return report.write()


def findings(results: dict[str, dict[str, Any]], facts: dict[str, Any]) -> list[str]:
    """Sentences read off the numbers, one a bullet."""
    walk, qv, full, head = (results[s.name] for s in SETTINGS)
    n_test, majority = facts["sizes"]["test"], facts["majority"]
    best = max(results, key=lambda n: results[n]["after"])
    p = results[best]["after"]
    se = math.sqrt(p * (1 - p) / n_test)
    noise = 2 * se  # two standard errors of one accuracy on this test set

    def versus(a: float, b: float, them: str) -> str:
        d = a - b
        if abs(d) < noise:
            return f"level with {them} ({100 * d:+.1f} points, within noise)"
        return f"{100 * abs(d):.1f} points {'ahead of' if d > 0 else 'behind'} {them}"

    def share(r: dict[str, Any]) -> str:
        gain = full["after"] - majority
        if gain < noise:
            return "full fine-tuning itself does not clearly beat the majority class, so no share of its gain is given"
        return f"that is {(r['after'] - majority) / gain:.0%} of full fine-tuning's gain over the majority class"

    level = [n for n in results if n != best and p - results[n]["after"] < noise]
    lines = [
        f"- One seed and {n_test:,} test examples give a standard error near {100 * se:.1f} points; a difference "
        f"under {100 * noise:.1f} points (two standard errors) is called noise, not a win.",
        f"- Best test accuracy: **{best}** ({p:.4f})"
        + (f", level within noise with {', '.join(level)}." if level else ", ahead of every other setting by more "
           "than noise."),
        f"- The walkthrough's setting trains {walk['trainable']:,} parameters, "
        f"{walk['trainable'] / full['trainable']:.2%} of full fine-tuning's {full['trainable']:,}, and reaches "
        f"{walk['after']:.4f}: "
        f"{versus(walk['after'], full['after'], 'full fine-tuning')}; {share(walk)}. Its file is "
        f"{full['file_bytes'] / walk['file_bytes']:,.0f}× smaller.",
        f"- LoRA on query and value at r=8 trains {qv['trainable'] / walk['trainable']:.1f}× the walkthrough's "
        f"parameters ({qv['trainable'] / full['trainable']:.2%} of full fine-tuning's) and reaches {qv['after']:.4f}: "
        f"{versus(qv['after'], walk['after'], 'the walkthrough')}, "
        f"{versus(qv['after'], full['after'], 'full fine-tuning')}; {share(qv)}.",
        f"- The classifier alone ({head['trainable']:,} parameters) reaches {head['after']:.4f}; the walkthrough's "
        f"adapters with it are {versus(walk['after'], head['after'], 'the head alone')}, so "
        + ("the adapters adapt the encoder beyond what a linear probe on its features can do."
           if walk["after"] - head["after"] >= noise else "on this budget the adapters add no more than noise to a "
           "linear probe."),
        f"- Wall-clock: {', '.join(n + ' ' + _secs(r['seconds']) for n, r in results.items())}. Full fine-tuning "
        f"takes {full['seconds'] / walk['seconds']:.1f}× the walkthrough's time"
        + (": the same forward and backward passes through the network, plus a gradient and AdamW state for every "
           "weight." if full["seconds"] > 1.1 * walk["seconds"] else "."),
    ]
    stuck = [n for n, r in results.items() if abs(r["after"] - majority) < 0.5 / n_test]
    if stuck:
        lines.append(f"- {', '.join(stuck)}: exactly the majority-class baseline "
                     f"({majority:.4f}); most likely {'it has' if len(stuck) == 1 else 'they have'} learned nothing "
                     f"yet.")
    return lines

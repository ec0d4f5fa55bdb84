"""Three ways to fine-tune the packaged all-MiniLM-L6-v2 for Rotten Tomatoes sentiment, on one split and budget.

    python -m benchmarks.sentiment            # ~30 min on 2 CPU cores; rewrites its section of benchmarks/results.md
    python -m benchmarks.sentiment --quick    # smoke test (256 examples, 1 epoch, ~2.5 min); writes to a temp dir

1. lora: lorakit LoRA, the default job (`RunConfig()`) in fp32 — LoRA on query,value, the classifier trained in full.
2. lora-bf16: the same with `train.bf16 = true` (bf16 autocast; the adapters stay fp32).
3. full: lorakit full fine-tuning, the run of (1) with `lora.method = "full"` and lr 5e-5.
4. peft: Hugging Face PEFT + `transformers.Trainer`, with the hyperparameters of (1) read from the same
   RunConfig, on exactly the texts and labels of lorakit's train/validation/test split.
5. peft-bf16: the same with `TrainingArguments(bf16=True)`.

    python -m benchmarks.sentiment --methods lora-bf16,peft   # some of them

Wall-clock is the whole job, as `lorakit train` does it: load tokenizer and model, tokenize, test before,
train with per-epoch validation and checkpoints, restore the best-validation weights, test after, save.
The numbers go to a section of results.md and, raw, to sentiment.json beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lorakit import hub, summary
from lorakit.atomic import write_file
from lorakit.files import WEIGHTS_NAME
from lorakit.train.config import RunConfig, build_config
from lorakit.train.recipe import apply_method, train
from lorakit.train.tasks import default_targets, prepare

from benchmarks.common import RESULTS, job_environment, pick, replace_section, silent

TITLE = "## Sentiment: LoRA vs full fine-tuning vs PEFT + Trainer"
FULL_LR = 5e-5  # the usual BERT fine-tuning rate; full fine-tuning at LoRA's 1e-3 diverges
QUICK = ["--data.max_train", "256", "--train.epochs", "1"]
SPLITS = ("train", "val", "test")
METHODS = ("lora", "lora-bf16", "full", "peft", "peft-bf16")


def tagged(tag: str):
    return lambda *args: print(f"[{tag}]", *args, flush=True)


# ---------------------------------------------------------------- the runs


def run_lorakit(name: str, cfg: RunConfig, work: Path) -> dict[str, Any]:
    """One `lorakit.train.train` job into work/<name>; its test accuracy, time and file."""
    cfg = dataclasses.replace(cfg, out=str(work / name))
    counted = prepare(cfg)  # a throwaway copy, only to count what apply_method makes trainable
    apply_method(cfg, counted, print_fn=silent)
    trainable = summary(counted.model, print_fn=silent).trainable
    del counted

    start = time.perf_counter()
    result = train(cfg, overwrite=True, print_fn=tagged(name), progress_bar=False)
    seconds = time.perf_counter() - start

    run = Path(result["run"])
    weights = run / "adapter" / WEIGHTS_NAME if cfg.lora.method == "lora" else run / "model.safetensors"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"method": name, "trainable_params": trainable, "lr": cfg.train.lr,
            "test_before": result["before"]["accuracy"], "test_after": result["after"]["accuracy"],
            "val_by_epoch": [r["accuracy"] for r in records if r.get("event") == "val"],
            "steps": result["steps"], "seconds": seconds, "file": weights.name, "file_bytes": weights.stat().st_size}


def lorakit_split(cfg: RunConfig) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    """lorakit's own train/val/test texts and labels (after data.max_train), for the PEFT run."""
    task = prepare(cfg, with_model=False)
    data = {}
    for s in SPLITS:
        split = task.splits[s]
        data[s] = (task.texts[s], split.collate(list(range(split.size))).labels.tolist())
    return data, task.label_names


def data_facts(data: dict[str, tuple[list[str], list[int]]], label_names: list[str]) -> dict[str, Any]:
    """Split sizes, and the majority class of the training split with its share of each split: the
    accuracy of a model that always answers it."""
    train_labels = data["train"][1]
    majority = max(range(len(label_names)), key=train_labels.count)
    return {"sizes": {s: len(data[s][1]) for s in SPLITS}, "majority_label": label_names[majority],
            "majority_share": {s: data[s][1].count(majority) / len(data[s][1]) for s in SPLITS}}


def run_peft(cfg: RunConfig, data: dict[str, tuple[list[str], list[int]]], label_names: list[str],
             work: Path, bf16: bool = False) -> dict[str, Any]:
    """PEFT LoRA + transformers.Trainer with cfg's hyperparameters, on lorakit's split; bf16 autocast if asked."""
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments)

    path = cfg.model.path or hub.minilm_dir()
    name = "peft-bf16" if bf16 else "peft"
    log = tagged(name)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(cfg.train.seed)  # as lorakit's prepare() does, so the fresh classifier is the same one
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(label_names))
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    targets = cfg.lora.targets or default_targets(AutoConfig.from_pretrained(path).model_type)
    # task_type SEQ_CLS adds the classifier to modules_to_save: it trains in full, like lorakit's head.
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             lora_dropout=cfg.lora.dropout, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def encode(texts: list[str], labels: list[int]) -> list[dict[str, Any]]:
        enc = tokenizer(texts, truncation=True, max_length=cfg.model.max_length, return_token_type_ids=False)
        return [{"input_ids": ids, "attention_mask": mask, "labels": y}
                for ids, mask, y in zip(enc["input_ids"], enc["attention_mask"], labels)]

    sets = {s: encode(*data[s]) for s in SPLITS}
    steps = cfg.train.epochs * math.ceil(len(sets["train"]) / cfg.train.batch_size)
    args = TrainingArguments(
        output_dir=str(work / f"{name}-trainer"),
        num_train_epochs=cfg.train.epochs,
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.eval_batch_size,
        learning_rate=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        # transformers 5 has no warmup_ratio (a float warmup_steps is a ratio, rounded up); an int gives
        # lorakit's warmup step count exactly.
        warmup_steps=int(cfg.train.warmup * steps),
        lr_scheduler_type=cfg.train.schedule,
        max_grad_norm=cfg.train.max_grad_norm,
        optim="adamw_torch",  # torch.optim.AdamW, as lorakit uses (the default here is the fused kernel)
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        seed=cfg.train.seed,
        logging_steps=cfg.train.log_every,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=bf16,
    )

    def accuracy(p) -> dict[str, float]:
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    trainer = Trainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer),
                      train_dataset=sets["train"], eval_dataset=sets["val"], processing_class=tokenizer,
                      compute_metrics=accuracy)
    before = trainer.predict(sets["test"]).metrics["test_accuracy"]
    log(f"test accuracy before training: {before:.4f}")
    trainer.train()
    after = trainer.predict(sets["test"]).metrics["test_accuracy"]
    log(f"test accuracy after training (best validation epoch restored): {after:.4f}")
    model.save_pretrained(work / f"{name}-adapter")
    seconds = time.perf_counter() - start

    weights = work / f"{name}-adapter" / "adapter_model.safetensors"
    history = trainer.state.log_history
    return {"method": name, "trainable_params": trainable, "lr": cfg.train.lr, "test_before": before,
            "test_after": after, "val_by_epoch": [h["eval_accuracy"] for h in history if "eval_accuracy" in h],
            "steps": trainer.state.global_step, "seconds": seconds, "file": weights.name,
            "file_bytes": weights.stat().st_size}


# ---------------------------------------------------------------- the report


LABELS = {"lora": "lorakit LoRA", "lora-bf16": "lorakit LoRA, bf16 autocast", "full": "lorakit full fine-tuning",
          "peft": "PEFT LoRA + Trainer", "peft-bf16": "PEFT LoRA + Trainer, bf16 autocast"}


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _times(a: float, b: float) -> str:
    """'1.8× faster' when a takes less time than b, else '1.2× slower'."""
    return f"{b / a:.1f}× faster" if a <= b else f"{a / b:.1f}× slower"


def _points(a: float, b: float) -> str:
    return f"{100 * (a - b):+.1f} points"


def comparison(by: dict[str, dict[str, Any]], facts: dict[str, Any]) -> str:
    """A few sentences read off the numbers of the runs that were made."""
    lora, full, peft, fast = by.get("lora"), by.get("full"), by.get("peft"), by.get("lora-bf16")
    n_test, majority = facts["sizes"]["test"], facts["majority_share"]["test"]
    out = []
    if lora and full:
        out.append(
            f"lorakit LoRA trains {lora['trainable_params'] / full['trainable_params']:.2%} of the parameters that "
            f"full fine-tuning trains and reaches {lora['test_after']:.1%} test accuracy against "
            f"{full['test_after']:.1%} ({_points(lora['test_after'], full['test_after'])}), in a run "
            f"{_times(lora['seconds'], full['seconds'])}, with a file {full['file_bytes'] / lora['file_bytes']:.0f}× "
            f"smaller.")
    if lora and peft:
        out.append(
            f"With the same hyperparameters, lorakit LoRA and PEFT + Trainer reach {lora['test_after']:.1%} and "
            f"{peft['test_after']:.1%} ({_points(lora['test_after'], peft['test_after'])} for lorakit); lorakit's "
            f"run is {_times(lora['seconds'], peft['seconds'])} ({lora['seconds']:.0f} s vs {peft['seconds']:.0f} s).")
    others = [(k, by[k]) for k in ("peft", "peft-bf16") if k in by]
    if fast and others:
        out.append(
            f"End to end (the goal: a run at least 2× faster than PEFT + Trainer's, to the same test accuracy), "
            f"lorakit LoRA with bf16 autocast takes {fast['seconds']:.0f} s to {fast['test_after']:.1%}; "
            + "; ".join(f"{LABELS[k]} takes {r['seconds']:.0f} s to {r['test_after']:.1%}, "
                        f"{r['seconds'] / fast['seconds']:.2f}× lorakit's time" for k, r in others) + ".")
    p = next(iter(by.values()))["test_after"]
    se = math.sqrt(p * (1 - p) / n_test)
    befores = [f"{r['test_before']:.1%}" for r in by.values()]
    start = (f"All runs start from the same untrained model and fresh head ({befores[0]} test accuracy before "
             f"training)" if len(set(befores)) == 1 else
             f"The untrained models differ ({', '.join(befores)} test accuracy before training)")
    out.append(f"{start}; one seed and {n_test:,} test examples give a standard error near {100 * se:.1f} points, "
               f"so differences under about {200 * se:.0f} points are noise.")
    stuck = [LABELS[r["method"]] for r in by.values() if abs(r["test_after"] - majority) < 0.5 / n_test]
    if stuck:
        out.append(f"{' and '.join(stuck)} score{'s' * (len(stuck) == 1)} exactly what answering "
                   f"{facts['majority_label']!r} for every text scores ({majority:.1%}): most likely "
                   f"{'it has' if len(stuck) == 1 else 'they have'} learned nothing yet.")
    return " ".join(out)


def section(results: list[dict[str, Any]], env: dict[str, Any], cfg: RunConfig, facts: dict[str, Any],
            command: str, quick: bool) -> str:
    by = {r["method"]: r for r in results}
    sizes, majority = facts["sizes"], facts["majority_share"]
    alpha = cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.r
    targets = ",".join(map(str, cfg.lora.targets or default_targets("bert")))
    rows = [f"| {LABELS[r['method']]} | {r['trainable_params']:,} | {r['test_before']:.4f} → **{r['test_after']:.4f}** "
            f"| {' / '.join(f'{v:.4f}' for v in r['val_by_epoch'])} | {r['seconds']:,.0f} s "
            f"({r['seconds'] / 60:.1f} min) | {_size(r['file_bytes'])} |" for r in results]
    git = f" (git {env['git']})" if env["git"] else ""
    about = {
        "lora": f"- **lorakit LoRA**: the default job (`RunConfig()`) with `train.bf16 = false` — LoRA "
                f"r={cfg.lora.r}, α={alpha:g}, dropout {cfg.lora.dropout:g} on {targets}; the classifier trains in "
                f"full; lr {cfg.train.lr:g}.",
        "lora-bf16": "- **lorakit LoRA, bf16 autocast**: the same run with `train.bf16 = true`: the forward "
                     "autocasts to bfloat16, the adapters and the head stay fp32.",
        "full": f"- **lorakit full fine-tuning**: `lora.method = \"full\"`, every weight trains, lr {FULL_LR:g}: at "
                f"LoRA's {cfg.train.lr:g}, full fine-tuning of BERT diverges (in a shorter check, 4,096 examples "
                f"for one epoch, the loss stayed near ln 2 and the model answered the majority class for every text).",
        "peft": "- **PEFT LoRA + Trainer**: `LoraConfig(task_type=\"SEQ_CLS\")` (the classifier trains in full) and "
                "`transformers.Trainer` with the lorakit LoRA hyperparameters, on the same texts and labels. What "
                "still differs: the data order and length grouping (Trainer's `LengthGroupedSampler`), the LoRA A "
                "init draw, warmup ramping from 0 instead of lr/(warmup+1), and Trainer exempting biases from "
                "weight decay.",
        "peft-bf16": "- **PEFT LoRA + Trainer, bf16 autocast**: the same with `TrainingArguments(bf16=True)`.",
    }
    lines = [
        TITLE,
        "",
        *(["**Quick smoke test** (`--quick`): a tiny budget, not a benchmark.", ""] if quick else []),
        f"all-MiniLM-L6-v2 fine-tuned for Rotten Tomatoes sentiment several ways, on one split — "
        f"{sizes['train']:,} train / {sizes['val']:,} validation / {sizes['test']:,} test snippets, split by a "
        f"hash of the text, {cfg.model.max_length} tokens at most — and one budget: {cfg.train.epochs} epoch{'s' * (cfg.train.epochs != 1)}, "
        f"batch {cfg.train.batch_size}, AdamW (weight decay {cfg.train.weight_decay:g}), {cfg.train.warmup:.0%} "
        f"warmup then {cfg.train.schedule} decay, gradient clipping at norm {cfg.train.max_grad_norm:g}, batches grouped "
        f"by length and padded per batch, validation after each epoch, and the best-validation weights restored "
        f"before the test. Always answering the majority class ({facts['majority_label']!r}) scores "
        f"{majority['test']:.4f} on the test split, {majority['val']:.4f} on validation.",
        "",
        f"- date: {env['date']}",
        f"- machine: {env['cpu']}, {env['cores']} cores ({env['torch_threads']} torch threads), one run at a time",
        f"- versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, lorakit {env['lorakit']}{git}",
        f"- command: `{command}`",
        f"- seed: {cfg.train.seed}",
        "",
        "| method | trainable params | test accuracy (before → after) | validation accuracy by epoch | wall-clock "
        "| file size |",
        "|---|---:|---|---|---:|---:|",
        *rows,
        "",
        *(about[r["method"]] for r in results),
        "- wall-clock: the whole job — load, tokenize, test before, train with per-epoch validation and "
        "checkpoints, restore the best epoch, test after, save. File size: the saved weights file "
        "(adapter_model.safetensors for the adapters, model.safetensors for full fine-tuning).",
        "",
        comparison(by, facts),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sentiment", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 training examples, 1 epoch: a smoke test")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file whose section to rewrite (default: benchmarks/results.md; with --quick, "
                             "a new temporary directory); sentiment.json goes beside it")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, run in this order, from: {', '.join(METHODS)}")
    parser.add_argument("--from-json", type=Path, default=None, metavar="JSON",
                        help="train nothing: rewrite the section from the sentiment.json of an earlier run "
                             "(default --out: the results.md beside it)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    methods = pick(parser, args.methods, METHODS, "method")

    if args.from_json:
        raw = json.loads(args.from_json.read_text(encoding="utf-8"))
        cfg, results, env, command, quick = (build_config(raw["config"]), raw["results"], raw["environment"],
                                             raw["command"], raw["quick"])
        facts = raw.get("data") or data_facts(*lorakit_split(cfg))
        out = args.out or args.from_json.with_name("results.md")
    else:
        quick = args.quick
        command = " ".join(["python -m benchmarks.sentiment", *map(shlex.quote, argv)])
        out = args.out or (Path(tempfile.mkdtemp(prefix="lorakit-bench-")) / "results.md" if quick else RESULTS)
        base = [*(QUICK if quick else []), "--train.bf16", "false"]  # fp32 unless a job asks for bf16
        cfg = build_config(None, base)
        full_cfg = build_config({"lora": {"method": "full"}, "train": {"lr": FULL_LR}}, base)
        bf16_cfg = build_config(None, [*base, "--train.bf16", "true"])
        env = job_environment()
        data, label_names = lorakit_split(cfg)
        facts = data_facts(data, label_names)
        print(f"split: {facts['sizes']}; torch threads {torch.get_num_threads()}", flush=True)
        with tempfile.TemporaryDirectory(prefix="lorakit-bench-runs-") as tmp:
            work = Path(tmp)
            runs = {"lora": lambda: run_lorakit("lora", cfg, work),
                    "lora-bf16": lambda: run_lorakit("lora-bf16", bf16_cfg, work),
                    "full": lambda: run_lorakit("full", full_cfg, work),
                    "peft": lambda: run_peft(cfg, data, label_names, work),
                    "peft-bf16": lambda: run_peft(cfg, data, label_names, work, bf16=True)}
            results = [runs[m]() for m in methods]

    for r in results:
        bad = [k for k in ("test_before", "test_after", "seconds") if not math.isfinite(r[k])]
        if bad:
            raise SystemExit(f"{r['method']}: non-finite {', '.join(bad)}: {r}")
    body = section(results, env, cfg, facts, command, quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_section(out, TITLE, body)
    raw = {"environment": env, "command": command, "seed": cfg.train.seed, "quick": quick, "data": facts,
           "config": cfg.to_dict(), "results": results}
    write_file(out.with_name("sentiment.json"), json.dumps(raw, indent=2) + "\n")
    print("\n" + body)
    print(f"wrote {out} and {out.with_name('sentiment.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Study `causal-lm`: SmolLM2-135M on Hamlet — LoRA on q_proj,v_proj vs LoRA on every linear layer vs
full fine-tuning.

All three run the Hamlet recipe (recipes/causal-lm.toml: its data, blocks, epochs, batch size, warmup,
bf16 autocast) through `lorakit.train.train`. Both LoRA settings use r=8, α=16 and the recipe's lr;
"all-linear" adapts every nn.Linear but lm_head. Full fine-tuning trains every weight (the embedding too,
which SmolLM2 ties to lm_head) at a lower lr. Compared: held-out test perplexity, trainable parameters,
seconds per optimizer step, the size of what each run saves, and greedy continuations of Hamlet-like
prompts from the base and from each fine-tuned model, reloaded from its run directory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import LoraAdapter, summary
from .report import Report, command_line

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "causal-lm.toml"
RANK, ALPHA = 8, 16
FULL_LR = 5e-5  # full fine-tuning moves every weight, so a tenth of the recipe's LoRA lr
PROMPTS = ("HAMLET. To be, or not to be,", "KING. My lord,")
NEW_TOKENS = 30
# Quick mode: a tiny budget with the same three settings, to check the study runs end to end.
QUICK_DATA = {"block_size": 64, "max_train": 16}
QUICK_BATCH, QUICK_PROMPTS, QUICK_NEW_TOKENS = 4, 1, 10


@dataclass(frozen=True)
class Setting:
    name: str
    method: str  # lora.method
    targets: list[str] | None  # lora.targets (LoRA only)
    lr: float | None  # None: the recipe's


SETTINGS = (
    Setting("LoRA q_proj, v_proj", "lora", ["q_proj", "v_proj"], None),
    Setting("LoRA all linear", "lora", ["all-linear"], None),
    Setting("full fine-tuning", "full", None, FULL_LR),
)


@dataclass
class Outcome:
    """What one training run measured."""

    before: float  # test perplexity of the base
    after: float  # test perplexity after training
    reloaded: float  # test perplexity of the model rebuilt from the run directory
    trainable: int
    steps: int
    sec_per_step: float  # median over the steps of the training loop: forward, backward, optimizer step
    mean_sec_per_step: float  # the same, the mean (the first step's one-time setup included)
    wall: float  # the whole train() call: loading, evaluations, saving
    first_loss: float
    last_loss: float
    saved_bytes: int
    lr: float


def recipe_for(recipe: dict, s: Setting, out: Path, quick: bool, seed: int) -> dict:
    """The Hamlet recipe with one setting's method, targets and lr; every other key as the recipe has it."""
    r = copy.deepcopy(recipe)
    r["out"] = str(out)
    r.setdefault("lora", {}).update(method=s.method, r=RANK, alpha=ALPHA)
    if s.targets is not None:
        r["lora"]["targets"] = list(s.targets)
    train = r.setdefault("train", {})
    train.update(seed=seed, log_every=1)  # a record every step, for step_seconds
    if s.lr is not None:
        train["lr"] = s.lr
    if quick:
        r.setdefault("data", {}).update(QUICK_DATA)
        train["batch_size"] = QUICK_BATCH
    return r


def step_seconds(records: list[dict], batch_size: int, n_train: int) -> list[float]:
    """Seconds each optimizer step took, from the `train` records of metrics.jsonl (one per step).

    A record's examples_per_s is the examples seen since the epoch began over the seconds since then, so
    seen / examples_per_s is the loop's time up to that step; consecutive differences are the steps'
    times (one epoch, no gradient accumulation)."""
    train = [r for r in records if r.get("event") == "train"]
    if [r["step"] for r in train] != list(range(1, len(train) + 1)):
        raise ValueError("metrics.jsonl needs a train record for every step (train.log_every = 1)")
    elapsed = [min(r["step"] * batch_size, n_train) / r["examples_per_s"] for r in train]
    return [b - a for a, b in zip([0.0, *elapsed], elapsed)]


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


@torch.no_grad()
def continue_text(task, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of `prompt` (fp32, no autocast), without the prompt."""
    enc = task.tokenizer(prompt, return_tensors="pt").to(task.device)
    pad = task.tokenizer.pad_token_id or task.tokenizer.eos_token_id
    out = task.model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return task.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def run(out: Path, quick: bool = False, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.runs import load_run
    from ..train.config import build_config, load_recipe
    from ..train.recipe import train
    from ..train.tasks import evaluate, prepare

    recipe = load_recipe(RECIPE)
    prompts = PROMPTS[:QUICK_PROMPTS] if quick else PROMPTS
    new_tokens = QUICK_NEW_TOKENS if quick else NEW_TOKENS
    load = [os.getloadavg()[0]]
    outcomes: dict[str, Outcome] = {}
    texts: dict[str, list[str]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorakit-causal-lm-") as tmp:
        runs = {s.name: Path(tmp) / f"run{i}" for i, s in enumerate(SETTINGS)}
        for s in SETTINGS:
            cfg = build_config(recipe_for(recipe, s, runs[s.name], quick, seed))
            print(f"lorakit: causal-lm: training {s.name} ...", flush=True)
            t = time.perf_counter()
            result = train(cfg, overwrite=True, print_fn=lambda *_: None, progress_bar=False)
            wall = time.perf_counter() - t
            records = [json.loads(line) for line in (runs[s.name] / "metrics.jsonl").read_text().splitlines()]
            n_train = prepare(cfg, with_model=False).splits["train"].size
            per_step = step_seconds(records, cfg.train.batch_size, n_train)
            assert len(per_step) == result["steps"], (len(per_step), result["steps"])
            losses = [r["loss"] for r in records if r.get("event") == "train"]
            # Rebuild the model from the run directory: checks what was saved, and gives the parameter count.
            _, task = load_run(str(runs[s.name]))
            reloaded = evaluate(task, task.model, "test", cfg.train.eval_batch_size)["perplexity"]
            trainable = (summary(task.model, print_fn=lambda _: None).total if s.method == "full" else
                         sum(p.numel() for m in task.model.modules() if isinstance(m, LoraAdapter)
                             for p in m.parameters()))
            texts[s.name] = [continue_text(task, p, new_tokens) for p in prompts]
            saved = runs[s.name] / ("adapter" if s.method == "lora" else "model.safetensors")
            outcomes[s.name] = Outcome(result["before"]["perplexity"], result["after"]["perplexity"], reloaded,
                                       trainable, len(per_step), statistics.median(per_step),
                                       sum(per_step) / len(per_step), wall, losses[0], losses[-1],
                                       size_of(saved), cfg.train.lr)
            o = outcomes[s.name]
            print(f"lorakit: causal-lm: {s.name}: perplexity {o.before:.2f} → {o.after:.2f}, "
                  f"{o.sec_per_step:.2f} s/step (median), {wall:.0f} s", flush=True)
            del task
        _, base = load_run(str(runs[SETTINGS[0].name]), with_adapter=False)
        base_total = summary(base.model, print_fn=lambda _: None).total
        texts = {"base model": [continue_text(base, p, new_tokens) for p in prompts], **texts}
        del base
    load.append(os.getloadavg()[0])
    total = time.perf_counter() - start

    # The report.
    cfg = build_config(recipe_for(recipe, SETTINGS[0], Path("unused"), quick, seed))
    n_test = prepare(cfg, with_model=False).splits["test"].size
    report = Report("LoRA vs full fine-tuning: SmolLM2-135M on Hamlet", out)
    report.header(
        f"SmolLM2-135M (the packaged Instruct model, dequantized to fp32 from its Q4_1 GGUF) fine-tuned on the "
        f"text of Hamlet with the recipe `recipes/causal-lm.toml` "
        f"({cfg.data.max_train} training blocks of {cfg.data.block_size} tokens, {cfg.train.epochs} epoch, batch "
        f"{cfg.train.batch_size}, AdamW with {100 * cfg.train.warmup:g}% warmup then linear decay, bf16 autocast), "
        f"three ways: LoRA (r={RANK}, α={ALPHA}, dropout {cfg.lora.dropout:g}) on q_proj and v_proj; the same LoRA on "
        f"every linear layer but lm_head; and full fine-tuning of every weight. Perplexity is on the "
        f"{n_test} held-out test blocks (the last 5% of the play; no token of them is trained on).",
        command_line(), [seed], quick)
    base_ppl = outcomes[SETTINGS[0].name].before
    rows = [["base model (no training)", "0", f"{base_ppl:.2f}", "—", "—", "—"]]
    for s in SETTINGS:
        o = outcomes[s.name]
        saved = "adapter/" if s.method == "lora" else "model.safetensors"
        rows.append([s.name, f"{o.trainable:,} ({100 * o.trainable / base_total:.2f}%)",
                     f"{o.before:.2f} → **{o.after:.2f}**", f"{o.lr:g}",
                     f"{o.sec_per_step:.2f} ({o.mean_sec_per_step:.2f})",
                     f"{o.saved_bytes / 1e6:.2f} MB ({saved})"])
    report.table(["setting", "trainable parameters (% of the base's)", "test perplexity before → after",
                  "lr", "seconds per step, median (mean)", "saved file size"], rows)
    report.add(f"Seconds per step: the time of each of the {outcomes[SETTINGS[0].name].steps} optimizer steps "
               f"(forward, backward, gradient clipping, AdamW step; batch {cfg.train.batch_size}), taken from the "
               f"run's metrics.jsonl (a record a step, each with the examples per second since the epoch began); "
               f"loading, evaluation and saving are not in it. The median resists a step slowed by other work on "
               f"the machine; the mean counts every step, the first one's one-time setup included. The base has "
               f"{base_total:,} parameters (SmolLM2 ties lm_head to the embedding; counted once). Saved file size: "
               f"what the run keeps to rebuild its model: the adapter directory, or every trained weight for full "
               f"fine-tuning.",
               "")

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = ["base", *[s.name.replace("LoRA ", "LoRA\n") for s in SETTINGS]]
    values = [base_ppl, *[outcomes[s.name].after for s in SETTINGS]]
    bars = ax.bar(range(len(values)), values, color=["grey", "tab:blue", "tab:orange", "tab:green"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(values)), names)
    ax.set(ylabel="test perplexity (lower is better)", title="SmolLM2-135M on Hamlet: held-out perplexity")
    ax.set_ylim(0, max(values) * 1.15)
    report.figure(fig, "perplexity", "test perplexity of the base and of each fine-tuned model")
    plt.close(fig)

    qv, al, full = (outcomes[s.name] for s in SETTINGS)
    report.add("## What the numbers say", "")
    report.add(*[f"- {line}" for line in findings(base_ppl, qv, al, full)], "")

    report.add("## Sample continuations", "",
               f"Greedy decoding, {new_tokens} new tokens, in fp32 (training and perplexity used bf16 autocast); "
               f"each fine-tuned model is rebuilt from its run directory (`lorakit.train.runs.load_run`). Each block is "
               f"the prompt, then the model's continuation. (The play's text puts a speaker's name on a line of its "
               f"own, then the speech; these prompts use the `NAME.` form instead.)", "")
    for i, prompt in enumerate(prompts):
        report.add(f"### “{prompt}”", "")
        for label, outs in texts.items():
            report.add(f"**{label}**", "", "```text", f"{prompt}{outs[i]}", "```", "")

    report.add("## Checks and wall-clock", "")
    worst = max(abs(o.reloaded - o.after) for o in outcomes.values())
    same_base = max(abs(o.before - base_ppl) for o in outcomes.values())
    losses = "; ".join(f"{s.name} {outcomes[s.name].first_loss:.3f} → {outcomes[s.name].last_loss:.3f}"
                       for s in SETTINGS)
    walls = "; ".join(f"{s.name} {outcomes[s.name].wall:.0f} s" for s in SETTINGS)
    report.add("- Each model rebuilt from its saved run reproduces the test perplexity its run reported "
               + ("exactly" if worst == 0 else f"to within {worst:.1e}") + "; the three runs' before-training "
               "perplexities " + ("are identical." if same_base == 0 else f"differ by at most {same_base:.1e}."),
               f"- Training loss (one batch), first step → last step: {losses}.",
               f"- Whole `train()` call per setting (loading, the test evaluation before and after, validation, "
               f"checkpoint and saving included): {walls}. The whole study took {total / 60:.1f} min; 1-minute "
               f"load average (this study's own threads included) {load[0]:.2f} at the start, {load[1]:.2f} at "
               f"the end.",
               "- Peak memory is not reported: the three runs share one process, so its peak is theirs together.")
    return report.write()


def findings(base: float, qv: Outcome, al: Outcome, full: Outcome) -> list[str]:
    """Sentences that compare the three settings, each computed from the numbers."""
    def drop(o: Outcome) -> float:
        return 100 * (1 - o.after / base)

    out = [f"Every setting lowered test perplexity from {base:.2f}: LoRA q_proj,v_proj to {qv.after:.2f} "
           f"({drop(qv):.1f}% lower), LoRA all-linear to {al.after:.2f} ({drop(al):.1f}%), full fine-tuning to "
           f"{full.after:.2f} ({drop(full):.1f}%)."
           if all(o.after < base for o in (qv, al, full)) else
           "Not every setting lowered test perplexity from the base's " + f"{base:.2f}: " + ", ".join(
               f"{n} {o.after:.2f}" for n, o in (("q,v", qv), ("all-linear", al), ("full", full))) + "."]
    diff = 100 * (al.after / qv.after - 1)
    verdict = "beats" if al.after < qv.after else "does not beat"
    out.append(f"LoRA on all linear layers {verdict} LoRA on q_proj,v_proj ({al.after:.2f} vs {qv.after:.2f}, "
               f"{diff:+.1f}%), with {al.trainable / qv.trainable:.1f}× the trainable parameters "
               f"({al.trainable:,} vs {qv.trainable:,}) and {al.sec_per_step / qv.sec_per_step:.2f}× the time per "
               f"step.")
    for name, o in (("q_proj,v_proj", qv), ("all-linear", al)):
        ratio = f"{100 * o.trainable / full.trainable:.2f}% of full fine-tuning's trainable parameters"
        if full.after >= base:
            out.append(f"Full fine-tuning did not lower perplexity at lr {full.lr:g} ({full.after:.2f}), so it is no "
                       f"yardstick here; LoRA {name} reached {o.after:.2f} with {ratio}.")
        elif o.after >= full.after:
            share = 100 * (base - o.after) / (base - full.after)
            out.append(f"LoRA {name} gets {share:.0f}% of full fine-tuning's perplexity reduction "
                       f"({o.after:.2f} vs {full.after:.2f}) with {ratio}.")
        else:
            out.append(f"LoRA {name} ends below full fine-tuning ({o.after:.2f} vs {full.after:.2f}) with {ratio}: "
                       f"at this budget and lr ({full.lr:g}) full fine-tuning is not an upper bound.")
    out.append(f"A full fine-tuning step takes {full.sec_per_step / qv.sec_per_step:.2f}× a q_proj,v_proj LoRA step "
               f"and {full.sec_per_step / al.sec_per_step:.2f}× an all-linear one (medians); its saved weights are "
               f"{full.saved_bytes / qv.saved_bytes:,.0f}× the size of the q_proj,v_proj adapter "
               f"({full.saved_bytes / 1e6:.0f} MB vs {qv.saved_bytes / 1e6:.2f} MB).")
    if not all(math.isfinite(o.after) for o in (qv, al, full)):
        out.append("A run's perplexity is not finite: that run diverged.")
    return out

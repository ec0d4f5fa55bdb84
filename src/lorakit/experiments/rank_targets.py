"""Study `rank-targets`: which weight matrices to adapt, and how small r can be (the LoRA paper's Tables 5, 6).

The paper (GPT-3 on WikiSQL and MultiNLI) finds that adapting Wq and Wv together beats adapting Wq alone
at the same parameter budget, and that r=1 already suffices for Wq,Wv while Wq alone needs a larger r.
Here: all-MiniLM-L6-v2 on Rotten Tomatoes sentiment, LoRA at r ∈ {1, 2, 4, 8, 64} on four target sets —
Wq; Wv; Wq,Wv; Wq,Wk,Wv,Wo — three seeds each, then the fixed-budget comparison Wq r=8 vs Wq,Wv r=4 vs all
four r=2 (the same number of LoRA parameters). BERT calls the matrices query, key, value and
attention.output.dense (Wo; the FFN's output.dense is another layer and stays frozen).

Sixty runs must fit in about half an hour on two CPU cores, so each run gets a smaller budget than the
`sentiment` study's: a slice of the training split, one epoch, shorter texts (see RUN).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from .. import atomic
from ..train.config import ModelConfig, TrainSection, build_config
from .report import Report, command_line, run_facts
from .sentiment import EPOCHS as SENTIMENT_EPOCHS
from .sentiment import fit, load_note, merged, split_facts

TARGETS: dict[str, list[str]] = {
    "Wq": ["query"],
    "Wv": ["value"],
    "Wq,Wv": ["query", "value"],
    "Wq,Wk,Wv,Wo": ["query", "key", "value", "attention.output.dense"],
}
RANKS = (1, 2, 4, 8, 64)
SEEDS = 3
BUDGET = (("Wq", 8), ("Wq,Wv", 4), ("Wq,Wk,Wv,Wo", 2))  # r × (matrices adapted) = 8 in each
ALPHA = 16.0  # fixed while r varies, as in the paper (which sets α to the first r tried and keeps it)
# Per run (about 32 s on two cores): 1,600 training texts, one epoch of batch 16 (100 steps), texts cut at 48
# tokens. lr 2e-3, twice the default job's, because the run is short: in probes of this budget at 1e-3,
# the weaker settings had not moved off the majority class by the end.
RUN = {"data": {"max_train": 1600}, "model": {"max_length": 48},
       "train": {"epochs": 1, "batch_size": 16, "lr": 2e-3, "bf16": False}, "lora": {"alpha": ALPHA, "dropout": 0.1}}
QUICK_RANKS, QUICK_TARGETS, QUICK_SEEDS, QUICK_MAX_TRAIN = (1, 8), ("Wq", "Wq,Wv"), 1, 128

Key = tuple[str, int, int]  # (target set, r, seed)
RUNS = "runs.json"  # every run's result, saved so the report can be rendered again


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def compare(a: list[float], b: list[float]) -> str:
    """'ahead', 'behind' or 'tie' for accuracies a against b (one per seed): means that differ by no more
    than the larger of the two standard deviations are a tie. One seed has no spread: means only."""
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    if abs(ma - mb) <= max(sa or 0.0, sb or 0.0):
        return "tie"
    return "ahead" if ma > mb else "behind"


def _check_targets(name: str, adapted: list[str], layers: int) -> None:
    """Exactly the named matrices of every layer were adapted: Wo's suffix must not catch the FFN's output."""
    stray = [n for n in adapted if n.endswith("output.dense") and not n.endswith("attention.output.dense")]
    assert not stray and len(adapted) == layers * len(TARGETS[name]), \
        f"{name}: expected {len(TARGETS[name])} adapted layers in each of {layers} blocks, got {adapted}"


def run(out: Path, quick: bool = False, seed: int = 0) -> Path:
    ranks = QUICK_RANKS if quick else RANKS
    targets = list(QUICK_TARGETS) if quick else list(TARGETS)
    seeds = [seed + i for i in range(QUICK_SEEDS if quick else SEEDS)]
    common = _common(quick)
    layers = _arch().num_hidden_layers

    grid = [(t, r, s) for t in targets for r in ranks for s in seeds]
    budget = [(t, r, s) for t, r in BUDGET for s in seeds]
    todo = grid + [k for k in budget if k not in grid]  # a budget setting the grid holds is not run twice
    runs = []
    load, start, facts = os.getloadavg(), time.perf_counter(), run_facts()
    for i, (t, r, s) in enumerate(todo, 1):
        cfg = build_config(merged(common, {"lora": {"targets": TARGETS[t], "r": r}, "train": {"seed": s}}))
        res = fit(cfg, before=False)
        _check_targets(t, res["adapted"], layers)
        runs.append({"target": t, "r": r, "seed": s, **res})
        print(f"  [{i}/{len(todo)}] {t} r={r} seed {s}: test accuracy {res['after']:.4f} ({res['seconds']:.0f} s)",
              flush=True)
    saved = {"quick": quick, "ranks": list(ranks), "targets": targets, "seeds": seeds, "command": command_line(),
             "run": facts, "seconds": time.perf_counter() - start, "load": [load[0], os.getloadavg()[0]], "runs": runs}
    atomic.write_file(out / RUNS, json.dumps(saved, indent=1) + "\n")
    return render(out)


def _common(quick: bool) -> dict[str, Any]:
    return merged(RUN, {"data": {"max_train": QUICK_MAX_TRAIN}} if quick else {})


def _arch():
    from transformers import AutoConfig

    from ..hub import minilm_dir

    return AutoConfig.from_pretrained(minilm_dir())


def render(out: Path) -> Path:
    """Write report.md and the plots in `out` from the runs.json a run of this study saved there.

    The study calls it at its end; call it again to re-render a report without training anything."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = json.loads((out / RUNS).read_text(encoding="utf-8"))
    quick, ranks, targets, seeds = saved["quick"], tuple(saved["ranks"]), saved["targets"], saved["seeds"]
    results: dict[Key, dict[str, Any]] = {(x["target"], x["r"], x["seed"]): x for x in saved["runs"]}
    grid = [(t, r, s) for t in targets for r in ranks for s in seeds]
    common = _common(quick)
    arch = _arch()
    layers = arch.num_hidden_layers
    facts = split_facts(build_config(common))
    full_train = split_facts(build_config(merged(common, {"data": {"max_train": None}})))["sizes"]["train"]
    total, load = saved["seconds"], saved["load"]

    def accs(t: str, r: int) -> list[float]:
        return [results[t, r, s]["after"] for s in seeds]

    per_rank = {t: results[t, ranks[0], seeds[0]]["lora_params"] // ranks[0] for t in targets}
    secs = [res["seconds"] for res in results.values()]
    one = next(iter(results.values()))
    report = Report("Which matrices to adapt, and how small r can be (LoRA paper, Tables 5 and 6)", out)
    t_ = build_config(common).train
    report.header(
        f"all-MiniLM-L6-v2 (BERT, {layers} layers, hidden size {arch.hidden_size}) on Rotten Tomatoes sentiment. "
        f"LoRA (α={ALPHA:g} for every r, dropout {RUN['lora']['dropout']:g}, lr {t_.lr:g} — "
        f"{t_.lr / TrainSection().lr:g}× the default job's, as the runs are short; the new classifier trains in "
        f"full) on the attention matrices of every layer: Wq = query, Wk = key, Wv = value, Wo = "
        f"attention.output.dense. "
        f"Each run: the first {facts['sizes']['train']:,} of the {full_train:,} training snippets, "
        f"{t_.epochs} epoch{'s' * (t_.epochs != 1)} of batch {t_.batch_size} ({one['steps']} steps), texts cut at "
        f"{common['model']['max_length']} tokens — a smaller budget than the `sentiment` study's "
        f"({full_train:,} snippets, {SENTIMENT_EPOCHS} epochs, {ModelConfig().max_length} tokens), so that "
        f"{len(results)} runs fit in one sitting; accuracies are lower than a full job's. Test accuracy on all "
        f"{facts['sizes']['test']:,} test snippets; the seed sets the classifier's and the adapters' init and the "
        f"order of the batches.",
        saved["command"], seeds, quick, saved["run"])

    report.add("## Test accuracy by target set and rank (Table 6)", "",
               (f"Mean ± standard deviation over {len(seeds)} seeds." if len(seeds) > 1 else "One seed.")
               + f" Always answering the majority class ({facts['majority_label']!r}) scores "
               f"{facts['majority']:.4f}.", "")
    report.table(["adapted", *[f"r={r}" for r in ranks], "LoRA params per unit of r"],
                 [[t, *[_cell(accs(t, r)) for r in ranks], f"{per_rank[t]:,}"] for t in targets])

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for j, t in enumerate(targets):
        stats = [_mean_std(accs(t, r)) for r in ranks]
        xs = [r * (1 + 0.04 * (j - (len(targets) - 1) / 2)) for r in ranks]  # nudged so error bars don't overlap
        ax.errorbar(xs, [100 * m for m, _ in stats], yerr=[100 * (s or 0) for _, s in stats], marker="o",
                    capsize=3, label=t)
    ax.axhline(100 * facts["majority"], color="grey", ls="--", lw=1, label="majority class")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ranks), [str(r) for r in ranks])
    ax.set(xlabel="rank r", ylabel="test accuracy (%)",
           title=f"test accuracy vs r (mean ± std over {len(seeds)} seeds)" if len(seeds) > 1
           else "test accuracy vs r (one seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    report.figure(fig, "rank", "test accuracy against r, one line per set of adapted matrices")
    plt.close(fig)

    report.add("## The same parameter budget, spread over more matrices (Table 5)", "")
    b_rows = []
    for t, r in BUDGET:
        values = [results[t, r, s]["after"] for s in seeds]
        b_rows.append([f"{t}, r={r}", f"{results[t, r, seeds[0]]['lora_params']:,}",
                       " / ".join(f"{v:.4f}" for v in values), _cell(values)])
    report.table(["adapted", "LoRA params", "test accuracy by seed", "mean ± std"], b_rows)
    shared = [f"{t} r={r}" for t, r in BUDGET if (t, r, seeds[0]) in grid]
    if shared:
        report.add(f"The runs of {', '.join(shared)} are the grid's (same configuration, same seeds).", "")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    stats = [_mean_std([results[t, r, s]["after"] for s in seeds]) for t, r in BUDGET]
    ax.bar(range(len(BUDGET)), [100 * m for m, _ in stats], yerr=[100 * (s or 0) for _, s in stats], capsize=4,
           color=["tab:blue", "tab:green", "tab:red"])
    ax.axhline(100 * facts["majority"], color="grey", ls="--", lw=1, label="majority class")
    low = min(100 * m for m, _ in stats + [(facts["majority"], None)])
    ax.set(ylim=(max(0.0, low - 5), 100), ylabel="test accuracy (%)",
           title=f"{results[BUDGET[0][0], BUDGET[0][1], seeds[0]]['lora_params']:,} LoRA parameters each")
    ax.set_xticks(range(len(BUDGET)), [f"{t}\nr={r}" for t, r in BUDGET])
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    report.figure(fig, "budget", "test accuracy at one parameter budget")
    plt.close(fig)

    report.add("## What the numbers say", "", *findings(results, targets, ranks, seeds, facts))
    if saved.get("note"):
        report.add("", f"_{saved['note']}_")
    report.add("", "## Wall-clock", "",
               f"{len(results)} runs in {total / 60:.1f} min: {statistics.mean(secs):.1f} s a run on average "
               f"(fastest {min(secs):.1f} s, slowest {max(secs):.1f} s), each the whole job — load model and data, "
               f"train, test. {load_note(*load)}")
    return report.write()


def findings(results: dict[Key, dict[str, Any]], targets: list[str], ranks: tuple[int, ...], seeds: list[int],
             facts: dict[str, Any]) -> list[str]:
    """Sentences read off the numbers, one a bullet."""
    def accs(t: str, r: int) -> list[float]:
        return [results[t, r, s]["after"] for s in seeds]

    def mean(t: str, r: int) -> float:
        return statistics.mean(accs(t, r))

    p = max(statistics.mean(accs(t, r)) for t in targets for r in ranks)
    se = (p * (1 - p) / facts["sizes"]["test"]) ** 0.5
    lines = [f"- Ties: two settings whose means differ by no more than the larger of their standard deviations "
             f"over seeds are called level. Every run is scored on the same {facts['sizes']['test']:,} test "
             f"snippets, whose sampling error (about {100 * se:.1f} points at this accuracy) is shared by all "
             f"settings and is not in those deviations."
             + (" **One seed**: there is no spread, so nothing below is a verdict." if len(seeds) == 1 else "")]
    floor = facts["majority"] + 2 * se
    learned = [(t, r) for t in targets for r in ranks if mean(t, r) > floor]
    if not learned:
        lines.append(f"- No setting beats always answering the majority class ({facts['majority']:.4f}) by more than "
                     f"two standard errors: on this budget the runs have not learned the task yet, and the "
                     f"comparisons below compare noise.")
    elif len(learned) < len(targets) * len(ranks):
        stuck = [f"{t} r={r} ({mean(t, r):.4f})" for t in targets for r in ranks if (t, r) not in learned]
        lines.append(f"- Within two standard errors of the majority class ({facts['majority']:.4f}), so not yet "
                     f"learning the task on this budget: {', '.join(stuck)}. A longer run would be needed to say "
                     f"how far these settings can go; here they count as the weakest.")

    # Table 6: how small can r be, per target set (only for a target set that learned at some r).
    low, best_r = ranks[0], {t: max(ranks, key=lambda r: mean(t, r)) for t in targets}
    never = {t for t in targets if not any((t, r) in learned for r in ranks)}
    enough = {t: best_r[t] == low or compare(accs(t, low), accs(t, best_r[t])) == "tie" for t in targets}
    for t in targets:
        b = best_r[t]
        if t in never:
            lines.append(f"- {t}: no r learned the task on this budget, so it says nothing about how small r can be.")
        elif b == low:
            lines.append(f"- {t}: the best r is the smallest, r={low} ({_cell(accs(t, low))}).")
        else:
            said = {"tie": "level with it", "behind": "behind it"}[compare(accs(t, low), accs(t, b))]
            lines.append(f"- {t}: the best r is {b} ({_cell(accs(t, b))}); r={low} ({_cell(accs(t, low))}) is {said}.")
    if "Wq" in targets and "Wq,Wv" in targets:
        claim = f"- The paper: r=1 suffices for Wq,Wv while Wq alone needs a larger r. Here r={low} is "
        if "Wq,Wv" in never:
            lines.append(claim + "not enough for Wq,Wv either: no rank of it learned on this budget, so the claim "
                                 "cannot be checked here.")
        elif "Wq" in never:
            lines.append(claim + f"{'enough' if enough['Wq,Wv'] else 'not enough'} for Wq,Wv, while Wq alone learned "
                                 f"nothing at any r up to {ranks[-1]}: the first half "
                                 f"{'agrees with' if enough['Wq,Wv'] else 'does not reproduce'} the paper; the second "
                                 f"cannot be checked on this budget (no larger r helps Wq here either).")
        else:
            agrees = enough["Wq,Wv"] and not enough["Wq"]
            lines.append(claim + f"{'enough' if enough['Wq,Wv'] else 'not enough'} for Wq,Wv and "
                                 f"{'enough' if enough['Wq'] else 'not enough'} for Wq alone, which "
                                 f"{'agrees with' if agrees else 'does not reproduce'} that finding.")
    if 64 in ranks and 8 in ranks:
        verdicts = {t: compare(accs(t, 64), accs(t, 8)) for t in targets}
        lines.append("- r=64 against r=8: " + "; ".join(f"{t} {v}" for t, v in verdicts.items())
                     + (": a larger rank buys nothing here." if "ahead" not in verdicts.values() else "."))
    lines.append(f"- α is held at {ALPHA:g} for every r, as in the paper, so ΔW = (α/r)·BA is scaled by "
                 f"{ALPHA / ranks[0]:g} at r={ranks[0]} and {ALPHA / ranks[-1]:g} at r={ranks[-1]}: in a run this "
                 f"short, a large r also means a smaller step on ΔW, which is part of what the r columns compare.")
    at = 8 if 8 in ranks else ranks[-1]
    ranked = sorted(targets, key=lambda t: mean(t, at), reverse=True)
    order = f"{ranked[0]} ({mean(ranked[0], at):.4f})"
    for prev, t in zip(ranked, ranked[1:]):
        order += f" {'>' if compare(accs(prev, at), accs(t, at)) == 'ahead' else '≈'} {t} ({mean(t, at):.4f})"
    lines.append(f"- At r={at}, by mean test accuracy (≈: a tie): {order}. More matrices at one r is also more "
                 f"parameters.")

    # Table 5: one budget.
    (q, rq), (qv, rqv), (four, rf) = BUDGET
    a, b, c = ([results[t, r, s]["after"] for s in seeds] for t, r in BUDGET)
    v1, v2 = compare(b, a), compare(c, b)
    yes = {"ahead": "yes", "behind": "no, it is behind", "tie": "no, a tie"}
    lines.append(f"- At one budget ({results[q, rq, seeds[0]]['lora_params']:,} LoRA parameters): adapting both Wq "
                 f"and Wv (r={rqv}, {_cell(b)}) beats Wq alone (r={rq}, {_cell(a)}): **{yes[v1]}**. All four "
                 f"matrices at r={rf} ({_cell(c)}) against Wq,Wv at r={rqv}: **{v2}**. In the paper's Table 5 Wq,Wv "
                 f"is ahead of Wq alone, and all four are about level with Wq,Wv."
                 + (" (Wq alone learned nothing at any r here, which makes the first comparison an easy one.)"
                    if "Wq" in never else ""))
    return lines

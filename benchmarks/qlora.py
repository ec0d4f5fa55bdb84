"""QLoRA (LoRA over an NF4 base) against LoRA over the float base, on SmolLM2-135M and the sentiment job.

    python -m benchmarks.qlora                               # everything; writes qlora.json and its section of results.md
    python -m benchmarks.qlora --only storage,memory         # some parts (the others are kept from qlora.json)
    python -m benchmarks.qlora --sentiment-max-train 2048    # a reduced sentiment budget, the same for both runs

1. storage: bytes of SmolLM2-135M's linear weights (every nn.Linear but the tied output head) in fp32,
   NF4 and NF4 with double quantization, as bitsandbytes stores them.
2. memory: peak resident memory (VmHWM) of one training step of recipes/causal-lm.toml (LoRA on
   q_proj,v_proj, batch 8 × 128 tokens, bf16 autocast, AdamW), QLoRA vs LoRA, each in its own process.
   Two peaks: over the whole process (both load the fp32 checkpoint first) and during the step alone
   (the peak is reset through /proc/self/clear_refs after set-up).
3. hamlet: `lorakit train recipes/causal-lm.toml` with and without `--model.quantize nf4`: held-out
   perplexity before and after, the same budget.
4. sentiment: the default job (`lorakit train`) with and without `--model.quantize nf4`: test accuracy.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit import hub
from lorakit.atomic import write_file
from lorakit.train.config import build_config, load_recipe
from lorakit.train.recipe import train

from benchmarks.common import HERE, RESULTS, job_environment, pick, replace_section, silent

RECIPE = HERE.parent / "recipes" / "causal-lm.toml"
PARTS = ("storage", "memory", "hamlet", "sentiment")
NF4 = ["--model.quantize", "nf4"]


def storage() -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hub.smollm2_dir())
    table = lorakit.storage_table(model)
    print(table, flush=True)
    return {"layers": table.layers, "weights": table.weights,
            "rows": [{"format": f, "bytes": b, "bytes_per_weight": per, "x_fp32": r} for f, b, per, r in table.rows()]}


def _vm(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def one_step(quantize: str) -> dict[str, Any]:
    """Set up the causal-lm recipe (quantized or not), then time one optimizer step; print JSON."""
    from lorakit.train.recipe import apply_method
    from lorakit.train.tasks import prepare

    cfg = build_config(load_recipe(RECIPE), ["--model.quantize", quantize, "--train.device", "cpu"])
    torch.manual_seed(0)
    task = prepare(cfg)
    apply_method(cfg, task, silent)
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    split = task.splits["train"]
    batch = split.collate(split.batches(cfg.train.batch_size, 0, True)[0])
    gc.collect()
    setup = {"rss_after_setup": _vm("VmRSS"), "peak_setup": _vm("VmHWM")}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    model.train()
    start = time.perf_counter()
    loss, _ = task.forward(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"quantize": quantize, **setup, "peak_step": _vm("VmHWM"), "peak_process": max(setup["peak_setup"], _vm("VmHWM")),
            "step_s": seconds, "loss": loss.item(), "batch": list(batch.inputs["input_ids"].shape),
            "trainable": sum(p.numel() for p in params)}


def memory() -> dict[str, Any]:
    out = {}
    for quantize in ("none", "nf4"):
        result = subprocess.run([sys.executable, "-m", "benchmarks.qlora", "--step", quantize], capture_output=True,
                                text=True, cwd=HERE.parent, env=os.environ.copy())
        if result.returncode:
            raise RuntimeError(f"the {quantize} step failed:\n{result.stderr[-3000:]}")
        out[quantize] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"[memory] {quantize}: {out[quantize]}", flush=True)
    return out


def run_pair(name: str, recipe: dict, overrides: list[str], modes: tuple[str, ...] = ("none", "nf4")) -> dict[str, Any]:
    """The same run with the float base and with NF4: metric before/after and wall-clock."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quantize in modes:
            cfg = build_config(recipe, [*overrides, "--model.quantize", quantize, "--out", f"{tmp}/{quantize}"])
            start = time.perf_counter()
            result = train(cfg, print_fn=lambda *a: print(f"[{name} {quantize}]", *a, flush=True), progress_bar=False)
            key = "perplexity" if cfg.task == "causal-lm" else "accuracy"
            out[quantize] = {"before": result["before"][key], "after": result["after"][key], "steps": result["steps"],
                             "wall_s": time.perf_counter() - start, "config": cfg.to_dict()}
    return out


def hamlet() -> dict[str, Any]:
    runs = run_pair("hamlet", load_recipe(RECIPE), ["--train.device", "cpu"])
    drop = {q: r["before"] - r["after"] for q, r in runs.items()}
    return {"runs": runs, "command": "lorakit train recipes/causal-lm.toml [--model.quantize nf4]",
            "reduction_ratio": drop["nf4"] / drop["none"] if drop["none"] else None}


def sentiment(max_train: int | None, reuse_float: bool) -> dict[str, Any]:
    """With reuse_float (full budget only) the float run is taken from benchmarks/sentiment.json,
    the same job on the same split measured by `python -m benchmarks.sentiment`."""
    # fp32, as benchmarks.sentiment's float run (which --sentiment-reuse-float takes) is
    overrides = ["--train.device", "cpu", "--train.bf16", "false"] + (["--data.max_train", str(max_train)] if max_train else [])
    runs = run_pair("sentiment", {}, overrides, ("nf4",) if reuse_float else ("none", "nf4"))
    if reuse_float:
        if max_train:
            raise SystemExit("--sentiment-reuse-float needs the full budget (no --sentiment-max-train)")
        recorded = json.loads((HERE / "sentiment.json").read_text())
        lora = next(r for r in recorded["results"] if r["method"] == "lora")
        runs["none"] = {"before": lora["test_before"], "after": lora["test_after"], "wall_s": lora.get("seconds") or 0,
                        "from": f"benchmarks/sentiment.json ({recorded['environment']['date']}, {recorded['command']})"}
    return {"runs": runs, "max_train": max_train,
            "command": "lorakit train [--model.quantize nf4]" + (f" --data.max_train {max_train}" if max_train else ""),
            "points": 100 * (runs["nf4"]["after"] - runs["none"]["after"])}


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = ["## QLoRA: LoRA over an NF4 base vs LoRA over the float base", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, transformers {env['transformers']}, "
             f"bitsandbytes {env['bitsandbytes']}, lorakit {env['lorakit']} (git {env['git']}); "
             f"{env['date']}. Command: `{results['command']}`.", ""]
    if "storage" in results:
        s = results["storage"]
        lines += [f"**SmolLM2-135M linear weights** ({s['layers']} layers, {s['weights']:,} weights; the tied "
                  f"output head and the embeddings stay float):", "",
                  "| format | MiB | bytes / weight | × fp32 |", "|---|---:|---:|---:|"]
        lines += [f"| {r['format']} | {r['bytes'] / 2**20:.2f} | {r['bytes_per_weight']:.4f} | {r['x_fp32']:.4f} |"
                  for r in s["rows"]]
        lines += ["", _measured(s), ""]
    if "memory" in results:
        m = results["memory"]
        mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
        lines += ["**One training step** of recipes/causal-lm.toml (batch 8 × 128 tokens, bf16 autocast, AdamW; "
                  "each in its own process; peak RSS):", "",
                  "| base | RSS after set-up | peak during the step | peak over the process | step time |",
                  "|---|---:|---:|---:|---:|"]
        for q, label in (("none", "fp32 (LoRA)"), ("nf4", "NF4 + DQ (QLoRA)")):
            r = m[q]
            lines.append(f"| {label} | {mib(r['rss_after_setup'])} | {mib(r['peak_step'])} | {mib(r['peak_process'])} "
                         f"| {r['step_s']:.1f} s |")
        lines += ["", f"Peak during the step, QLoRA / LoRA: {m['nf4']['peak_step'] / m['none']['peak_step']:.2f}×. "
                  "Both processes load the fp32 checkpoint before quantizing, so the whole-process peak includes it.",
                  _measured(m), ""]
    for part, metric, fmt in (("hamlet", "held-out perplexity", "{:.1f}"), ("sentiment", "test accuracy", "{:.4f}")):
        if part not in results:
            continue
        r = results[part]
        cut = f", training set cut to {r['max_train']} examples for both runs" if r.get("max_train") else ""
        title = ("**Hamlet** (`lorakit train recipes/causal-lm.toml`, SmolLM2-135M, LoRA q_proj,v_proj r=8, 160 blocks, "
                 "one epoch)" if part == "hamlet" else
                 f"**Sentiment** (the default job `lorakit train`, MiniLM, LoRA query,value r=8, 2 epochs{cut})")
        lines += [title + ":", "", f"| base | {metric} before | after | wall-clock |", "|---|---:|---:|---:|"]
        for q, label in (("none", "fp32 (LoRA)"), ("nf4", "NF4 + DQ (QLoRA)")):
            x = r["runs"][q]
            wall = f"{x['wall_s'] / 60:.1f} min" if x.get("wall_s") else "—"
            source = f" (recorded: {x['from']})" if x.get("from") else ""
            lines.append(f"| {label}{source} | {fmt.format(x['before'])} | {fmt.format(x['after'])} | {wall} |")
        if part == "hamlet" and r.get("reduction_ratio") is not None:
            lines += ["", f"QLoRA's perplexity reduction is {100 * r['reduction_ratio']:.0f}% of LoRA's (goal ≥ 80%)."]
        if part == "sentiment":
            lines += ["", f"QLoRA − LoRA: {r['points']:+.1f} points of test accuracy (goal: within 2)."]
        lines += [_measured(r), ""]
    return "\n".join(lines)


def _measured(part: dict[str, Any]) -> str:
    m = part.get("measured", {})
    return f"_Measured {m.get('date', '?')} in {m.get('seconds', 0) / 60:.1f} min by `{m.get('command', '?')}`._"


def environment() -> dict[str, Any]:
    import bitsandbytes

    return {**job_environment(), "bitsandbytes": bitsandbytes.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--sentiment-max-train", type=int, default=None)
    parser.add_argument("--sentiment-reuse-float", action="store_true",
                        help="take the float sentiment run from benchmarks/sentiment.json instead of re-running it")
    parser.add_argument("--step", choices=["none", "nf4"], help=argparse.SUPPRESS)  # the memory child process
    args = parser.parse_args()
    if args.step:
        print(json.dumps(one_step(args.step)))
        return
    parts = pick(parser, args.only, PARTS, "part")
    path = HERE / "qlora.json"
    env, command = environment(), "python -m benchmarks.qlora " + " ".join(sys.argv[1:])
    for part in parts:
        start = time.perf_counter()
        result = (sentiment(args.sentiment_max_train, args.sentiment_reuse_float) if part == "sentiment"
                  else globals()[part]())
        result["measured"] = {"date": env["date"], "seconds": time.perf_counter() - start, "command": command}
        results = json.loads(path.read_text()) if path.exists() else {}  # other parts stay as measured
        results.update({"environment": env, "command": command, part: result})
        write_file(path, json.dumps(results, indent=1) + "\n")
        body = markdown(results)
        replace_section(RESULTS, body.splitlines()[0], body + "\n")
        print(f"[qlora] {part} done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

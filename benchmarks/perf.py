"""Speed and memory of LoRA training, inference and mixed-adapter batches: lorakit and PEFT side by side,
both against the floor, measured in one process with interleaved steps.

    python -m benchmarks                       # ~30 min on 2 CPU cores; rewrites its section of benchmarks/results.md
    make bench                                 # the same, from the project's .venv
    python -m benchmarks --quick               # tiny random models, 2 steps: checks the runner works (~1 min);
                                               # writes to a temp dir, never to results.md
    python -m benchmarks --device cuda --dtype bf16          # the GPU section
    python -m benchmarks --weights random      # MiniLM and SmolLM2 built from benchmarks/configs/, random weights
    python -m benchmarks --cases minilm-train,minilm-infer --steps 30
    python -m benchmarks --cases minilm-dora --keep-others   # measure one case again, keep the rest of perf.json

The floor of a LoRA training step is the work no implementation can avoid: the frozen model's forward plus
the backward through its activations. It is measured on the same model with every parameter frozen except
the head, and the embedding output made to require grad (a forward hook), so autograd walks back through
every layer without computing any frozen weight's gradient. A step is forward + loss + backward (no
optimizer step; gradients are set to None before each step, outside the timed region), with
`torch.manual_seed(step)` before it so every model starts the step from the same random state. The variants
of a case run round-robin, the starting variant rotating each round, after warm-up steps; times are medians.

DoRA (minilm-dora, smollm2-dora) is measured the same way: the floor, lorakit and PEFT each with LoRA and with
DoRA on the same setting, in one case, so the ratios DoRA ÷ LoRA and lorakit ÷ PEFT come from one round-robin.
The optimizer cases (minilm-optim, smollm2-optim) are lorakit alone and add an AdamW step to every step: plain
LoRA, LoRA+ (`lorakit.param_groups(..., loraplus_ratio=16)`) and LoRA-FA (every A frozen), for their memory
above all: gradients, AdamW state and saved activations.

Peak memory of a training step is measured for every variant in a separate process: benchmarks/memory.py says how.
The report gives the machine's load average while each case ran: on a shared machine, other work slows every
variant and blurs the ratios, and the report should say when that happened.

The numbers go to a section of results.md and, raw, to perf.json beside it (perf-<device>-<dtype>.json for
anything but CPU fp32). The end-to-end goal (the sentiment job against PEFT + Trainer) is
benchmarks/sentiment.py's.

This file is the runner; what it runs is in cases.py (the cases), models.py (models and variants), timing.py
(the timed steps), memory.py (the memory probes) and report.py (the section it writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lorakit.atomic import write_file
from lorakit.experiments.report import machine, utc_now, versions

from .cases import Case, Lora, cases
from .common import RESULTS, pick, replace_section, source_changes, source_state, tree
from .memory import probe_pool, run_memory
from .models import DTYPES
from .report import dora_rows, memory_rows, section, speed_rows
from .timing import RUNNERS


def environment(device: str) -> dict[str, Any]:
    """When, where and from which lorakit source the run is made, as perf.json and the section state them."""
    name = machine() + (f"; device {torch.cuda.get_device_name(0)}" if device == "cuda" else "")
    return {"date": utc_now(), "machine": name, "versions": versions(), "git": tree(), "dirty": source_changes(),
            "source_state": source_state(), "torch_threads": torch.get_num_threads()}


def with_load(run: Callable[[], Any], every: float = 5.0) -> tuple[Any, list[float]]:
    """`run()` and the machine's 1-minute load average sampled every `every` seconds while it ran: how busy the
    cores were (this run's own threads count too), so a report can say when other work shared them."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        return run(), samples
    finally:
        stop.set()
        sampler.join()


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
        result, load = with_load(lambda: RUNNERS[case.kind](case, device, dtype, log))
        load_stats = {"median": statistics.median(load), "max": max(load)} if load else None
        raw["cases"][case.name] = {"name": case.name, "description": case.describe(), **asdict(case), **result,
                                   "load_1min": load_stats}
        log(f"{case.name}: " + ", ".join(f"{n} {v['median_ms']:.1f} ms" for n, v in result["variants"].items())
            + f" ({time.perf_counter() - start:.0f} s" + (f", load {load_stats['median']:.1f} median, "
                                                          f"{load_stats['max']:.1f} max)" if load_stats else ")"))
    raw["speed"] = speed_rows(raw["cases"], {c.name: c for c in todo})
    raw["dora"] = dora_rows(raw["cases"], {c.name: c for c in todo})
    for r in raw["speed"] + raw["dora"]:
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


def case_from(saved: dict[str, Any]) -> Case:
    """The Case a JSON case record was measured with (`asdict(case)` plus results; fields added since default)."""
    fields = {f.name for f in dataclasses.fields(Case)}
    loras = tuple(Lora(**{**lora, "targets": tuple(lora["targets"])}) for lora in saved["loras"])
    return Case(**{**{k: v for k, v in saved.items() if k in fields}, "loras": loras})


def keep_earlier(raw: dict[str, Any], earlier: dict[str, Any], quick: bool) -> None:
    """Add to `raw` the cases of `earlier` (the JSON of an earlier run) that `raw` did not measure, with their
    memory probes, each case marked with the run it comes from; then make the tables again over them all. A
    case's ratios come from its own round-robin, so cases of different runs can share a table."""
    run = {"date": earlier["environment"]["date"], "command": earlier.get("command"),
           "git": earlier["environment"]["git"], "versions": earlier["environment"]["versions"]}
    order = [c.name for c in cases(quick)]
    kept = {n: {**c, "kept_from": c.get("kept_from", run)} for n, c in earlier["cases"].items()
            if n not in raw["cases"] and n in order}
    merged = {**kept, **raw["cases"]}
    raw["cases"] = {n: merged[n] for n in sorted(merged, key=order.index)}
    raw["memory"] = sorted([m for m in earlier.get("memory", []) if m["case"] in kept] + raw["memory"],
                           key=lambda m: order.index(m["case"]))
    by_name = {n: case_from(c) for n, c in raw["cases"].items()}
    raw["speed"], raw["dora"] = speed_rows(raw["cases"], by_name), dora_rows(raw["cases"], by_name)
    raw["memory_rows"] = memory_rows(raw["memory"])


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
    parser.add_argument("--keep-others", action="store_true",
                        help="keep the cases that --cases leaves out, with their memory probes, from the JSON beside "
                             "--out (an earlier run), each marked with its run; measure only the chosen ones")
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
    if args.memory_only and args.keep_others:
        parser.error("--memory-only already keeps the earlier run's timings; --keep-others is for a new timing run")
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
                raw["memory_run"] = {"date": utc_now(), "command": command, "git": tree()}
            else:
                if args.keep_others and not out.with_name(name).is_file():
                    parser.error(f"--keep-others needs the JSON of an earlier run at {out.with_name(name)}")
                earlier = json.loads(out.with_name(name).read_text(encoding="utf-8")) if args.keep_others else None
                if earlier is not None and earlier.get("quick", False) != args.quick:
                    parser.error(f"--keep-others: {out.with_name(name)} is from a run with"
                                 f"{'' if earlier.get('quick') else 'out'} --quick; this one is the other kind")
                raw = measure(todo, device, dtype_name, pool, memory_steps, log)
                if earlier is not None:
                    keep_earlier(raw, earlier, args.quick)
                raw.update(command=command, quick=args.quick)
            body = section(raw)
            replace_section(out, body.splitlines()[0], body)
            write_file(out.with_name(name), json.dumps(raw, indent=2) + "\n")
            print("\n" + body)
            print(f"wrote {out} and {out.with_name(name)}")
    finally:
        if pool is not None:
            pool.shutdown()
    return 0

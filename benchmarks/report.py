"""The section of results.md that `python -m benchmarks` writes: the speed table (each implementation against
its reference, with the issue's goals), DoRA against LoRA in both libraries, the memory table, LoRA+ and
LoRA-FA with AdamW, and the markdown of them all."""

from __future__ import annotations

from typing import Any

from .cases import LLAMA_LINEAR, LORAPLUS_RATIO, LR, MODEL_NAMES, Case, train_variants

# The issue's DoRA ratios, (numerator, denominator, goal for the ratio, strict, PEFT's figure in the issue).
DORA_RATIOS = (("lorakit DoRA", "lorakit LoRA", 1.15, False, "—"),
               ("lorakit DoRA", "PEFT DoRA", 1.0, True, "—"),
               ("PEFT DoRA", "PEFT LoRA", None, False, "~1.2–2×"))

TITLE = "## Performance: lorakit and PEFT against the floor"


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


def dora_rows(results: dict[str, dict[str, Any]], by_name: dict[str, Case]) -> list[dict[str, Any]]:
    """Per case with a DoRA setting beside a LoRA one: the floor's median, each of lorakit LoRA, lorakit DoRA,
    PEFT LoRA and PEFT DoRA with its ratio to the floor, and DORA_RATIOS with whether each goal is met."""
    rows = []
    for name, case in by_name.items():
        if name not in results or {lora.dora for lora in case.loras} != {False, True}:
            continue
        med = {v.name: results[name]["variants"][v.name]["median_ms"] for v in train_variants(case)}
        by_kind = {(v.impl, v.lora.dora): med[v.name] for v in train_variants(case) if v.lora is not None}
        ms = {f"{label} {kind}": by_kind[impl, kind == "DoRA"]
              for impl, label in (("lorakit", "lorakit"), ("peft", "PEFT")) for kind in ("LoRA", "DoRA")}
        ratios = []
        for num, den, goal, strict, issue in DORA_RATIOS:
            x = ms[num] / ms[den]
            ratios.append({"ratio": f"{num} ÷ {den}", "x": x, "goal_x": goal, "strict": strict, "issue_figure": issue,
                           "met": None if goal is None else (x < goal if strict else x <= goal)})
        lora = case.loras[0]
        targets = "all 7 linear kinds" if lora.targets == LLAMA_LINEAR else ",".join(lora.targets)
        rows.append({"case": name, "what": f"{MODEL_NAMES[case.model]} B={case.batch} T={case.seq}, {targets} "
                                           f"r={lora.r}",
                     "floor_ms": med["floor"], "ms": ms, "x_floor": {k: v / med["floor"] for k, v in ms.items()},
                     "ratios": ratios})
    return rows


def memory_rows(memory: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Goals per LoRA setting: lorakit's peak ≤ PEFT's, and with dropout > 0 ≥ 20% less step memory."""
    by = {(m["case"], m["variant"]): m for m in memory}
    rows = []
    for m in memory:
        row = dict(m, goal="", met=None)
        if m["impl"] == "lorakit":
            peft = by.get((m["case"], m["variant"].replace("lorakit", "peft")))
            if peft and peft["impl"] == "peft":
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


def _goal(r: dict[str, Any]) -> str:
    return "—" if r["goal_x"] is None else f"{'<' if r.get('strict') else '≤'} {r['goal_x']:.2f}×"


def _mb(v: float | None) -> str:
    return "—" if v is None else f"{v:,.2f}"


def _kept_runs(raw: dict[str, Any]) -> list[tuple[dict[str, Any], list[str]]]:
    """The earlier runs that cases were kept from (`perf.keep_earlier`), each with its cases' names."""
    runs: list[tuple[dict[str, Any], list[str]]] = []
    for c in raw["cases"].values():
        if c.get("kept_from"):
            for run, names in runs:
                if run == c["kept_from"]:
                    names.append(c["name"])
                    break
            else:
                runs.append((c["kept_from"], [c["name"]]))
    return runs


def dora_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The DoRA paragraph: each variant against the floor, then the issue's ratios per case."""
    names = list(rows[0]["ms"])
    lines = [
        "**DoRA against LoRA.** lorakit DoRA, PEFT DoRA and both libraries' LoRA on the same setting, with the "
        "floor, in one process (round-robin, medians, as above). The DoRA settings have no dropout: with "
        "dropout both libraries run the base a second time on the dropped input (PEFT's definition, which "
        "lorakit keeps), a cost of the definition. Each lorakit magnitude m is moved a random 20% off its "
        "initial ‖W0‖ and B made random, and PEFT gets the same A, B and m, so both compute the same function "
        "(the checks above: exactly equal for LoRA, where both libraries run the same operations; for DoRA "
        "the norms are taken in another order — lorakit expands ‖W0 + s·B·A‖² without forming W0 + s·B·A, "
        "PEFT forms it — so the two differ by rounding, which grows through the layers of a deep model "
        "with every projection adapted).",
        "",
        "| case | floor ms | " + " | ".join(f"{n} ms (× floor)" for n in names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        lines.append(f"| {r['what']} | {r['floor_ms']:,.1f} | "
                     + " | ".join(_ms(r["ms"][n], r["x_floor"][n]) for n in names) + " |")
    lines += ["", "| ratio of the medians | " + " | ".join(r["what"] for r in rows)
              + " | goal | PEFT's figure in the issue |", "|---|" + "---:|" * len(rows) + "---|---:|"]
    for i, first in enumerate(rows[0]["ratios"]):
        cells = []
        for r in rows:
            q = r["ratios"][i]
            cells.append(f"{q['x']:.3f}×" + ("" if q["met"] is None else f" ({_met(q['met'])})"))
        lines.append(f"| {first['ratio']} | " + " | ".join(cells) + f" | {_goal(first)} | {first['issue_figure']} |")
    return lines + [""]


def optimizer_lines(raw: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The LoRA+ / LoRA-FA paragraph: per variant its step time, the counted gradients, AdamW state and saved
    activations, and its memory, each against plain LoRA; then what LoRA-FA saves, in words."""
    lines = [
        f"**LoRA+ and LoRA-FA with AdamW.** The same memory probes and round-robin timing, with an AdamW step in "
        f"every step (over what trains, lr {LR:g}): plain LoRA, LoRA+ (`lorakit.param_groups(model, lr, "
        f"loraplus_ratio={LORAPLUS_RATIO})`: B's learning rate ×{LORAPLUS_RATIO}) and LoRA-FA (every adapter's A "
        "frozen by `lora_a.requires_grad_(False)`; B and the head train). Gradients, AdamW state and saved "
        "activations are counted exactly (tensor bytes): the gradients the steps leave, the optimizer's state "
        "tensors (AdamW: two fp32 tensors per trained parameter and a step count), and what autograd keeps for "
        "backward in one forward (each storage once, weights left out).",
        "",
        "| case | variant | trained params | step ms (× LoRA) | gradients MB | AdamW state MB | saved for backward "
        "MB | peak MB | step MB (× LoRA) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(m["case"], m["variant"]): m for m in rows}

    def counted(m: dict[str, Any]) -> float:  # the tensors the probe counts exactly
        return m["grads_mb"] + m["optimizer_state_mb"] + m["saved_mb"]

    notes = []
    for m in rows:
        base = by.get((m["case"], "LoRA"), m)
        timing = raw["cases"].get(m["case"], {}).get("variants", {})
        ms = timing.get(m["variant"], {}).get("median_ms")
        ref = timing.get("LoRA", {}).get("median_ms")
        lines.append(f"| {m['case']} | {m['variant']} | {m['trainable_params']:,} | "
                     f"{_ms(ms, ms / ref) if ms and ref else '—'} | {_mb(m['grads_mb'])} | "
                     f"{_mb(m['optimizer_state_mb'])} | {_mb(m['saved_mb'])} | {m['peak_mb']:,.0f} | "
                     f"{m['step_mb']:,.0f} ({m['step_mb'] / base['step_mb']:.3f}×) |")
        if m["variant"] == "LoRA-FA" and base is not m:
            same = abs(m["saved_mb"] - base["saved_mb"]) < 0.05
            why = (" — the same: on the CPU lorakit trains each LoRA Linear as one autograd node "
                   "(`lorakit.fused.FusedLinear`), which saves its input x whether or not A needs a gradient, so "
                   "freezing A frees no activations there" if same and raw["device"] == "cpu" else
                   " — the same" if same else f" — {base['saved_mb'] - m['saved_mb']:,.2f} MB less")
            why += (f". In all, the counted tensors are {counted(m) - counted(base):+,.1f} MB against LoRA's and "
                    f"the peak RSS {m['peak_mb'] - base['peak_mb']:+,.0f} MB (RSS also moves by tens of MB with the "
                    "allocator from one process to the next)")
            notes.append(f"{m['case']}: LoRA-FA trains {m['trainable_params']:,} parameters against LoRA's "
                         f"{base['trainable_params']:,}; it keeps {m['grads_mb']:.2f} MB of gradients against "
                         f"{base['grads_mb']:.2f} and {m['optimizer_state_mb']:.2f} MB of AdamW state against "
                         f"{base['optimizer_state_mb']:.2f} (A's gradients and state are gone), and saves "
                         f"{m['saved_mb']:,.2f} MB for backward against {base['saved_mb']:,.2f}{why}")
        if m["variant"] == "LoRA+" and base is not m:
            notes.append(f"{m['case']}: LoRA+ keeps {m['grads_mb']:.2f} MB of gradients and "
                         f"{m['optimizer_state_mb']:.2f} MB of AdamW state, LoRA {base['grads_mb']:.2f} and "
                         f"{base['optimizer_state_mb']:.2f} "
                         f"(two parameter groups, the same tensors) and saves {m['saved_mb']:,.2f} MB for backward "
                         f"against {base['saved_mb']:,.2f}; its peak RSS is {m['peak_mb'] - base['peak_mb']:+,.0f} MB "
                         "against LoRA's, the allocator's doing where the counted tensors are equal")
    return lines + ["", *(f"- {n}." for n in notes), ""]


def section(raw: dict[str, Any]) -> str:
    """The markdown of one run (one device and dtype), from what `perf.measure` returns, title line first."""
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
        "Speed and memory of one LoRA training step (and DoRA's), of inference, and of a mixed-adapter batch, "
        "lorakit and HF PEFT side by side on the same base weights and the same batch. The **floor** is the same "
        "model with every parameter frozen except the head (none for the causal LM, whose head is tied to its "
        "embeddings and which trains nothing else), and the embedding output made to require grad: the forward "
        "plus the backward through the activations that any LoRA step needs. A training step is forward + loss + "
        "backward, no optimizer step (but in the LoRA+ and LoRA-FA cases at the end). The variants of a case run "
        "round-robin in one process (the first variant rotating each round) after warm-up; each time is the "
        "median over the timed steps. lorakit's adapters get random B (and DoRA magnitudes) and PEFT the same A, "
        "B and m, so both compute the same function (the logit and gradient checks below).",
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
        *[f"- kept from an earlier run, not measured by this command: {', '.join(names)} — measured on "
          f"{run['date']} by `{run['command']}`, lorakit tree `{run['git']}`, {run['versions']}"
          for run, names in _kept_runs(raw)],
        *([f"- 1-minute load average while each case ran, median / max (this run's {env['torch_threads']} torch "
           f"threads make about {env['torch_threads']}; more means other work shared the cores, which slows every "
           "variant and blurs the ratios): "
           + ", ".join(f"{c['name']} {c['load_1min']['median']:.1f} / {c['load_1min']['max']:.1f}"
                       for c in raw["cases"].values() if c.get("load_1min"))]
          if any(c.get("load_1min") for c in raw["cases"].values()) else []),
        "",
    ]
    if raw["speed"]:
        lines += ["| case | reference | reference ms | lorakit ms (× ref.) | PEFT ms (× ref.) | goal for lorakit "
                  "| PEFT's figure in the issue | met? |", "|---|---|---:|---:|---:|---|---:|---|"]
    for r in raw["speed"]:
        ref = r["reference_ms"]
        ref_text = f"{ref['lorakit']:,.1f}" if ref["lorakit"] == ref["peft"] else \
            f"{ref['lorakit']:,.1f} / {ref['peft']:,.1f}"
        goal = "—" if r["goal_x"] is None else f"≤ {r['goal_x']:.2f}×"
        lines.append(f"| {r['what']} | {r['reference']} | {ref_text} | {_ms(r['ms']['lorakit'], r['x']['lorakit'])} "
                     f"| {_ms(r['ms']['peft'], r['x']['peft'])} | {goal} | {r['issue_figure']} | {_met(r['met'])} |")
    checks = [f"{c['name']}: " + ", ".join(f"{k} {v:.1e}" for k, v in c["check_max_abs_logit_diff"].items())
              for c in raw["cases"].values() if c.get("check_max_abs_logit_diff")]
    grads = [f"{c['name']}: " + ", ".join(f"{k} {v:.1e}" for k, v in c["check_max_rel_grad_diff"].items())
             for c in raw["cases"].values() if c.get("check_max_rel_grad_diff")]
    lines += ["", "Largest logit difference between the models of a case (eval mode, before timing): "
              + "; ".join(checks) + "."]
    if grads:
        lines += ["", "Largest difference between lorakit's and PEFT's gradients of A, B and (DoRA) m after one "
                  "backward of the loss (eval mode, before timing), relative to the largest gradient: "
                  + "; ".join(grads) + "."]
    lines.append("")
    if raw.get("dora"):
        lines += dora_lines(raw["dora"])
    if raw["memory"]:
        what = ("peak `torch.cuda.max_memory_allocated`; built = `memory_allocated` after building"
                if raw["device"] == "cuda" else
                "peak RSS (`ru_maxrss`); built = RSS after building model and batch and reading every weight once, "
                "where the peak counter is reset")
        again = raw.get("memory_run")
        lines += [
            f"Memory of {raw['memory'][0]['steps']} training step(s), each variant in its own process ({what}; "
            "step = peak − built: activations, gradients and temporaries; saved for backward: the activations "
            "autograd keeps in one forward, counted exactly, each storage once, weights left out)"
            + (f"; measured again on {again['date']} by `{again['command']}` (lorakit tree `{again['git']}`)"
               if again else "") + ".",
            "",
        ]
        plain = [m for m in raw["memory_rows"] if not m.get("optimizer")]
        if plain:
            lines += ["| case | variant | built MB | peak MB | step MB | saved for backward MB | lorakit ÷ PEFT "
                      "(peak / step) | goal | met? |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
        for m in plain:
            vs = "" if m.get("vs_peft_peak") is None else \
                f"{m['vs_peft_peak']:.3f} / " + ("—" if m["vs_peft_step"] is None else f"{m['vs_peft_step']:.3f}")
            lines.append(f"| {m['case']} | {m['variant']} | {m['built_mb']:,.0f} | {m['peak_mb']:,.0f} | "
                         f"{m['step_mb']:,.0f} | {_mb(m.get('saved_mb'))} | {vs} | {m['goal'] or '—'} | "
                         f"{_met(m['met'])} |")
        lines += [""] if plain else []
        optimized = [m for m in raw["memory_rows"] if m.get("optimizer")]
        if optimized:
            lines += optimizer_lines(raw, optimized)
    lines += ["The cases: " + "; ".join(f"**{c['name']}** {c['description']}" for c in raw["cases"].values()) + ".",
              "The end-to-end goal (the default sentiment job against PEFT + Trainer) is measured by "
              "`python -m benchmarks.sentiment`, in its own section.", ""]
    return "\n".join(lines)

"""The section of results.md that `python -m benchmarks` writes: the speed table (each implementation against
its reference, with the issue's goals), the memory table, and the markdown of both."""

from __future__ import annotations

from typing import Any

from .cases import MODEL_NAMES, Case

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

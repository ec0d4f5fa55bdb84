"""Study `merge-latency`: does a merged adapter cost nothing at inference (the LoRA paper's Table 1)?

Three copies of the packaged MiniLM classifier — the base, the base with a LoRA adapter (query, value,
r=8) kept unmerged, and the same adapter merged by `merge_and_unload` — run the same batches, timed in
interleaved rounds so machine noise falls on all three alike; medians are compared.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

from .. import inject, merge_and_unload
from ..layers import LoraAdapter
from .report import Report, command_line

BATCHES = (1, 32)


def _timed(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids)
    return time.perf_counter() - start


def run(out: Path, quick: bool = False, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from ..hub import minilm_dir

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    seq_len, rounds = (32, 5) if quick else (64, 30)
    base = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
    unmerged = copy.deepcopy(base)
    inject(unmerged, ["query", "value"], r=8, alpha=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter: B away from zero, so merging changes the weights
        for m in unmerged.modules():
            if isinstance(m, LoraAdapter):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.02)
    unmerged.eval()
    merged = merge_and_unload(copy.deepcopy(unmerged)).eval()
    models = {"base": base, "unmerged": unmerged, "merged": merged}

    rows, medians, check = [], {}, {}
    with torch.inference_mode():
        for batch in BATCHES:
            ids = torch.randint(1000, 20000, (batch, seq_len), generator=g)
            check[batch] = (merged(input_ids=ids).logits - unmerged(input_ids=ids).logits).abs().max().item()
            for model in models.values():  # warm-up
                _timed(model, ids)
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(rounds):
                for name, model in models.items():
                    times[name].append(_timed(model, ids))
            medians[batch] = {name: statistics.median(t) * 1000 for name, t in times.items()}
            m = medians[batch]
            rows.append([batch, f"{m['base']:.2f}", f"{m['unmerged']:.2f} ({m['unmerged'] / m['base']:.3f}×)",
                         f"{m['merged']:.2f} ({m['merged'] / m['base']:.3f}×)", f"{check[batch]:.1e}"])

    report = Report("Merged adapters add no inference latency", out)
    report.header(f"all-MiniLM-L6-v2 (BERT, 6 layers), sequences of {seq_len} tokens; LoRA r=8 on query and value. "
                  f"Median forward latency over {rounds} interleaved rounds, after one warm-up, under "
                  f"`torch.inference_mode`.", command_line(), [seed], quick)
    report.table(["batch", "base (ms)", "adapter unmerged (ms)", "adapter merged (ms)",
                  "largest logit difference, merged vs unmerged"], rows)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.25
    for i, name in enumerate(models):
        ax.bar([b + (i - 1) * width for b in range(len(BATCHES))],
               [medians[b][name] / medians[b]["base"] for b in BATCHES], width, label=name)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xticks=range(len(BATCHES)), xticklabels=[f"batch {b}" for b in BATCHES], ylabel="latency ÷ base")
    ax.legend()
    report.figure(fig, "latency", "latency relative to the base model")
    plt.close(fig)
    for b in BATCHES:
        m = medians[b]
        merged_pct, unmerged_pct = 100 * (m["merged"] / m["base"] - 1), 100 * (m["unmerged"] / m["base"] - 1)
        report.add(f"- batch {b}: latency against the base: merged {merged_pct:+.1f}%, unmerged {unmerged_pct:+.1f}%.")
    worst = max(abs(medians[b]["merged"] / medians[b]["base"] - 1) for b in BATCHES)
    verdict = ("agrees with" if worst < 0.03 else "does not clearly show") + " the paper's claim"
    report.add("", f"The merged model has exactly the base's layers, so any gap between them is timing noise "
                   f"(largest here {100 * worst:.1f}%); this {verdict} that merging removes the adapter's cost. "
                   f"Merged and unmerged logits agree to {max(check.values()):.1e}.")
    return report.write()

"""The timed runs of `python -m benchmarks`: a training or inference step as a function of its seed, the
round-robin that interleaves the variants of a case, and the three kinds of case (train, infer, mixed),
each returning its medians and its logit checks."""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import lorakit

from .cases import HEADS, Case, Variant, train_variants
from .models import (build, copy_to_peft, grad_diff, inject, load_base, make_batch, max_diff, optimizer, out_of,
                     peft_config, randomize_adapters)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], device: str,
               opt: torch.optim.Optimizer | None = None) -> Callable[[int], float]:
    """A function running one timed training step (forward, loss, backward, and `opt.step()` if given) with
    seed `i`. Before it, untimed, the trained weights are marked changed, as the optimizer step of a real
    training step changes them: lorakit's DoRA keeps its norms ‖W0 + s·B·A‖ until A or B change, and would
    otherwise take them once for all the timed steps."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i: int) -> float:
        for p in params:
            p.grad = None
        torch.autograd.graph.increment_version(params)
        torch.manual_seed(i)
        sync(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        if opt is not None:
            opt.step()
        sync(device)
        return time.perf_counter() - start

    return step


def infer_step(forward: Callable[[], Any], device: str) -> Callable[[int], float]:
    """A function running `forward` once under inference mode, timed; its seed argument is unused."""
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
    """Per variant: the median and every time, in milliseconds."""
    return {name: {"median_ms": 1000 * statistics.median(t), "ms": [1000 * s for s in t]} for name, t in times.items()}


def timed(steps: dict[str, Callable[[int], float]], case: Case) -> dict[str, dict[str, Any]]:
    """`summarize` of `interleave` with the case's steps and warm-up."""
    return summarize(interleave(steps, case.steps, case.warmup))


# ---------------------------------------------------------------- the three kinds of case


def run_train(case: Case, device: str, dtype: torch.dtype, log: Callable[..., None]) -> dict[str, Any]:
    base = load_base(case.model, dtype, device, case.random_weights)
    head = HEADS[case.model]
    batch = make_batch(base, case, device, labels=True)
    variants = train_variants(case)
    models = {v.name: build(copy.deepcopy(base), v, head) for v in variants}
    del base
    for v in variants:
        if v.impl == "lorakit":
            randomize_adapters(models[v.name])
    check, grads = {}, {}
    pairs = [[v.name for v in variants if v.lora == lora and v.impl in ("lorakit", "peft")] for lora in case.loras]
    for lk, pf in [p for p in pairs if len(p) == 2]:  # same adapter weights in both, then the same logits and
        lk_model, pf_model = models[lk].eval(), models[pf].eval()  # gradients (dropout off in eval)
        copy_to_peft(lk_model, pf_model)
        with torch.no_grad():
            check[f"{lk} vs {pf}"] = max_diff(out_of(lk_model, batch), out_of(pf_model, batch))
        grads[f"{lk} vs {pf}"] = grad_diff(lk_model, pf_model, batch)
    for m in models.values():
        m.train()
    log(f"built {', '.join(models)}; logits max |lorakit − peft|: {check}; adapter gradients, relative: {grads}")
    steps = {v.name: train_step(models[v.name], batch, device, optimizer(models[v.name], v)) for v in variants}
    variants_ms = timed(steps, case)
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()}
    return {"variants": variants_ms, "trainable_params": trainable, "check_max_abs_logit_diff": check,
            "check_max_rel_grad_diff": grads}


def run_infer(case: Case, device: str, dtype: torch.dtype, log: Callable[..., None]) -> dict[str, Any]:
    base = load_base(case.model, dtype, device, case.random_weights).eval()
    head = HEADS[case.model]
    batch = make_batch(base, case, device, labels=False)
    lora = case.loras[0]
    lk = build(copy.deepcopy(base), Variant("lorakit", "lorakit", lora), head).eval()
    pf = build(copy.deepcopy(base), Variant("peft", "peft", lora), head).eval()
    randomize_adapters(lk)
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
    return {"variants": timed(steps, case), "check_max_abs_logit_diff": check}


def run_mixed(case: Case, device: str, dtype: torch.dtype, log: Callable[..., None]) -> dict[str, Any]:
    from peft import get_peft_model

    base = load_base(case.model, dtype, device, case.random_weights).eval()
    batch = make_batch(base, case, device, labels=False)
    lora = case.loras[0]
    names = [f"a{i}" for i in range(case.adapters)]
    rows = [names[i % len(names)] for i in range(case.batch)]  # each adapter's rows spread through the batch
    lk = copy.deepcopy(base)
    for name in names:
        inject(lk, lora, adapter=name)
    randomize_adapters(lk)
    lorakit.set_adapter(lk, names[0])
    lk.eval()
    config = peft_config(lora, "CAUSAL_LM")
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
    return {"variants": timed(steps, case), "rows": rows, "check_max_abs_logit_diff": check}


RUNNERS = {"train": run_train, "infer": run_infer, "mixed": run_mixed}

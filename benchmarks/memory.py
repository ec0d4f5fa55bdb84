"""Peak memory of a training step of `python -m benchmarks`, every variant in a process of its own.

Each probe runs in a separate process, forked from a server that imported torch, transformers, peft and
lorakit when the run began, and built nothing (spawned on CUDA). On CPU it measures the peak resident set size
(`ru_maxrss`) after the steps, and the resident size after building the model and batch, with the kernel's
peak counter reset at that point (/proc/self/clear_refs), so the difference is the memory the steps add; on
CUDA `torch.cuda.max_memory_allocated` and `memory_allocated` instead. A variant with an optimizer steps it
too, so the peak holds its state from the second step on.

Beside those, three exact counts that no allocator noise touches: the gradients the steps leave, the
optimizer's state (AdamW: two fp32 tensors per trained parameter, and a step count), and what autograd saves
for backward in one more forward (each storage once, weights and buffers left out): the activations.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import resource
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from torch import nn

from .cases import HEADS, Case, Variant, train_variants
from .models import DTYPES, build, load_base, make_batch, optimizer
from .timing import train_step

MB = 2**20


def rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux ≥ 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward in one training forward of `model`: every saved tensor's storage,
    each once, but for the model's own parameters and buffers (weights kept for backward are no activations)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()  # the graph holds t until backward, so no saved storage's address is reused
        if s.data_ptr() not in own:
            kept[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    return sum(kept.values())


def probe_memory(case: Case, variant: Variant, device: str, dtype_name: str, steps: int) -> dict[str, Any]:
    """In a fresh process: build one variant, run `steps` training steps; memory after building and at peak,
    then the gradients, optimizer state and saved activations, counted."""
    head = HEADS[case.model]
    model = build(load_base(case.model, DTYPES[dtype_name], device, case.random_weights), variant, head).train()
    batch = make_batch(model, case, device, labels=True)
    opt = optimizer(model, variant)
    step = train_step(model, batch, device, opt)
    with torch.no_grad():  # page in weights loaded by mmap, which would otherwise count as the step's memory
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        built = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        reset = True
    else:
        reset = reset_peak_rss()
        built = rss_bytes() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for i in range(steps):
        step(i)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.grad.nbytes for p in trained if p.grad is not None)
    state = None if opt is None else \
        sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return {"case": case.name, "variant": variant.name, "impl": variant.impl,
            "dropout": variant.lora.dropout if variant.lora else None, "dora": bool(variant.lora and variant.lora.dora),
            "optimizer": variant.optimizer, "train_a": variant.train_a, "steps": steps,
            "built_mb": built / MB, "peak_mb": peak / MB, "step_mb": (peak - built) / MB, "peak_reset": reset,
            "trainable_params": sum(p.numel() for p in trained), "grads_mb": grads / MB,
            "optimizer_state_mb": None if state is None else state / MB, "saved_mb": saved_bytes(model, batch) / MB}


PRELOAD = ["torch", "transformers", "peft", "lorakit", "benchmarks.memory",
           "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama"]


def probe_pool(parallel: int, cuda: bool) -> ProcessPoolExecutor:
    """Workers that each run one task in a fresh process, forked from a server that imports the libraries
    (and lorakit's code as it is now, the code the timings run) before this returns, and nothing else.
    With `cuda`, spawned instead: importing peft imports bitsandbytes, which starts CUDA, and a process
    forked after that cannot use the GPU. A spawned worker imports lorakit when it starts."""
    ctx = multiprocessing.get_context("spawn" if cuda else "forkserver")
    if not cuda:
        ctx.set_forkserver_preload(PRELOAD)
    pool = ProcessPoolExecutor(max_workers=parallel, mp_context=ctx, max_tasks_per_child=1)
    pool.submit(os.getpid).result()
    return pool


def run_memory(pool: ProcessPoolExecutor, todo: list[Case], device: str, dtype_name: str, steps: int,
               log: Callable[..., None]) -> list[dict[str, Any]]:
    """`probe_memory` for every (case, variant), each in its own process."""
    jobs = [(case, v) for case in todo for v in train_variants(case)]
    futures = [pool.submit(probe_memory, case, v, device, dtype_name, steps) for case, v in jobs]
    out = []
    for (case, v), f in zip(jobs, futures):
        out.append(r := f.result())
        log(f"memory {case.name} {v.name}: built {r['built_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB, "
            f"step {r['step_mb']:.0f} MB")
    return out

"""Checkpoints that survive interruption: trainable weights, optimizer, scheduler, RNG and progress.

A checkpoint is a folder written whole under a temporary name and swapped in by renames, so a kill
at any moment leaves either the previous checkpoint or the new one, never half of each. Tensors go
to safetensors; progress to JSON. Nothing is unpickled.

In a distributed run every rank calls `save` (under FSDP the sharded tensors are gathered whole, a
collective) and rank 0 alone writes; on `load` every rank reads the same folder and takes its own
shard and its own RNG state.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import full_tensor
from .distributed import shard_like

NAME = "checkpoint"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters, whole (gathered from every rank when sharded)."""
    with torch.no_grad():
        return {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def write_atomic_dir(target: Path, write: callable) -> None:
    """Call write(tmp_dir), then put tmp_dir at `target`, replacing what was there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        old = target.with_name(target.name + ".old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(run: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         progress: dict[str, Any], rng: list[torch.Tensor], write: bool = True) -> None:
    """progress: JSON-able (epoch, next batch, step, best metric, ...); rng: torch's CPU RNG state of
    each rank, in rank order. write False: take part in gathering only (ranks other than 0)."""
    opt = optimizer.state_dict()
    with torch.no_grad():
        tensors = {f"{i}.{k}": full_tensor(v) for i, st in opt["state"].items() for k, v in st.items()}
    weights = trainable_state(model)
    if not write:
        return
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()
    tensors["rng"] = rng[0]
    tensors.update({f"rng.{k}": state for k, state in enumerate(rng) if k})

    def write_files(tmp: Path) -> None:
        save_file({k: v.contiguous().cpu() for k, v in weights.items()}, tmp / "trainable.safetensors")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / "optimizer.safetensors")
        meta = {"progress": progress, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
                "state_keys": {str(i): sorted(st) for i, st in opt["state"].items()}}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))

    write_atomic_dir(run / NAME, write_files)


def find(run: Path) -> Path | None:
    """The newest complete checkpoint folder (the `.old` one if a swap was interrupted)."""
    for candidate in (run / NAME, run / (NAME + ".old")):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def load(run: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any) -> tuple[dict, list[torch.Tensor]]:
    """Restore everything `save` wrote; return (progress, the RNG state of each rank)."""
    path = find(run)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run} to resume from")
    meta = json.loads((path / "state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise ValueError(f"checkpoint in {path} does not match the model: no parameter {missing[0]!r}")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(shard_like(t, params[n]))
    tensors = load_file(path / "optimizer.safetensors")
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    state = {int(i): {k: shard_like(tensors[f"{i}.{k}"], ordered[int(i)]) for k in keys}
             for i, keys in meta["state_keys"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda_rng"])
    ranks = 1 + sum(k.startswith("rng.") for k in tensors)
    return meta["progress"], [tensors["rng"]] + [tensors[f"rng.{k}"] for k in range(1, ranks)]

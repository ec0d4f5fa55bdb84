"""Checkpoints that survive interruption: trainable weights, optimizer, scheduler, RNG and progress.

A checkpoint is a folder written whole under a temporary name and swapped in (`atomic.write_dir`), so a
kill at any moment leaves either the previous checkpoint or the new one, never half of each. Tensors go
to safetensors, progress to JSON; `manifest.json`, written with them, holds the sha256 of every file, and a
checkpoint whose files do not match it (changed, truncated, from another save) is refused on resume, as is
one whose tensors do not fit the model. A checkpoint is only written while every weight is finite. Nothing
is unpickled.

In a distributed run every rank calls `save` (under FSDP the sharded tensors are gathered whole, a
collective) and rank 0 alone writes; on `load` every rank reads the same folder and takes its own
shard and its own RNG state.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import atomic, tensorfile
from ..adapters import holders
from ..files import full_tensor
from .distributed import shard_like

NAME = "checkpoint"
MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, damaged, or not from this run's model; nothing was changed."""


class NonFiniteWeights(RuntimeError):
    """A trainable weight holds NaN or infinity; no checkpoint was written."""


def strict(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±infinity) replaced by None, so it dumps as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the run's own parameters (`run_params`), whole (gathered from every rank when sharded)."""
    with torch.no_grad():
        return {n: full_tensor(p.detach()).clone() for n, p in run_params(model).items()}


def run_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that are the run's own rather than the base model's: those that train and every adapter's.
    A LoRA-FA adapter's A (train_a=False) does not train, but it was drawn at random by this run, so no file of
    the base model can give it back: a checkpoint holds it, and a bf16 run keeps it in fp32 beside B."""
    adapters = {id(p) for h in holders(model) for p in h.adapters.parameters()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad or id(p) in adapters}


def save(run: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         progress: dict[str, Any], rng: list[torch.Tensor], write: bool = True) -> None:
    """progress: JSON-able (epoch, next batch, step, best metric, ...); rng: torch's CPU RNG state of
    each rank, in rank order. write False: take part in gathering only (ranks other than 0).
    Raises NonFiniteWeights, writing nothing, if a trainable weight is not finite."""
    opt = optimizer.state_dict()
    with torch.no_grad():
        tensors = {f"{i}.{k}": full_tensor(v) for i, st in opt["state"].items() for k, v in st.items()}
    weights = trainable_state(model)
    bad = tensorfile.first_non_finite(weights)
    if bad is not None:
        raise NonFiniteWeights(bad)
    if not write:
        return
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()
    tensors["rng"] = rng[0]
    tensors.update({f"rng.{k}": state for k, state in enumerate(rng) if k})
    meta = {"progress": progress, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
            "state_keys": {str(i): sorted(st) for i, st in opt["state"].items()}}
    blobs = {"trainable.safetensors": tensorfile.dumps(weights), "optimizer.safetensors": tensorfile.dumps(tensors),
             "state.json": json.dumps(strict(meta), indent=1, allow_nan=False).encode()}
    manifest = {"format": 1, "sha256": {name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()}}

    def fill(tmp: Path) -> None:
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    atomic.write_dir(run / NAME, fill)


def find(run: Path) -> Path | None:
    """The checkpoint folder of a run (`.old`: one that an older lorakit's interrupted swap left), or None."""
    for candidate in (run / NAME, run / (NAME + ".old")):
        if candidate.is_dir() and any((candidate / f).exists() for f in (MANIFEST, "state.json")):
            return candidate
    return None


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state, trainable weights, optimizer tensors) of a checkpoint folder, each file checked against the
    manifest; CheckpointError naming the file and the problem."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        sums = manifest["sha256"]
        assert isinstance(sums, dict) and set(sums) == set(FILES)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint in {path} has no {MANIFEST}, so it cannot be verified (written by an "
                              f"older lorakit, or not whole)") from None
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"checkpoint in {path}: {MANIFEST} is damaged") from None
    blobs = {}
    for name in FILES:
        try:
            blobs[name] = (path / name).read_bytes()
        except OSError as e:
            raise CheckpointError(f"checkpoint in {path}: cannot read {name} ({e.strerror or e})") from None
        if hashlib.sha256(blobs[name]).hexdigest() != sums[name]:
            raise CheckpointError(f"checkpoint in {path}: {name} does not match its checksum in {MANIFEST} (changed or "
                                  f"truncated after it was written); it cannot be resumed")
    try:
        state = json.loads(blobs["state.json"])
        weights = tensorfile.loads(blobs["trainable.safetensors"], str(path / "trainable.safetensors"))[0]
        tensors = tensorfile.loads(blobs["optimizer.safetensors"], str(path / "optimizer.safetensors"))[0]
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint in {path}: {e}") from None
    _check_state(state, path)
    return state, weights, tensors


def _check_state(state: object, path: Path) -> None:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint in {path}: state.json {what}")

    if not isinstance(state, dict) or not all(k in state for k in ("progress", "param_groups", "scheduler", "state_keys")):
        raise bad("lacks progress, param_groups, scheduler or state_keys")
    if not isinstance(state["progress"], dict):
        raise bad("has no progress record")
    if not isinstance(state["state_keys"], dict) or not isinstance(state["param_groups"], list):
        raise bad("has malformed optimizer state")


def load(run: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any) -> tuple[dict, list[torch.Tensor]]:
    """Restore everything `save` wrote; return (progress, the RNG state of each rank). Everything is read and
    checked against the model before anything is restored: a CheckpointError leaves the model as it was."""
    path = find(run)
    if path is None:
        raise CheckpointError(f"no checkpoint in {run} to resume from")
    state, weights, tensors = read(path)
    params = run_params(model)
    if set(weights) != set(params):
        extra, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
        raise CheckpointError(f"checkpoint in {path} does not match the model: "
                              + (f"it has {extra[0]!r}, which the model does not train" if extra else
                                 f"it lacks the trainable parameter {missing[0]!r}"))
    for n, t in weights.items():
        if tuple(t.shape) != tuple(params[n].shape):
            raise CheckpointError(f"checkpoint in {path} does not match the model: {n} has shape {tuple(t.shape)} "
                                  f"there and {tuple(params[n].shape)} here")
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        assert len(state["param_groups"]) == len(optimizer.param_groups)
        opt_state = {int(i): {k: shard_like(tensors[f"{i}.{k}"], ordered[int(i)]) for k in keys}
                     for i, keys in state["state_keys"].items()}
        ranks = 1 + sum(k.startswith("rng.") for k in tensors)
        rngs = [tensors["rng"]] + [tensors[f"rng.{k}"] for k in range(1, ranks)]
        assert all(r.dtype == torch.uint8 and r.ndim == 1 for r in rngs)
    except (AssertionError, KeyError, ValueError, IndexError, TypeError):
        raise CheckpointError(f"checkpoint in {path} is inconsistent: its optimizer state does not fit this "
                              f"model's optimizer") from None
    saved_params = {id(p): p.detach().clone() for p in params.values()}
    try:
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(shard_like(t, params[n]))
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        with torch.no_grad():
            for p in params.values():
                p.copy_(saved_params[id(p)])
        raise CheckpointError(f"checkpoint in {path} is inconsistent ({str(e).splitlines()[0]})") from None
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda_rng"])
    return state["progress"], rngs

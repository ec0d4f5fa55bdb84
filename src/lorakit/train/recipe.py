"""The training recipe, top to bottom: set up, measure before, train with checkpoints, evaluate, save.

    from lorakit.train import RunConfig, train
    result = train(RunConfig())           # the default job: sentiment on the packaged MiniLM

A run directory holds config.json (the resolved config), metrics.jsonl, the adapter (lora), or
model.safetensors (full / head), curves.png, and checkpoint/ for --resume.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import atomic, fast_dropout, inject, summary, tensorfile
from ..inject import InjectReport
from ..layers import LoraLayer
from ..files import only_active, adapter_spec, write_adapter
from . import checkpoint, distributed
from .config import ConfigError, RunConfig, build_config
from .tasks import Prepared, default_targets, evaluate, prepare, resolve_device, task_head

RUN_FILES = ("config.json", "metrics.jsonl", "adapter", "model.safetensors", "best.safetensors", "curves.png",
             checkpoint.NAME, checkpoint.NAME + ".old")
# Settings that `--resume` may change: they do not change what was already trained, only how training goes on.
RESUMABLE = ("train.lr", "train.epochs", "train.max_steps", "train.checkpoint_every", "train.log_every",
             "train.eval_batch_size")


class RunError(RuntimeError):
    """The run cannot start or had to stop; the message says why and what to do."""


class Interrupted(RunError):
    """Ctrl-C or SIGTERM: a checkpoint was saved and the run can be resumed."""


def run_config_data(run: Path) -> dict[str, Any]:
    """The JSON object of a run folder's config.json, or RunError saying what is wrong with it."""
    path = run / "config.json"
    if not run.is_dir():
        raise RunError(f"{run} is not a run directory ({'a file' if run.exists() else 'no such folder'}); "
                       f"give the --out folder of `lorakit train`")
    if not path.is_file():
        raise RunError(f"{run} is not a run directory (no config.json); give the --out folder of `lorakit train`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({e}); the run's config is damaged") from None
    except OSError as e:
        raise RunError(f"cannot read {path} ({e.strerror or e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for k, v in data.items() if k in ("model", "data", "lora", "train")):
        raise RunError(f"{path} must hold a JSON object of sections (model, data, lora, train); it is damaged")
    return data


def run_config(run: Path, recipe: dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run's own config, with the keys of `recipe` and `overrides` on top (what `--resume` was asked to change)."""
    data = run_config_data(run)
    for section, values in (recipe or {}).items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    try:
        return build_config(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{run / 'config.json'} with the given settings: {e}") from None


def _flat(cfg: RunConfig) -> dict[str, Any]:
    return {f"{section}.{k}": v for section, values in cfg.to_dict().items() if isinstance(values, dict)
            for k, v in values.items()} | {k: v for k, v in cfg.to_dict().items() if not isinstance(v, dict)}


def resume_changes(run: Path, cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """The settings in which `cfg` differs from the run's own config, as key → (run's value, new value); a
    RunError if one of them cannot change on resume."""
    saved = _flat(build_config(run_config_data(run)))
    asked = _flat(cfg)
    changes = {k: (saved.get(k), v) for k, v in asked.items() if k != "out" and saved.get(k) != v}
    fixed = [k for k in changes if k not in RESUMABLE]
    if fixed:
        listed = ", ".join(f"{k} ({changes[k][0]!r} → {changes[k][1]!r})" for k in fixed[:4])
        raise RunError(f"--resume cannot change {listed}: the run in {run} was trained with the first; only "
                       f"{', '.join(RESUMABLE)} can change on resume (or start a new run)")
    return changes


def finished(run: Path) -> bool:
    """Whether a run completed: its last record is the final test and its adapter (or weights) is there."""
    records = _Metrics(run / "metrics.jsonl", write=False).read()
    done = any(r.get("event") == "test_after" for r in records)
    return done and ((run / "adapter").is_dir() or (run / "model.safetensors").is_file())


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> tuple[RunConfig, Path, dict]:
    """Check the output folder for this run without changing anything: refuse to clobber an earlier run
    (unless `overwrite`, and then only once the new run has started), and on resume check that there is
    an unfinished run with a checkpoint and which of its settings `cfg` changes (see `resume_changes`).
    Returns (config, run folder, changes)."""
    run = Path(cfg.out)
    if run.exists() and not run.is_dir():
        raise RunError(f"--out {run} is a file; give a folder for the run")
    if resume:
        if not run.is_dir():
            raise RunError(f"nothing to resume in {run}: no such folder")
        changes = resume_changes(run, cfg)
        if checkpoint.find(run) is None:
            raise RunError(f"nothing to resume in {run}: no checkpoint there")
        if finished(run):
            raise RunError(f"the run in {run} already finished; nothing to resume")
        return cfg, run, changes
    existing = run.is_dir() and any((run / f).exists() for f in RUN_FILES)
    if existing and not overwrite:
        raise RunError(f"{run} already holds a run; pass --overwrite to replace it or --resume to continue it")
    try:
        atomic.replaceable(run, lambda entry: entry in RUN_FILES)
    except FileExistsError as e:
        raise RunError(f"--out: {e}") from None
    return cfg, run, {}


def inject_from_config(cfg: RunConfig, task: Prepared, dry_run: bool = False) -> InjectReport:
    """LoRA surgery as the config asks: its targets (or the architecture's) and the task head."""
    targets = cfg.lora.targets or default_targets(task.arch)
    if targets == ["all-linear"]:
        targets = "all-linear"
    try:
        return inject(task.model, targets, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                      rslora=cfg.lora.rslora, bias=cfg.lora.bias, modules_to_save=head_of(cfg, task), dry_run=dry_run)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"lora: {e}") from None


def head_of(cfg: RunConfig, task: Prepared) -> list[str]:
    return cfg.lora.modules_to_save if cfg.lora.modules_to_save is not None else task_head(cfg, task.arch)


def apply_method(cfg: RunConfig, task: Prepared, print_fn=print) -> None:
    """Make the right parameters trainable: LoRA adapters (+ head), everything, or the head only."""
    model = task.model
    if task.quant is not None:
        print_fn(task.quant)
    if cfg.lora.method == "lora":
        print_fn(inject_from_config(cfg, task))
    elif cfg.lora.method == "full":
        model.requires_grad_(True)
    else:
        head = head_of(cfg, task)
        if not head:
            raise ConfigError(f"lora.method = head needs lora.modules_to_save for architecture {task.arch!r}")
        model.requires_grad_(False)
        for name in head:
            model.get_submodule(name).requires_grad_(True)
    summary(model, print_fn=lambda table: print_fn("\n".join(
        line for line in table.splitlines()[1:] if line.endswith("trainable") or line.startswith("trainable params"))))


def frozen_to_bf16(model: nn.Module) -> int:
    """Store the frozen fp32 weights of a bf16-autocast run in bf16, in place; returns how many values.

    Autocast casts every frozen Linear weight to bf16 again at each forward; stored in bf16 they are cast
    once (LayerNorm and embedding weights, which autocast leaves in fp32, are rounded to bf16 too, as in
    any bf16 base). The adapters and whatever trains stay fp32. Each LoRA layer's base fingerprint is
    taken first, from the fp32 weights, so the saved adapter still names the base it was trained on."""
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.base_digest()
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
            n += p.numel()
    return n


def schedule(cfg: RunConfig, total: int):
    """The learning-rate factor at each step: linear warmup over `train.warmup` of `total`, then linear,
    cosine or constant."""
    warm = int(cfg.train.warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.train.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return max(0.0, 1 - progress) if cfg.train.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class _Metrics:
    """metrics.jsonl: one JSON record a line, strict JSON (a non-finite number is written as null); `count` is
    how many records the file holds. write False: a rank other than 0, which reads but never writes."""

    def __init__(self, path: Path, write: bool = True) -> None:
        self.path, self.writes = path, write
        self.count = len(self.read()) if write else 0

    def write(self, **record: Any) -> None:
        if not self.writes:
            return
        atomic.append_line(self.path, json.dumps(checkpoint.strict(record), allow_nan=False))
        self.count += 1

    def read(self) -> list[dict]:
        """The records; a last line that a kill cut short is not one. RunError if the file is damaged."""
        if not self.path.exists():
            return []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError) as e:
            raise RunError(f"cannot read {self.path} ({e}); the run's metrics are damaged") from None
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1 and not line.endswith("\n"):
                    break  # torn by a kill while it was written
                raise RunError(f"{self.path}: line {i + 1} is not JSON; the run's metrics are damaged") from None
            if not isinstance(record, dict):
                raise RunError(f"{self.path}: line {i + 1} is not a JSON object; the run's metrics are damaged")
            records.append(record)
        return records

    def truncate(self, n: int) -> None:
        """Keep the first n records: what was logged after the checkpoint is logged again on resume."""
        records = self.read()
        if n > len(records):
            raise RunError(f"{self.path} holds {len(records)} records but the checkpoint counts {n}; the run's "
                           f"metrics are damaged")
        atomic.write_file(self.path, "".join(json.dumps(checkpoint.strict(r), allow_nan=False) + "\n" for r in records[:n]))
        self.count = n


def _show_examples(task: Prepared, model: nn.Module, when: str, print_fn, n: int = 5) -> None:
    if task.tokenizer is None or not task.label_names or "test" not in task.texts:
        return
    texts = task.texts["test"][:n]
    batch = task.splits["test"].collate(list(range(len(texts))))
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = task.forward(model, batch)[1].argmax(-1).tolist()
    model.train(was)
    print_fn(f"examples {when}:")
    for text, p, y in zip(texts, pred, batch.labels.tolist()):
        mark = "✓" if p == y else "✗"
        print_fn(f"  {mark} {task.label_names[p]:<10} {text[:90]}")


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, print_fn=print,
          progress_bar: bool | None = None) -> dict[str, Any]:
    """Run one training job; return the final metrics. Ctrl-C or SIGTERM saves a checkpoint first.

    A new run is built in a temporary folder beside `cfg.out` and put in place (replacing an earlier run
    when `overwrite`) only once it has started for real: the data and model loaded, the surgery done, the
    test set scored and a first checkpoint written. Until then nothing at `cfg.out` changes. On `resume`
    the settings of `cfg` must equal the run's own, except those in RESUMABLE, which are applied and
    recorded in the run (config.json and a "resume" record in metrics.jsonl).

    Under torchrun (WORLD_SIZE > 1) this is one rank of a distributed run (see `distributed`): every
    rank trains its slice of each batch, rank 0 alone prints and writes, and all return the same metrics."""
    cfg, run, changes = prepare_run_dir(cfg, resume, overwrite)
    dist = distributed.setup(resolve_device(cfg.train.device), cfg.train.distributed)
    try:
        if not dist.main:
            print_fn, progress_bar = (lambda *args, **kwargs: None), False
        return _train(cfg, run, resume, overwrite, changes, dist, print_fn, progress_bar)
    finally:
        dist.close()


def _train(cfg: RunConfig, run: Path, resume: bool, overwrite: bool, changes: dict, dist: distributed.Dist,
           print_fn, progress_bar) -> dict[str, Any]:
    torch.manual_seed(cfg.train.seed)
    task = prepare(cfg)
    model = task.model
    apply_method(cfg, task, print_fn)
    fast_dropout(model)  # the base's own dropout layers: the same masks' distribution, drawn faster on CPU
    if cfg.train.bf16 and cfg.lora.method != "full" and cfg.model.quantize == "none" \
            and not (dist.world > 1 and cfg.train.distributed == "fsdp"):
        frozen_to_bf16(model)
    if dist.rank:
        torch.manual_seed(cfg.train.seed + 1_000_003 * dist.rank)  # rank k's own dropout masks
    if not any(p.requires_grad for p in model.parameters()):
        raise RunError("no trainable parameters; check lora.method and lora.targets")
    trained = distributed.wrap(model, dist, find_unused=cfg.lora.method != "lora")
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP swaps in sharded ones
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    train_split = task.splits["train"]
    n_batches = len(train_split.batches(cfg.train.batch_size * dist.world, 0, True))
    steps_per_epoch = math.ceil(n_batches / cfg.train.grad_accum)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    factor = schedule(cfg, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    key = task.metric
    better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
    evaluate_split = lambda split: evaluate(task, model, split, cfg.train.eval_batch_size, dist)  # noqa: E731

    if resume:
        metrics = _Metrics(run / "metrics.jsonl", write=dist.main)
        progress, rngs = checkpoint.load(run, model, optimizer, scheduler)
        if len(rngs) != dist.world:
            how = f"with --nproc {len(rngs)}" if len(rngs) > 1 else "in one process (no --nproc, no torchrun)"
            raise RunError(f"the run in {run} was trained on {len(rngs)} process{'es' if len(rngs) > 1 else ''}, "
                           f"this is {dist.world}; resume it {how}, as the data of each step depends on it")
        try:
            torch.set_rng_state(rngs[dist.rank])
        except RuntimeError:
            raise checkpoint.CheckpointError(f"checkpoint in {run / checkpoint.NAME} holds a damaged RNG state") from None
        dist.barrier()  # every rank has read metrics.jsonl before rank 0 cuts it
        if dist.main:
            atomic.tidy(run)  # what killed writes left beside the run folder and in it
            atomic.clean_folder(run)
            metrics.truncate(progress["metrics_lines"])
        if changes:
            _apply_resume_changes(cfg, changes, optimizer, scheduler, factor)
            if dist.main:
                atomic.write_file(run / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
                metrics.write(event="resume", step=progress["step"],
                              changed={k: {"from": old, "to": new} for k, (old, new) in changes.items()})
            print_fn("resuming with " + ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changes.items()))
        print_fn(f"resuming {run} at epoch {progress['epoch'] + 1}, step {progress['step']}")
    else:
        metrics, progress = _start(cfg, run, overwrite, task, model, optimizer, scheduler, evaluate_split, dist, print_fn)

    stop = {"signal": None}

    def on_signal(signum, frame):  # stop at the end of the step, like Ctrl-C
        stop["signal"] = signum

    # One rank alone must not leave mid-step: the others would wait for it forever. So in a
    # distributed run Ctrl-C, too, only raises the flag, and the ranks agree to stop at a step's end.
    signals = [signal.SIGTERM] + ([signal.SIGINT] if dist.world > 1 else [])
    previous = {s: signal.signal(s, on_signal) for s in signals} if _main_thread() else {}
    model.train()
    try:
        _loop(cfg, task, trained, optimizer, scheduler, params, progress, metrics, run, stop, print_fn, progress_bar,
              better, key, evaluate_split, dist)
    except KeyboardInterrupt:
        nproc = f" --nproc {dist.world}" if dist.world > 1 else ""
        raise Interrupted(f"interrupted at step {progress['step']}; checkpoint saved — continue with "
                          f"`lorakit train --resume --out {run}{nproc}`") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return _finish(cfg, run, task, model, metrics, progress, evaluate_split, dist, print_fn)


def _start(cfg: RunConfig, run: Path, overwrite: bool, task: Prepared, model: nn.Module, optimizer, scheduler,
           evaluate_split, dist: distributed.Dist, print_fn) -> tuple[_Metrics, dict[str, Any]]:
    """Begin a new run in a temporary folder beside `run` (rank 0 writes): the config, the test score
    before training and a first checkpoint; then put it at `run`, replacing an earlier run there (its other
    files are kept). A failure or a kill before that leaves `run` as it was."""
    home = atomic.stage(run) if dist.main else run
    try:
        if dist.main:
            (home / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        metrics = _Metrics(home / "metrics.jsonl", write=dist.main)
        before = evaluate_split("test")
        metrics.write(event="test_before", **before)
        print_fn(f"test {task.metric} before training: {before[task.metric]:.4f}")
        _show_examples(task, model, "before training", print_fn)
        progress = {"epoch": 0, "batch": 0, "step": 0, "best": None, "test_before": before,
                    "metrics_lines": metrics.count}
        checkpoint.save(home, model, optimizer, scheduler, progress, dist.gather(torch.get_rng_state()),
                        write=dist.main)

        def free(target: Path) -> None:
            if not overwrite and any((target / f).exists() for f in RUN_FILES):
                raise RunError(f"{target} already holds a run; pass --overwrite to replace it or --resume to continue it")

        if dist.main:
            atomic.publish(home, run, check=free, replaced=lambda entry: entry in RUN_FILES)
    except BaseException:
        if dist.main:
            shutil.rmtree(home, ignore_errors=True)
        raise
    dist.barrier()
    metrics.path = run / "metrics.jsonl"
    return metrics, progress


def _apply_resume_changes(cfg: RunConfig, changes: dict, optimizer, scheduler, factor) -> None:
    """Give the restored optimizer and schedule the new learning rate and step budget: the rate at the
    current step is the new base rate times the (new) schedule's factor there."""
    scheduler.base_lrs = [cfg.train.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.train.lr
        group["lr"] = cfg.train.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _finish(cfg: RunConfig, run: Path, task: Prepared, model: nn.Module, metrics: _Metrics, progress: dict,
            evaluate_split, dist: distributed.Dist, print_fn) -> dict[str, Any]:
    """The best weights, the test score after training, the adapter (or weights) and the plot; the run is
    complete once its last record, the test score, is written — a kill before that leaves it resumable."""
    key = task.metric
    best_path = run / "best.safetensors"
    seen_by = dist.sum([float(best_path.exists())])[0]
    if 0 < seen_by < dist.world:
        raise RunError(f"{run} is not on storage every rank sees ({seen_by:.0f} of {dist.world} find "
                       f"{best_path.name}); give --out a folder on a shared filesystem")
    if best_path.exists():
        _load_weights(model, best_path, trainable_only=True)
    after = evaluate_split("test")
    _show_examples(task, model, "after training", print_fn)
    if cfg.lora.method == "lora":
        name = only_active(model)
        spec = adapter_spec(model, name)  # on every rank: under FSDP this gathers the shards
        if dist.main:
            write_adapter(model, spec, run / "adapter", name, overwrite=True, print_fn=print_fn)
    else:
        weights = checkpoint.trainable_state(model)
        if dist.main:
            atomic.write_file(run / "model.safetensors", tensorfile.dumps(weights))
    if dist.main:
        plot(metrics.read() + [{"event": "test_after", **after}], run / "curves.png", key)
    metrics.write(event="test_after", **after)
    dist.barrier()
    before = progress["test_before"]
    print_fn(f"test {key}: {before[key] if before[key] is None else f'{before[key]:.4f}'} before → "
             f"{after[key]:.4f} after")
    print_fn(f"run directory: {run} (config.json, metrics.jsonl, "
             f"{'adapter/' if cfg.lora.method == 'lora' else 'model.safetensors'}, curves.png)")
    return {"before": before, "after": after, "best_val": progress["best"], "steps": progress["step"], "run": str(run)}


def _load_weights(model: nn.Module, path: Path, trainable_only: bool) -> None:
    """Copy the tensors of a weights file lorakit wrote into the model's parameters of those names, after
    checking the file (its checksum, when it has one) and that every tensor fits; RunError otherwise."""
    try:
        tensors = tensorfile.read(path)[0]
    except tensorfile.TensorFileError as e:
        raise RunError(str(e)) from None
    named = {n: p for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    for n, t in tensors.items():
        if n not in named:
            raise RunError(f"{path} holds {n!r}, which is not a {'trainable ' if trainable_only else ''}parameter "
                           f"of the run's model; the file is from another run")
        if tuple(t.shape) != tuple(named[n].shape):
            raise RunError(f"{path}: {n} has shape {tuple(t.shape)}, the model's is {tuple(named[n].shape)}")
    if not tensors:
        raise RunError(f"{path} holds no tensors")
    with torch.no_grad():
        for n, t in tensors.items():
            named[n].copy_(distributed.shard_like(t, named[n]))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _loop(cfg, task, model, optimizer, scheduler, params, progress, metrics, run, stop, print_fn, progress_bar,
          better, key, evaluate_split, dist) -> None:
    """Epochs of steps; `model` is what the training forward runs through (DDP wrapper or FSDP model).
    A step takes grad_accum global batches; each rank trains on its slice (`Dist.shard`)."""
    from tqdm.auto import tqdm

    split = task.splits["train"]
    accum = cfg.train.grad_accum
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    raw = model.module if ddp else model

    saved_step = progress["step"]  # of the checkpoint on disk, whose weights are finite

    def save(rng: torch.Tensor) -> None:
        nonlocal saved_step
        progress["metrics_lines"] = metrics.count
        try:
            checkpoint.save(run, raw, optimizer, scheduler, progress, dist.gather(rng), write=dist.main)
        except checkpoint.NonFiniteWeights as e:
            raise diverged(f"weight {e} became non-finite by step {progress['step']}") from None
        saved_step = progress["step"]
        dist.barrier()

    def diverged(what: str) -> RunError:
        lower = f"{cfg.train.lr / 10:g}"
        return RunError(f"{what} (epoch {progress['epoch'] + 1}); stopped — the last checkpoint, all of whose weights "
                        f"are finite, is from step {saved_step} in {run / checkpoint.NAME}; resume it with a lower "
                        f"learning rate: lorakit train --resume --out {run} --train.lr {lower}")

    show = sys.stderr.isatty() if progress_bar is None else progress_bar
    rng_at_boundary = torch.get_rng_state()
    for epoch in range(progress["epoch"], cfg.train.epochs):
        if cfg.train.max_steps and progress["step"] >= cfg.train.max_steps:
            break
        batches = split.batches(cfg.train.batch_size * dist.world, epoch, True)
        bar = tqdm(total=len(batches), initial=progress["batch"], desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not show, unit="batch", dynamic_ncols=True)
        start, seen = time.perf_counter(), 0
        b = progress["batch"]
        while b < len(batches):
            group = batches[b:b + accum]
            try:
                loss_sum = 0.0
                for i, index in enumerate(group):
                    mine, weight = dist.shard(index)
                    batch = split.collate(mine)
                    # DDP averages gradients at the group's last backward only.
                    last = i == len(group) - 1
                    with model.no_sync() if ddp and not last else contextlib.nullcontext():
                        loss, _ = task.forward(model, batch)
                        (loss * (weight / len(group))).backward()
                    loss_sum += loss.item() * weight / len(group) if weight else 0.0
                    seen += len(index)
                loss_sum, stopping = dist.sum([loss_sum / dist.world, float(stop["signal"] is not None)])
                if not math.isfinite(loss_sum):
                    raise diverged(f"loss became {loss_sum} at step {progress['step'] + 1}")
                if cfg.train.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            except KeyboardInterrupt:
                optimizer.zero_grad(set_to_none=True)
                save(rng_at_boundary)
                bar.close()
                raise
            b += len(group)
            progress.update(batch=b, step=progress["step"] + 1)
            rng_at_boundary = torch.get_rng_state()
            rate = seen / (time.perf_counter() - start)
            bar.update(len(group))
            bar.set_postfix(loss=f"{loss_sum:.4f}", ex_s=f"{rate:.0f}")
            if progress["step"] % cfg.train.log_every == 0:
                lr = scheduler.get_last_lr()[0]
                metrics.write(event="train", epoch=epoch + 1, step=progress["step"], loss=loss_sum, lr=lr,
                              examples_per_s=rate)
                if not show:
                    eta = (len(batches) - b) * cfg.train.batch_size * dist.world / max(rate, 1e-9)
                    print_fn(f"  epoch {epoch + 1} step {progress['step']:>5}  loss {loss_sum:.4f}  "
                             f"lr {lr:.2e}  {rate:,.0f} examples/s  epoch eta {eta // 60:.0f}m{eta % 60:02.0f}s")
            if progress["step"] % cfg.train.checkpoint_every == 0:
                save(rng_at_boundary)
            if stopping:
                save(rng_at_boundary)
                bar.close()
                raise KeyboardInterrupt
            if cfg.train.max_steps and progress["step"] >= cfg.train.max_steps:
                break
        bar.close()
        took = time.perf_counter() - start
        val = evaluate_split("val")
        metrics.write(event="val", epoch=epoch + 1, step=progress["step"], **val)
        improved = math.isfinite(val[key]) and (progress["best"] is None or better(val[key], progress["best"]))
        print_fn(f"epoch {epoch + 1}: validation {key} {val[key]:.4f}" + ("  (best so far)" if improved else "")
                 + f"  [{took // 60:.0f}m{took % 60:04.1f}s training on {dist.world} process"
                 + ("es]" if dist.world > 1 else "]"))
        if improved:
            progress["best"] = val[key]
            weights = checkpoint.trainable_state(raw)  # on every rank: under FSDP this gathers the shards
            bad = checkpoint.first_non_finite(weights)
            if bad is not None:
                raise diverged(f"weight {bad} became non-finite by step {progress['step']}")
            if dist.main:
                atomic.write_file(run / "best.safetensors", tensorfile.dumps(weights))
            dist.barrier()
        progress.update(epoch=epoch + 1, batch=0)
        save(torch.get_rng_state())
        if cfg.train.max_steps and progress["step"] >= cfg.train.max_steps:
            break


def plot(records: list[dict], path: Path, key: str) -> None:
    """Training loss and validation metric against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("event") == "train"]
    val = [r for r in records if r.get("event") == "val"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    ax2.plot([r["step"] for r in val], [r[key] for r in val], "o-", color="tab:green", label="validation")
    for r in records:
        if r.get("event") in ("test_before", "test_after"):
            x = 0 if r["event"] == "test_before" else (val[-1]["step"] if val else 0)
            ax2.scatter([x], [r[key]], marker="*", s=120, color="tab:red", zorder=3)
    ax2.set(xlabel="step", ylabel=key, title=f"{key} (★ test before / after)")
    ax2.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic.write_file(path, png.getvalue())


def load_run(run: str | Path, with_adapter: bool = True, quantize: str | None = None) -> tuple[RunConfig, Prepared]:
    """A finished run's config, task data and model, with the run's adapter (or weights) applied.

    quantize: base precision to load instead of the run's own model.quantize ("none" or "nf4")."""
    from ..files import load_adapter

    path = Path(run)
    data = run_config_data(path)
    if quantize is not None:
        data.setdefault("model", {})["quantize"] = quantize
    try:
        cfg = build_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None
    task = prepare(cfg)
    if with_adapter:
        if (path / "adapter").is_dir():
            load_adapter(task.model, path / "adapter")
        elif (path / "model.safetensors").is_file():
            _load_weights(task.model, path / "model.safetensors", trainable_only=False)
        else:
            raise RunError(f"{path} has no adapter/ or model.safetensors: the run has not finished; "
                           f"`lorakit train --resume --out {path}` completes it")
    task.model.eval()
    return cfg, task

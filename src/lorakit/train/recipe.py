"""The training recipe, top to bottom: set up, measure before, train with checkpoints, evaluate, save.

    from lorakit.train import RunConfig, train
    result = train(RunConfig())           # the default job: sentiment on the packaged MiniLM

A run directory holds config.json (the resolved config), metrics.jsonl, the adapter (lora), or
model.safetensors (full / head), curves.png, and checkpoint/ for --resume.
"""

from __future__ import annotations

import contextlib
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

from .. import fast_dropout, inject, summary
from ..inject import InjectReport
from ..layers import LoraLayer
from ..files import only_active, adapter_spec, write_adapter
from . import checkpoint, distributed
from .config import ConfigError, RunConfig, build_config
from .tasks import Prepared, default_targets, evaluate, prepare, resolve_device, task_head

RUN_FILES = ("config.json", "metrics.jsonl", "adapter", "model.safetensors", "best.safetensors", "curves.png",
             checkpoint.NAME, checkpoint.NAME + ".old")


class RunError(RuntimeError):
    """The run cannot start or had to stop; the message says why and what to do."""


class Interrupted(RunError):
    """Ctrl-C or SIGTERM: a checkpoint was saved and the run can be resumed."""


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> tuple[RunConfig, Path]:
    """Refuse to clobber an earlier run; on resume, continue with the run's own saved config.
    Changes nothing on disk (`clear_run` removes an old run that --overwrite replaces)."""
    run = Path(cfg.out)
    existing = run.is_dir() and any((run / f).exists() for f in RUN_FILES)
    if resume:
        if checkpoint.find(run) is None:
            raise RunError(f"nothing to resume in {run}: no checkpoint there")
        saved = json.loads((run / "config.json").read_text())
        return build_config(saved), run
    if existing and not overwrite:
        raise RunError(f"{run} already holds a run; pass --overwrite to replace it or --resume to continue it")
    return cfg, run


def clear_run(run: Path) -> None:
    for f in RUN_FILES:
        p = run / f
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def inject_from_config(cfg: RunConfig, task: Prepared, dry_run: bool = False) -> InjectReport:
    """LoRA surgery as the config asks: its targets (or the architecture's) and the task head."""
    targets = cfg.lora.targets or default_targets(task.arch)
    if targets == ["all-linear"]:
        targets = "all-linear"
    try:
        return inject(task.model, targets, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                      rslora=cfg.lora.rslora, bias=cfg.lora.bias, modules_to_save=head_of(cfg, task), dry_run=dry_run)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"lora.targets: {e}") from None


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
    """metrics.jsonl: one JSON record a line; `count` is how many the file holds. write False: a
    rank other than 0, which reads but never writes."""

    def __init__(self, path: Path, write: bool = True) -> None:
        self.path, self.writes = path, write
        self.count = len(self.read())

    def write(self, **record: Any) -> None:
        if not self.writes:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.count += 1

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, n: int) -> None:
        """Keep the first n records: what was logged after the checkpoint is logged again on resume."""
        lines = self.path.read_text().splitlines(keepends=True)[:n] if self.path.exists() else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(lines))
        tmp.replace(self.path)
        self.count = len(lines)


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

    Under torchrun (WORLD_SIZE > 1) this is one rank of a distributed run (see `distributed`): every
    rank trains its slice of each batch, rank 0 alone prints and writes, and all return the same metrics."""
    cfg, run = prepare_run_dir(cfg, resume, overwrite)
    dist = distributed.setup(resolve_device(cfg.train.device), cfg.train.distributed)
    try:
        if not dist.main:
            print_fn, progress_bar = (lambda *args, **kwargs: None), False
        if overwrite and not resume:
            dist.barrier()  # every rank has checked the folder before rank 0 empties it
            if dist.main:
                clear_run(run)
        return _train(cfg, run, resume, dist, print_fn, progress_bar)
    finally:
        dist.close()


def _train(cfg: RunConfig, run: Path, resume: bool, dist: distributed.Dist, print_fn, progress_bar) -> dict[str, Any]:
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg, total))
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(run / "metrics.jsonl", write=dist.main)
    key = task.metric
    better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
    evaluate_split = lambda split: evaluate(task, model, split, cfg.train.eval_batch_size, dist)  # noqa: E731

    if resume:
        if any(r.get("event") == "test_after" for r in metrics.read()):
            raise RunError(f"the run in {run} already finished; nothing to resume")
        progress, rngs = checkpoint.load(run, model, optimizer, scheduler)
        if len(rngs) != dist.world:
            how = f"with --nproc {len(rngs)}" if len(rngs) > 1 else "in one process (no --nproc, no torchrun)"
            raise RunError(f"the run in {run} was trained on {len(rngs)} process{'es' if len(rngs) > 1 else ''}, "
                           f"this is {dist.world}; resume it {how}, as the data of each step depends on it")
        torch.set_rng_state(rngs[dist.rank])
        dist.barrier()  # every rank has read metrics.jsonl before rank 0 cuts it
        if dist.main:
            metrics.truncate(progress["metrics_lines"])
        print_fn(f"resuming {run} at epoch {progress['epoch'] + 1}, step {progress['step']}")
    else:
        if dist.main:
            (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        before = evaluate_split("test")
        metrics.write(event="test_before", **before)
        print_fn(f"test {key} before training: {before[key]:.4f}")
        _show_examples(task, model, "before training", print_fn)
        progress = {"epoch": 0, "batch": 0, "step": 0, "best": None, "test_before": before}

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
        if checkpoint.find(run) is None:
            raise Interrupted(f"interrupted before the first checkpoint; nothing to resume in {run}") from None
        nproc = f" --nproc {dist.world}" if dist.world > 1 else ""
        raise Interrupted(f"interrupted at step {progress['step']}; checkpoint saved — continue with "
                          f"`lorakit train --resume --out {run}{nproc}`") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    best_path = run / "best.safetensors"
    seen_by = dist.sum([float(best_path.exists())])[0]
    if 0 < seen_by < dist.world:
        raise RunError(f"{run} is not on storage every rank sees ({seen_by:.0f} of {dist.world} find "
                       f"{best_path.name}); give --out a folder on a shared filesystem")
    if best_path.exists():
        from safetensors.torch import load_file

        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in load_file(best_path).items():
                named[n].copy_(distributed.shard_like(t, named[n]))
    after = evaluate_split("test")
    metrics.write(event="test_after", **after)
    _show_examples(task, model, "after training", print_fn)
    if cfg.lora.method == "lora":
        name = only_active(model)
        spec = adapter_spec(model, name)  # on every rank: under FSDP this gathers the shards
        if dist.main:
            write_adapter(model, spec, run / "adapter", name, overwrite=True, print_fn=print_fn)
    else:
        from safetensors.torch import save_file

        weights = checkpoint.trainable_state(model)
        if dist.main:
            save_file({n: t.contiguous().cpu() for n, t in weights.items()}, run / "model.safetensors")
    if dist.main:
        plot(metrics.read(), run / "curves.png", key)
    dist.barrier()
    before = progress["test_before"]
    print_fn(f"test {key}: {before[key]:.4f} before → {after[key]:.4f} after")
    print_fn(f"run directory: {run} (config.json, metrics.jsonl, "
             f"{'adapter/' if cfg.lora.method == 'lora' else 'model.safetensors'}, curves.png)")
    return {"before": before, "after": after, "best_val": progress["best"], "steps": progress["step"], "run": str(run)}


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

    def save(rng: torch.Tensor) -> None:
        progress["metrics_lines"] = metrics.count
        checkpoint.save(run, raw, optimizer, scheduler, progress, dist.gather(rng), write=dist.main)
        dist.barrier()

    show = sys.stderr.isatty() if progress_bar is None else progress_bar
    rng_at_boundary = torch.get_rng_state()
    for epoch in range(progress["epoch"], cfg.train.epochs):
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
                    raise RunError(f"loss became {loss_sum} at step {progress['step'] + 1} (epoch {epoch + 1}); "
                                   f"stopped — the last good checkpoint is in {run / checkpoint.NAME}; "
                                   f"try a lower train.lr")
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
        improved = progress["best"] is None or better(val[key], progress["best"])
        print_fn(f"epoch {epoch + 1}: validation {key} {val[key]:.4f}" + ("  (best so far)" if improved else "")
                 + f"  [{took // 60:.0f}m{took % 60:04.1f}s training on {dist.world} process"
                 + ("es]" if dist.world > 1 else "]"))
        if improved:
            progress["best"] = val[key]
            _save_best(run, raw, dist)
        progress.update(epoch=epoch + 1, batch=0)
        save(torch.get_rng_state())
        if cfg.train.max_steps and progress["step"] >= cfg.train.max_steps:
            break


def _save_best(run: Path, model: nn.Module, dist: distributed.Dist) -> None:
    from safetensors.torch import save_file

    weights = checkpoint.trainable_state(model)  # on every rank: under FSDP this gathers the shards
    if dist.main:
        tmp = run / ".best.safetensors.tmp"
        save_file({k: v.contiguous().cpu() for k, v in weights.items()}, tmp)
        tmp.replace(run / "best.safetensors")
    dist.barrier()


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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)

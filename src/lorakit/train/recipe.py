"""The training recipe, top to bottom: set up, measure before, train with checkpoints, evaluate, save.

    from lorakit.train import RunConfig, train
    result = train(RunConfig())           # the default job: sentiment on the packaged MiniLM

A run directory holds config.json (the resolved config), metrics.jsonl, the adapter (lora), or
model.safetensors (full / head), curves.png, and checkpoint/ for --resume.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import atomic, fast_dropout, inject, param_groups, summary, tensorfile
from ..inject import InjectReport
from ..files import adapter_spec, only_active, write_adapter
from . import checkpoint, distributed
from .loop import Hooks, RunState, fit, stop_on_signals
from .runs import Interrupted, Metrics, RunError, finished, frozen_to_bf16, load_weights, run_config_data, stores_bf16
from .config import ConfigError, RunConfig, build_config
from .tasks import Prepared, default_targets, evaluate, prepare, resolve_device, resolved, trained_in_full

RUN_FILES = ("config.json", "metrics.jsonl", "adapter", "model.safetensors", "best.safetensors", "curves.png",
             checkpoint.NAME, checkpoint.NAME + ".old")
# Settings that `--resume` may change: they do not change what was already trained, only how training goes on.
RESUMABLE = ("train.lr", "train.epochs", "train.max_steps", "train.checkpoint_every", "train.log_every",
             "train.eval_batch_size")


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
    asked = _flat(resolved(cfg))
    changes = {k: (saved.get(k), v) for k, v in asked.items() if k != "out" and not _same(saved.get(k), v)}
    fixed = [k for k in changes if k not in RESUMABLE]
    if fixed:
        listed = ", ".join(f"{k} ({changes[k][0]!r} → {changes[k][1]!r})" for k in fixed[:4])
        raise RunError(f"--resume cannot change {listed}: the run in {run} was trained with the first; only "
                       f"{', '.join(RESUMABLE)} can change on resume (or start a new run)")
    return changes


def _same(a: Any, b: Any) -> bool:
    """Equal, mappings in the same order too (the first key of a rank or alpha pattern that matches wins)."""
    return a == b and (not isinstance(a, dict) or list(a) == list(b))


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
    """LoRA surgery as the config asks: its adapter settings on its targets (or the architecture's), and
    the modules that train in full."""
    targets = cfg.lora.targets or default_targets(task.arch)
    if targets == ["all-linear"]:
        targets = "all-linear"
    try:
        return inject(task.model, targets, cfg.lora.adapter, rank_pattern=cfg.lora.rank_pattern,
                      alpha_pattern=cfg.lora.alpha_pattern, modules_to_save=trained_in_full(cfg, task.arch),
                      dry_run=dry_run)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"lora: {e}") from None


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
        head = trained_in_full(cfg, task.arch)
        if not head:
            raise ConfigError(f"lora.method = head needs lora.modules_to_save for architecture {task.arch!r}")
        model.requires_grad_(False)
        for name in head:
            model.get_submodule(name).requires_grad_(True)
    print_fn(summary(model, print_fn=None).table(trainable_only=True))


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


def _show_examples(task: Prepared, model: nn.Module, when: str, print_fn, n: int = 5) -> None:
    if task.tokenizer is None or not task.label_names or task.held_out not in task.texts:
        return
    texts = task.texts[task.held_out][:n]
    batch = task.splits[task.held_out].collate(list(range(len(texts))))
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
    cfg = resolved(cfg)  # train.bf16 = "auto" becomes what this machine does; config.json records that
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
    if stores_bf16(cfg) and not (dist.world > 1 and cfg.train.distributed == "fsdp"):
        frozen_to_bf16(model, checkpoint.run_params(model).values())
    if dist.rank:
        torch.manual_seed(cfg.train.seed + 1_000_003 * dist.rank)  # rank k's own dropout masks
    if not any(p.requires_grad for p in model.parameters()):
        raise RunError("no trainable parameters; check lora.method and lora.targets")
    trained = distributed.wrap(model, dist, find_unused=cfg.lora.method != "lora")
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP swaps in sharded ones
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.loraplus_ratio))
    n_batches = len(task.splits["train"].batches(cfg.train.batch_size * dist.world, 0, True))
    total = cfg.train.max_steps or cfg.train.epochs * math.ceil(n_batches / cfg.train.grad_accum)
    factor = schedule(cfg, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    evaluate_split = lambda split: evaluate(task, model, split, cfg.train.eval_batch_size, dist)  # noqa: E731

    if resume:
        metrics, state = _resume(cfg, run, changes, model, optimizer, scheduler, factor, dist, print_fn)
    else:
        metrics, state = _start(cfg, run, overwrite, task, model, optimizer, scheduler, evaluate_split, dist, print_fn)
    hooks = RunHooks(cfg, run, task, model, optimizer, scheduler, metrics, evaluate_split, dist, print_fn,
                     sys.stderr.isatty() if progress_bar is None else progress_bar, state.step)
    model.train()
    try:
        with stop_on_signals(dist) as stop:
            fit(trained, task.forward, task.splits["train"], optimizer, scheduler, params, state, cfg.train, dist,
                hooks, stop, hooks.show)
    except KeyboardInterrupt:
        nproc = f" --nproc {dist.world}" if dist.world > 1 else ""
        raise Interrupted(f"interrupted at step {state.step}; checkpoint saved — continue with "
                          f"`lorakit train --resume --out {run}{nproc}`") from None
    return _finish(cfg, run, task, model, metrics, state, evaluate_split, dist, print_fn)


@dataclass
class RunHooks(Hooks):
    """What `lorakit train` does around the loop's steps: a metrics record every log_every steps (and a
    progress line when no bar shows); a checkpoint every checkpoint_every steps, at each epoch's end and on
    a stop, written only while every weight is finite; each epoch, the validation score, and the weights
    when it is the best so far. `saved_step`: the step of the checkpoint on disk."""

    cfg: RunConfig
    run: Path
    task: Prepared
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    metrics: Metrics
    evaluate_split: Callable[[str], dict[str, float]]
    dist: distributed.Dist
    print_fn: Callable[..., None]
    show: bool
    saved_step: int

    def after_step(self, state: RunState, epoch: int, loss: float, rate: float, rng: torch.Tensor, left: int) -> None:
        if state.step % self.cfg.train.log_every == 0:
            lr = self.scheduler.get_last_lr()[0]
            self.metrics.write(event="train", epoch=epoch + 1, step=state.step, loss=loss, lr=lr, examples_per_s=rate)
            if not self.show:
                eta = left / max(rate, 1e-9)
                self.print_fn(f"  epoch {epoch + 1} step {state.step:>5}  loss {loss:.4f}  lr {lr:.2e}  "
                              f"{rate:,.0f} examples/s  epoch eta {eta // 60:.0f}m{eta % 60:02.0f}s")
        if state.step % self.cfg.train.checkpoint_every == 0:
            self.checkpoint(state, rng)

    def after_epoch(self, state: RunState, epoch: int, seconds: float) -> None:
        key = self.task.metric
        val = self.evaluate_split("val")
        self.metrics.write(event="val", epoch=epoch + 1, step=state.step, **val)
        better = (lambda a, b: a > b) if self.task.higher_is_better else (lambda a, b: a < b)
        improved = math.isfinite(val[key]) and (state.best is None or better(val[key], state.best))
        processes = f"{self.dist.world} process" + ("es" if self.dist.world > 1 else "")
        self.print_fn(f"epoch {epoch + 1}: validation {key} {val[key]:.4f}" + ("  (best so far)" if improved else "")
                      + f"  [{seconds // 60:.0f}m{seconds % 60:04.1f}s training on {processes}]")
        if improved:
            state.best = val[key]
            weights = checkpoint.trainable_state(self.model)  # on every rank: under FSDP this gathers the shards
            bad = tensorfile.first_non_finite(weights)
            if bad is not None:
                raise self.diverged(state, f"weight {bad} became non-finite by step {state.step}")
            if self.dist.main:
                atomic.write_file(self.run / "best.safetensors", tensorfile.dumps(weights))
            self.dist.barrier()
        self.checkpoint(state, torch.get_rng_state())

    def checkpoint(self, state: RunState, rng: torch.Tensor) -> None:
        state.metrics_lines = self.metrics.count
        try:
            checkpoint.save(self.run, self.model, self.optimizer, self.scheduler, state.to_dict(),
                            self.dist.gather(rng), write=self.dist.main)
        except checkpoint.NonFiniteWeights as e:
            raise self.diverged(state, f"weight {e} became non-finite by step {state.step}") from None
        self.saved_step = state.step
        self.dist.barrier()

    def diverged(self, state: RunState, message: str) -> RunError:
        run, lower = self.run, f"{self.cfg.train.lr / 10:g}"
        return RunError(f"{message} (epoch {state.epoch + 1}); stopped — the last checkpoint, all of whose weights "
                        f"are finite, is from step {self.saved_step} in {run / checkpoint.NAME}; resume it with a "
                        f"lower learning rate: lorakit train --resume --out {run} --train.lr {lower}")


def _resume(cfg: RunConfig, run: Path, changes: dict, model: nn.Module, optimizer, scheduler, factor,
            dist: distributed.Dist, print_fn) -> tuple[Metrics, RunState]:
    """Restore the run's checkpoint (every rank its own RNG), cut metrics.jsonl back to it, tidy what killed
    writes left, and apply and record the settings that `changes` changes."""
    metrics = Metrics(run / "metrics.jsonl", write=dist.main)
    progress, rngs = checkpoint.load(run, model, optimizer, scheduler)
    if len(rngs) != dist.world:
        how = f"with --nproc {len(rngs)}" if len(rngs) > 1 else "in one process (no --nproc, no torchrun)"
        raise RunError(f"the run in {run} was trained on {len(rngs)} process{'es' if len(rngs) > 1 else ''}, "
                       f"this is {dist.world}; resume it {how}, as the data of each step depends on it")
    try:
        state = RunState.from_dict(progress)
        torch.set_rng_state(rngs[dist.rank])
    except (ValueError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint in {run / checkpoint.NAME} is damaged ({e})") from None
    dist.barrier()  # every rank has read metrics.jsonl before rank 0 cuts it
    if dist.main:
        atomic.tidy(run)  # what killed writes left beside the run folder and in it
        atomic.clean_folder(run)
        metrics.truncate(state.metrics_lines)
    if changes:
        _apply_resume_changes(cfg, changes.get("train.lr", (cfg.train.lr,))[0], optimizer, scheduler, factor)
        if dist.main:
            atomic.write_file(run / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            metrics.write(event="resume", step=state.step,
                          changed={k: {"from": old, "to": new} for k, (old, new) in changes.items()})
        print_fn("resuming with " + ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changes.items()))
    print_fn(f"resuming {run} at epoch {state.epoch + 1}, step {state.step}")
    return metrics, state


def _start(cfg: RunConfig, run: Path, overwrite: bool, task: Prepared, model: nn.Module, optimizer, scheduler,
           evaluate_split, dist: distributed.Dist, print_fn) -> tuple[Metrics, RunState]:
    """Begin a new run in a temporary folder beside `run` (rank 0 writes): the config, the test score
    before training and a first checkpoint; then put it at `run`, replacing an earlier run there (its other
    files are kept). A failure or a kill before that leaves `run` as it was."""
    home = atomic.stage(run) if dist.main else run
    try:
        if dist.main:
            (home / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        metrics = Metrics(home / "metrics.jsonl", write=dist.main)
        before = evaluate_split(task.held_out)
        metrics.write(event="test_before", **before)
        print_fn(f"{task.held_out} {task.metric} before training: {before[task.metric]:.4f}")
        _show_examples(task, model, "before training", print_fn)
        state = RunState(test_before=before, metrics_lines=metrics.count)
        checkpoint.save(home, model, optimizer, scheduler, state.to_dict(), dist.gather(torch.get_rng_state()),
                        write=dist.main)

        def free(target: Path) -> None:
            if not overwrite and any((target / f).exists() for f in RUN_FILES):
                raise RunError(f"{target} already holds a run; pass --overwrite to replace it or --resume to "
                               f"continue it")

        if dist.main:
            atomic.publish(home, run, check=free, replaced=lambda entry: entry in RUN_FILES)
    except BaseException:
        if dist.main:
            shutil.rmtree(home, ignore_errors=True)
        raise
    dist.barrier()
    metrics.path = run / "metrics.jsonl"
    return metrics, state


def _apply_resume_changes(cfg: RunConfig, old_lr: float, optimizer, scheduler, factor) -> None:
    """Give the restored optimizer and schedule the new learning rate (`old_lr`: the run's until now) and step
    budget: the rate at the current step is the new base rate times the (new) schedule's factor there; each
    group keeps its rate's ratio to the base rate (LoRA+'s B group, which may be the only one under LoRA-FA)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.train.lr * (group["initial_lr"] / old_lr)
        group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _finish(cfg: RunConfig, run: Path, task: Prepared, model: nn.Module, metrics: Metrics, state: RunState,
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
        load_weights(model, best_path, trainable_only=True)
    after = evaluate_split(task.held_out)
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
    before = state.test_before
    print_fn(f"{task.held_out} {key}: {before[key] if before[key] is None else f'{before[key]:.4f}'} before → "
             f"{after[key]:.4f} after")
    print_fn(f"run directory: {run} (config.json, metrics.jsonl, "
             f"{'adapter/' if cfg.lora.method == 'lora' else 'model.safetensors'}, curves.png)")
    return {"before": before, "after": after, "best_val": state.best, "steps": state.step, "run": str(run)}


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


def inspect(cfg: RunConfig, shapes: bool = False, html: str | Path | None = None) -> str:
    """The model's module tree marking what `cfg` would adapt (◆) and train in full (●), then the surgery
    report; with `shapes`, each module's traced input and output shapes; with `html`, the interactive graph
    of the adapted model written there. Nothing on disk but that page is changed."""
    from ..view import show, trace
    from ..view.text import tree_lines

    task = prepare(cfg)
    model, head = task.model, trained_in_full(cfg, task.arch)
    report = inject_from_config(cfg, task, dry_run=True)
    marks = {name: "●" for name in head} | {r.name: "◆" for r in report.replaced}
    notes = {r.name: f"  + {r.params:,} LoRA params" for r in report.replaced}
    example = task.example()
    traced = trace(model, example).module_shapes() if shapes else None
    lines = [f"{type(model).__name__} — ◆ LoRA target, ● trains in full (modules_to_save)"]
    lines += tree_lines(model, marks, notes, traced) + ["", str(report)]
    if html is not None:
        inject_from_config(cfg, task)
        lines.append(f"lorakit: wrote the graph of the adapted model to {show(model, example, html)}")
    return "\n".join(lines)


def inspect_run(run: str | Path, shapes: bool = False, html: str | Path | None = None) -> str:
    """A finished run's model as it is used: its tree with the LoRA layers (◆) and the modules trained in
    full (●), traced shapes and the graph page as `inspect` gives them."""
    from ..layers import LoraLayer, SavedModule
    from ..view import show, trace
    from ..view.text import tree_lines
    from .runs import load_run

    cfg, task = load_run(run)
    model = task.model
    marks, notes = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, (LoraLayer, SavedModule)):
            marks[name] = "◆" if isinstance(m, LoraLayer) else "●"
            notes[name] = f"  adapter {m.active!r}: {sum(p.numel() for p in m.adapters.parameters()):,} params"
    example = task.example()
    with task.autocast():  # as the run evaluates it: a bf16 run's frozen weights are stored in bf16
        traced = trace(model, example).module_shapes() if shapes else None
        page = show(model, example, html) if html is not None else None
    lines = [f"{type(model).__name__} — run {run}: ◆ LoRA layer, ● trains in full (modules_to_save)"]
    lines += tree_lines(model, marks, notes, traced) + ["", str(summary(model, print_fn=None))]
    if page is not None:
        lines.append(f"lorakit: wrote the graph of the run's model to {page}")
    return "\n".join(lines)

"""The one training loop: epochs of optimizer steps over a split, from where a `RunState` says the run is.

    state = RunState()
    fit(model, task.forward, task.splits["train"], optimizer, scheduler, params, state, cfg.train)

`lorakit train` (recipe.py), the experiments and every rank of a distributed run call it. What a caller
adds around the steps — logging, validation, checkpoints — are `Hooks`; a Ctrl-C or SIGTERM becomes a stop
at the end of a step (`stop_on_signals`), and the loop hands the hooks the RNG state at each step boundary,
from which a checkpoint resumes exactly.

A step takes grad_accum global batches of batch_size × ranks examples, drawn by `split.batches(…, epoch,
True)`; each rank trains on its slice (`Dist.shard`), the loss scaled so that the ranks' average gradient is
the whole batch's. Then gradients are clipped to max_grad_norm (if set), the optimizer and the schedule step
and the gradients are cleared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import TrainSection
from .distributed import Dist


@dataclass
class RunState:
    """Where a run is. epoch: the one in progress (0-based); batch: the next global batch of it; step:
    optimizer steps done; best: the best validation metric so far; test_before: the test metrics before
    training; metrics_lines: the records of metrics.jsonl that go with this state."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best: float | None = None
    test_before: dict[str, float | None] = field(default_factory=dict)
    metrics_lines: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> RunState:
        """A state read back from JSON; ValueError naming the first field that is missing or of a wrong type."""
        if not isinstance(data, dict):
            raise ValueError(f"a run state is a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value, hint = data.get(f.name), hints[f.name]
            if hint is int:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            elif typing.get_origin(hint) is dict:
                ok = isinstance(value, dict)
            else:  # float | None
                ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"progress.{f.name} = {value!r} is not a valid {f.type}")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


class Diverged(RuntimeError):
    """The loss of a step was not finite; the step was not taken."""


class Hooks:
    """What a caller does around the loop's steps; each default does nothing.

    after_step: after every optimizer step (rng: torch's RNG state at this step boundary);
    after_epoch: after the last step of an epoch, `state` already at the next (seconds: the epoch's training time);
    checkpoint: on a stop (Ctrl-C, a signal) before the loop raises KeyboardInterrupt;
    diverged: the exception to raise for a non-finite loss."""

    def after_step(self, state: RunState, epoch: int, loss: float, rate: float, rng: Tensor, left: int) -> None:
        pass

    def after_epoch(self, state: RunState, epoch: int, seconds: float) -> None:
        pass

    def checkpoint(self, state: RunState, rng: Tensor) -> None:
        pass

    def diverged(self, state: RunState, message: str) -> BaseException:
        return Diverged(message)


@dataclass
class StopFlag:
    """Set by a signal handler; the ranks agree to stop at the end of the step that sees it."""

    signal: int | None = None


@contextlib.contextmanager
def stop_on_signals(dist: Dist = Dist()) -> Iterator[StopFlag]:
    """SIGTERM (and, in a distributed run, Ctrl-C too) sets the flag instead of ending the process: one rank
    alone must not leave mid-step, the others would wait for it forever. A single process's Ctrl-C stays a
    KeyboardInterrupt, which the loop turns into a checkpoint."""
    flag = StopFlag()
    signals = [signal.SIGTERM] + ([signal.SIGINT] if dist.world > 1 else [])
    main = threading.current_thread() is threading.main_thread()

    def on_signal(signum, frame):
        flag.signal = signum

    previous = {s: signal.signal(s, on_signal) for s in signals} if main else {}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def fit(model: nn.Module, forward: Callable, split, optimizer: torch.optim.Optimizer, scheduler, params: list[Tensor],
        state: RunState, train: TrainSection, dist: Dist = Dist(), hooks: Hooks = Hooks(),
        stop: StopFlag | None = None, progress_bar: bool | None = None) -> RunState:
    """Train from `state` to train.epochs (or train.max_steps steps), updating `state` as it goes.

    model: what the training forward runs through (the model, its DDP wrapper, or the FSDP model).
    forward(model, batch) -> (mean loss, logits); split: `batches(batch_size, epoch, shuffle)` → index lists
    and `collate(index)` → a batch (see tasks.Split). scheduler: stepped after each optimizer step, or None.
    progress_bar: a tqdm bar on stderr (None: when stderr is a terminal)."""
    from tqdm.auto import tqdm

    accum = train.grad_accum
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    show = sys.stderr.isatty() if progress_bar is None else progress_bar
    rng = torch.get_rng_state()
    for epoch in range(state.epoch, train.epochs):
        if train.max_steps and state.step >= train.max_steps:
            break
        batches = split.batches(train.batch_size * dist.world, epoch, True)
        bar = tqdm(total=len(batches), initial=state.batch, desc=f"epoch {epoch + 1}/{train.epochs}",
                   disable=not show, unit="batch", dynamic_ncols=True)
        start, seen = time.perf_counter(), 0
        while state.batch < len(batches):
            group = batches[state.batch:state.batch + accum]
            try:
                loss_sum = 0.0
                for i, index in enumerate(group):
                    mine, weight = dist.shard(index)
                    # DDP averages gradients at the group's last backward only.
                    with model.no_sync() if ddp and i < len(group) - 1 else contextlib.nullcontext():
                        loss, _ = forward(model, split.collate(mine))
                        (loss * (weight / len(group))).backward()
                    loss_sum += loss.item() * weight / len(group) if weight else 0.0
                    seen += len(index)
                loss_sum, stopping = dist.sum([loss_sum / dist.world, float(stop is not None and stop.signal is not None)])
                if not math.isfinite(loss_sum):
                    raise hooks.diverged(state, f"loss became {loss_sum} at step {state.step + 1}")
                if train.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            except KeyboardInterrupt:
                optimizer.zero_grad(set_to_none=True)
                hooks.checkpoint(state, rng)
                bar.close()
                raise
            state.batch += len(group)
            state.step += 1
            rng = torch.get_rng_state()
            rate = seen / (time.perf_counter() - start)
            bar.update(len(group))
            bar.set_postfix(loss=f"{loss_sum:.4f}", ex_s=f"{rate:.0f}")
            hooks.after_step(state, epoch, loss_sum, rate, rng, (len(batches) - state.batch) * train.batch_size * dist.world)
            if stopping:
                hooks.checkpoint(state, rng)
                bar.close()
                raise KeyboardInterrupt
            if train.max_steps and state.step >= train.max_steps:
                break
        bar.close()
        state.epoch, state.batch = epoch + 1, 0
        hooks.after_epoch(state, epoch, time.perf_counter() - start)
        if train.max_steps and state.step >= train.max_steps:
            break
    return state

"""The serving engine: one frozen base, many adapters, one forward per step for every running sequence.

Iteration-level (continuous) batching. Each step of the engine's thread:
1. runs the model mutations and one-off jobs that were handed to it (`call`: an adapter placed or evicted, a
   classification batch) — nothing else touches the model;
2. prefills one chunk (at most `chunk` tokens) of the oldest waiting prompt, alone, with its own KV cache;
   when its prompt is done its first token is sampled and it joins the running batch;
3. decodes one token for every running sequence in one forward: the batch's KV caches are kept left-padded
   to a common length (an attention mask hides the padding, each row has its own positions), and each row
   uses its own adapter through `lorakit.mixed_batch` — a gathered matmul per layer, no loop over adapters.
A finished, stopped or cancelled sequence leaves the batch at the end of the step it finished in; a long
prompt is prefilled a chunk per step, so the streams already running never wait for more than one chunk.

Greedy decoding of a sequence gives the same tokens alone or in a batch with other adapters (up to float
rounding; exactly in float64, see the tests).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from .. import mixed
from ..adapters import holders
from .attention import use as use_attention
from .kv import KV


def _dense_input(module: nn.Module, args: tuple) -> tuple:
    """The output head's input as a fresh dense tensor. The head gets the last position of a prefill chunk, a
    strided slice; for a slice and a weight that needs no gradient (a frozen base), torch's matmul copies the
    weight rather than the slice — for a vocabulary-sized head 20× (one row) to 150× (eight) slower."""
    x = args[0]
    return (x.clone(memory_format=torch.contiguous_format), *args[1:]) if x.dim() > 2 else None


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0: greedy. top_p: nucleus sampling's mass. seed: a generator of the
    request's own (None: the engine's). stop: strings that end the output (not included in it). ignore_eos:
    go on past the end-of-text token to max_tokens (benchmarks, as vLLM's and TGI's option of that name)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(eq=False)
class Sequence:
    """One request in the engine. on_token(text) is called (on the engine's thread) with each new piece of
    text; on_finish(reason, usage) once, reason "stop", "length", "cancelled" or "error: …"."""

    prompt: list[int]
    adapter: str | None
    sampling: Sampling
    on_token: Callable[[str], None]
    on_finish: Callable[[str, dict], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    done: int = 0  # prompt tokens prefilled
    cache: KV | None = None  # its own KV cache while it prefills
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    reason: str | None = None  # why it ended: "stop" or "length"
    matched_stop: bool = False  # it stopped at one of sampling.stop (not at the end-of-text token)

    @property
    def position(self) -> int:
        """The position of the last token it holds (prompt and generated)."""
        return len(self.prompt) + len(self.generated) - 1


class QueueFull(Exception):
    """The engine holds as many waiting requests as it may; try again later."""


class Stopping(Exception):
    """The engine was stopped: it finishes what it has and takes nothing new."""


class Engine:
    """Runs `model` (a causal LM with any adapters loaded) on its own thread (thread=False: on the thread that
    calls `loop`). `submit` a Sequence; `call` a function to run on the engine's thread between steps.
    max_batch: sequences decoded together; max_queue: sequences waiting to start; chunk: prompt tokens
    prefilled per step."""

    def __init__(self, model: nn.Module, tokenizer, max_batch: int = 16, max_queue: int = 64, chunk: int = 128,
                 thread: bool = True) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.chunk = max_batch, max_queue, chunk
        self.device = next(model.parameters()).device
        self.config = getattr(model, "config", None)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.eos = {t for t in [getattr(tokenizer, "eos_token_id", None)] if t is not None}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv: KV | None = None  # the running batch's, left-padded to a common length
        self.mask: Tensor | None = None  # (B, L): 1 on real tokens
        self.jobs: deque[tuple[Callable, concurrent.futures.Future]] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.holders: list[nn.Module] | None = None  # the model's adapter holders, and their slots
        self.slots: mixed.Slots | None = None
        self.steps = 0
        self.generation = 0  # bumped before every batch of jobs (the only code that changes adapters)
        self.on_step: Callable[[Engine], None] | None = None  # after each step (metrics)
        self.restore_attention = use_attention(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head_hook = head.register_forward_pre_hook(_dense_input) if isinstance(head, nn.Module) else None
        self.threads = torch.get_num_threads()
        self.asides = 0  # CPU-heavy work in flight on other threads (`aside()`)
        self.deadline: float | None = None  # after stop: when the sequences still in flight are cancelled
        self.cut_short = False  # a stop's deadline cancelled sequences in flight
        self.thread = threading.Thread(target=self.loop, name="lorakit-engine", daemon=True) if thread else None
        if self.thread is not None:
            self.thread.start()

    # ------------------------------------------------------------ the outside

    def submit(self, seq: Sequence) -> None:
        with self.wake:
            if self.stopping:
                raise Stopping("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting to start")
            self.waiting.append(seq)
            self.wake.notify()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn() on the engine's thread before its next step; the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.wake:
            self.jobs.append((fn, future))
            self.wake.notify()
        return future

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Around CPU-heavy work on another thread (reading an adapter file): on a CPU the engine steps with one
        thread fewer meanwhile, so that the two do not contend for the same cores (which would stall every
        stream far longer than the step lost)."""
        with self.wake:
            self.asides += 1
        try:
            yield
        finally:
            with self.wake:
                self.asides -= 1

    def adapters_changed(self) -> None:
        """The set of adapters on the model changed (call from the engine's thread, in a `call`)."""
        self.holders = None

    def busy(self) -> int:
        return len(self.waiting) + len(self.running)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting; the sequences already submitted go on for up to timeout seconds, then are cancelled.
        Safe in a signal handler: it only sets flags."""
        self.deadline = time.monotonic() + timeout
        self.stopping = True

    def close(self, drain: bool = True, timeout: float = 30.0) -> bool:
        """`stop`, then wait for the sequences in flight (with drain; else cancel them) and put the model back
        as it was. True if everything finished in time."""
        with self.wake:
            self.stop(timeout if drain else 0.0)
            self.wake.notify()
        deadline = time.monotonic() + timeout + 5
        while self.busy() and time.monotonic() < deadline and (self.thread is None or self.thread.is_alive()):
            time.sleep(0.02)
        finished = not self.busy() and not self.cut_short
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.head_hook is not None:
            self.head_hook.remove()
            self.head_hook = None
        self.restore_attention()
        return finished

    # ------------------------------------------------------------ the thread

    def loop(self) -> None:
        """Run steps until the engine is closed and idle. On its own thread unless made with thread=False; then the
        caller runs it (`lorakit serve`: on the main thread, which loaded the model — on a CPU, torch's
        OpenMP workers answer that thread far faster than a thread started later: 1.5× the tokens/s)."""
        while True:
            with self.wake:
                while not (self.jobs or self.waiting or self.running or self.stopping):
                    self.wake.wait(timeout=0.5)
                jobs = list(self.jobs)
                self.jobs.clear()
                if self.stopping and not jobs and not self.busy():
                    torch.set_num_threads(self.threads)
                    return
            if jobs:  # any job may change an adapter in place
                self.generation += 1
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # the caller gets it; the engine keeps serving
                        future.set_exception(e)
            if self.deadline is not None and time.monotonic() > self.deadline and self.busy():
                self.cut_short = True
                for seq in list(self.waiting) + list(self.running):
                    seq.cancelled.set()
            if self.device.type == "cpu":
                threads = max(1, self.threads - 1) if self.asides else self.threads
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
            try:
                with torch.no_grad():
                    self._prefill()
                    self._decode()
            except Exception as e:  # a bug or an out-of-memory must not take every stream down silently
                for seq in list(self.running) + list(self.waiting):
                    self._finish(seq, f"error: {type(e).__name__}: {e}")
                self.running, self.kv, self.mask = [], None, None
                self.waiting.clear()
            self.steps += 1
            if self.on_step is not None:
                self.on_step(self)

    @contextlib.contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """Within the block, row i of the model's batch uses adapter names[i] (None: the base); on the
        engine's thread, as `lorakit.mixed_batch` with the model's adapter holders remembered."""
        if self.holders is None:
            self.holders = holders(self.model)
            self.slots = mixed.slots_of(self.model, self.holders)
        rows = mixed.Rows(names, self.slots, stamp=self.generation)
        for m in self.holders:
            m.rows = rows
        try:
            yield
        finally:
            for m in self.holders:
                m.rows = None

    def _forward(self, names: list[str | None], kv: KV | None, **inputs) -> tuple[Tensor, KV]:
        """The last position's logits for each row, and the KV cache grown by the inputs' positions."""
        cache = DynamicCache(config=self.config) if kv is None else kv.cache(self.config)
        with self.rows(names):
            out = self.model(**inputs, use_cache=True, **{self.cache_arg: cache})
        return out.logits[:, -1].float(), KV.of(getattr(out, "cache", None) or out.past_key_values)

    def _prefill(self) -> None:
        """One chunk of the oldest waiting prompt; when it is whole, its first token, and into the batch."""
        while self.waiting and self.waiting[0].cancelled.is_set():
            self._finish(self.waiting.popleft(), "cancelled")
        if not self.waiting or len(self.running) >= self.max_batch:
            return
        seq = self.waiting[0]
        chunk = seq.prompt[seq.done:seq.done + self.chunk]
        ids = torch.tensor([chunk], device=self.device)
        positions = torch.arange(seq.done, seq.done + len(chunk), device=self.device)[None]
        logits, seq.cache = self._forward([seq.adapter], seq.cache, input_ids=ids, position_ids=positions,
                                          logits_to_keep=1)
        seq.done += len(chunk)
        if seq.done < len(seq.prompt):
            return
        self.waiting.popleft()
        self._join(seq)
        self._accept(seq, self._sample(seq, logits[0]))
        if self._finished(seq):
            self._leave([seq])

    def _join(self, seq: Sequence) -> None:
        """Put a prefilled sequence's KV cache in the batch's, left-padding the shorter of the two."""
        own, seq.cache = seq.cache, None
        length = own.length
        if self.kv is None:
            self.kv = own.rows(torch.arange(1, device=self.device), 0)
            self.mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        else:
            width = max(self.kv.length, length)
            self.kv = self.kv.stack(own)
            old = torch.nn.functional.pad(self.mask, (width - self.mask.shape[1], 0))
            new = torch.nn.functional.pad(torch.ones(1, length, dtype=torch.long, device=self.device), (width - length, 0))
            self.mask = torch.cat([old, new])
        self.running.append(seq)

    def _decode(self) -> None:
        """One token for every running sequence, in one forward."""
        if not self.running:
            return
        cancelled = [s for s in self.running if s.cancelled.is_set()]
        if cancelled:
            self._leave(cancelled, "cancelled")
            if not self.running:
                return
        rows = self.running
        ids = torch.tensor([[s.generated[-1]] for s in rows], device=self.device)
        positions = torch.tensor([[s.position] for s in rows], device=self.device)
        mask = torch.cat([self.mask, torch.ones(len(rows), 1, dtype=self.mask.dtype, device=self.device)], 1)
        logits, self.kv = self._forward([s.adapter for s in rows], self.kv, input_ids=ids, position_ids=positions,
                                        attention_mask=mask)
        self.mask = mask
        done = []
        for i, seq in enumerate(rows):
            self._accept(seq, self._sample(seq, logits[i]))
            if self._finished(seq):
                done.append(seq)
        if done:
            self._leave(done)

    def _leave(self, seqs: list[Sequence], reason: str | None = None) -> None:
        """Take sequences out of the batch (their cache rows with them) and finish them."""
        keep = [i for i, s in enumerate(self.running) if s not in seqs]
        for seq in seqs:
            self._finish(seq, reason or seq.reason or "length")
        if not keep:
            self.running, self.kv, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.running = [self.running[i] for i in keep]
        mask = self.mask[index]
        start = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding in every row go
        self.mask = mask[:, start:]
        self.kv = self.kv.rows(index, start)

    def _sample(self, seq: Sequence, logits: Tensor) -> int:
        s = seq.sampling
        if s.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < s.top_p  # the smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        if seq.generator is None and s.seed is not None:
            seq.generator = torch.Generator(device=probs.device).manual_seed(s.seed)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _accept(self, seq: Sequence, token: int) -> None:
        """Add the token and hand on the text it completes, holding back what may be the start of a stop
        string (or of a character still incomplete) until it is known; set `seq.reason` when it ends."""
        if seq.first_token is None:
            seq.first_token = time.perf_counter()
        seq.generated.append(token)
        eos = token in self.eos and not seq.sampling.ignore_eos
        last = eos or len(seq.generated) >= seq.sampling.max_tokens
        if eos:
            seq.reason = "stop"
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        found = [i for i in (text.find(s) for s in seq.sampling.stop if s) if i >= 0]
        if found:
            text, seq.reason, seq.matched_stop, last = text[:min(found)], "stop", True, True
        partial = len(text) - len(text.rstrip("\ufffd"))  # bytes of a character not yet complete
        hold = 0 if last else max([len(s) - 1 for s in seq.sampling.stop if s] + [partial])
        ready = text[:len(text) - hold]
        if len(ready) > len(seq.text):
            seq.on_token(ready[len(seq.text):])
            seq.text = ready
        if last and seq.reason is None:
            seq.reason = "length"

    def _finished(self, seq: Sequence) -> bool:
        return seq.reason is not None

    def _finish(self, seq: Sequence, reason: str) -> None:
        usage = {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.generated),
                 "total_tokens": len(seq.prompt) + len(seq.generated)}
        try:
            seq.on_finish(reason, usage)
        except Exception:  # a callback's failure is the caller's; the engine goes on
            pass

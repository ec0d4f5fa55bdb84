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

from ..adapters import holders


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0: greedy. top_p: nucleus sampling's mass. seed: a generator of the
    request's own (None: the engine's). stop: strings that end the output (not included in it)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


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
    cache: object = None  # its own KV cache while it prefills
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


class Engine:
    """Runs `model` (a causal LM with any adapters loaded) on its own thread. `submit` a Sequence; `call` a
    function to run on the engine's thread between steps. max_batch: sequences decoded together; max_queue:
    sequences waiting to start; chunk: prompt tokens prefilled per step."""

    def __init__(self, model: nn.Module, tokenizer, max_batch: int = 16, max_queue: int = 64, chunk: int = 128) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.chunk = max_batch, max_queue, chunk
        self.device = next(model.parameters()).device
        self.config = getattr(model, "config", None)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.eos = {t for t in [getattr(tokenizer, "eos_token_id", None)] if t is not None}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv: list[tuple[Tensor, Tensor]] | None = None  # (B, heads, L, dim) per layer, left-padded
        self.mask: Tensor | None = None  # (B, L): 1 on real tokens
        self.jobs: deque[tuple[Callable, concurrent.futures.Future]] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.holders: list[nn.Module] | None = None
        self.steps = 0
        self.on_step: Callable[[Engine], None] | None = None  # after each step (metrics)
        self.thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ the outside

    def submit(self, seq: Sequence) -> None:
        with self.wake:
            if self.stopping:
                raise QueueFull("the server is shutting down")
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

    def adapters_changed(self) -> None:
        """The set of adapters on the model changed (call from the engine's thread, in a `call`)."""
        self.holders = None

    def busy(self) -> int:
        return len(self.waiting) + len(self.running)

    def close(self, drain: bool = True, timeout: float = 30.0) -> bool:
        """Stop accepting; with drain, let the sequences already submitted finish (up to timeout seconds),
        else cancel them. True if everything finished in time."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        deadline = time.monotonic() + timeout
        while drain and self.busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        finished = not self.busy()
        for seq in list(self.waiting) + list(self.running):
            seq.cancelled.set()
        with self.wake:
            self.wake.notify()
        return finished

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self.wake:
                while not (self.jobs or self.waiting or self.running):
                    self.wake.wait(timeout=0.5)
                jobs = list(self.jobs)
                self.jobs.clear()
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # the caller gets it; the engine keeps serving
                        future.set_exception(e)
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
        for m in self.holders:
            m.rows = names
        try:
            yield
        finally:
            for m in self.holders:
                m.rows = None

    def _forward(self, names: list[str | None], **inputs) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        with self.rows(names):
            out = self.model(**inputs, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        return out.logits[:, -1].float(), [(layer.keys, layer.values) for layer in cache.layers]

    def _cache(self, kv: list[tuple[Tensor, Tensor]] | None):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=kv, config=self.config) if kv else DynamicCache(config=self.config)

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
        logits, kv = self._forward([seq.adapter], input_ids=ids, position_ids=positions, logits_to_keep=1,
                                   **{self.cache_arg: self._cache(seq.cache)})
        seq.cache, seq.done = kv, seq.done + len(chunk)
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
        length = own[0][0].shape[2]
        if self.kv is None:
            self.kv = own
            self.mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        else:
            width = max(self.mask.shape[1], length)
            pad = lambda t, n: torch.nn.functional.pad(t, (0, 0, n, 0))  # noqa: E731  left, on the length axis
            self.kv = [(torch.cat([pad(k, width - k.shape[2]), pad(k2, width - length)]),
                        torch.cat([pad(v, width - v.shape[2]), pad(v2, width - length)]))
                       for (k, v), (k2, v2) in zip(self.kv, own)]
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
        logits, self.kv = self._forward([s.adapter for s in rows], input_ids=ids, position_ids=positions,
                                        attention_mask=mask, **{self.cache_arg: self._cache(self.kv)})
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
        self.kv = [(k[index, :, start:], v[index, :, start:]) for k, v in self.kv]

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
        last = token in self.eos or len(seq.generated) >= seq.sampling.max_tokens
        if token in self.eos:
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

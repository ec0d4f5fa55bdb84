"""The serving engine on a tiny random Llama in float64: a greedy request returns the same tokens alone or in
a batch with requests for other adapters; long prompts are prefilled in chunks while others decode; stop
strings, lengths and cancellation end a sequence; an adapter placed between steps serves the next request."""

import threading

import pytest
import torch

import lorakit
from lorakit.serve.engine import Engine, QueueFull, Sampling, Sequence, Stopping

from conftest import make_tiny_llama

VOCAB = 120


class Tokens:
    """A tokenizer for ids: token k is the text "<k>"."""

    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i == self.eos_token_id))


def adapted(n: int = 8) -> torch.nn.Module:
    """The tiny Llama in float64 with adapters a0..a{n-1} (random, different ranks and targets; every third one
    DoRA, with its magnitudes moved off ‖W0‖)."""
    model = make_tiny_llama().double()
    for i in range(n):
        targets = ["q_proj", "v_proj"] if i % 2 else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                        "down_proj"]
        lorakit.inject(model, targets, r=2 + i % 3, alpha=8, adapter=f"a{i}", dora=i % 3 == 0)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in [m for m in model.modules() if isinstance(m, lorakit.LoraLayer)]:
                if f"a{i}" in layer.adapters:
                    a = layer.adapters[f"a{i}"]
                    a.lora_b.copy_(torch.randn(a.lora_b.shape, generator=g, dtype=torch.float64) * 0.5)
                    if a.magnitude is not None:
                        a.magnitude.mul_(1 + 0.3 * torch.randn(a.magnitude.shape, generator=g, dtype=torch.float64))
    return model


def run(engine: Engine, prompt: list[int], adapter: str | None, sampling: Sampling, cancel_after: int | None = None):
    done = threading.Event()
    out = {"text": [], "reason": None}

    def on_token(text):
        out["text"].append(text)
        if cancel_after is not None and len(out["text"]) >= cancel_after:
            seq.cancelled.set()

    def on_finish(reason, usage):
        out.update(reason=reason, usage=usage)
        done.set()

    seq = Sequence(prompt, adapter, sampling, on_token, on_finish)
    engine.submit(seq)
    return seq, out, done


@pytest.fixture(scope="module")
def model():
    return adapted()


def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (int(n),), generator=g).tolist() for n in (5, 17, 9, 30, 3, 12, 21, 7, 14)]


def test_greedy_tokens_are_the_same_alone_and_in_a_mixed_batch(model):
    greedy = Sampling(max_tokens=12)
    names = [f"a{i}" for i in range(8)] + [None]
    engine = Engine(model, Tokens(), max_batch=16, chunk=8)
    try:
        alone = []
        for p, name in zip(prompts(), names):
            seq, out, done = run(engine, p, name, greedy)
            assert done.wait(60)
            alone.append(seq.generated)
        started = [run(engine, p, name, greedy) for p, name in zip(prompts(), names)]
        for seq, out, done in started:
            assert done.wait(60)
        together = [seq.generated for seq, _, _ in started]
    finally:
        engine.close()
    assert together == alone
    assert len({tuple(t) for t in together}) > 5  # the adapters make a difference
    assert all(len(t) == 12 for t in together)


def test_stop_strings_length_and_cancel_end_a_sequence(model):
    engine = Engine(model, Tokens(), max_batch=4)
    try:
        seq, out, done = run(engine, prompts()[0], "a1", Sampling(max_tokens=12))
        assert done.wait(60) and out["reason"] == "length"
        full = "".join(out["text"])
        third = full.split(">")[2] + ">"  # the third token's text
        seq, out, done = run(engine, prompts()[0], "a1", Sampling(max_tokens=12, stop=(third,)))
        assert done.wait(60) and out["reason"] == "stop" and "".join(out["text"]) == full[:full.index(third)]
        seq, out, done = run(engine, prompts()[1], None, Sampling(max_tokens=50), cancel_after=3)
        assert done.wait(60) and out["reason"] == "cancelled" and len(seq.generated) < 50
        assert out["usage"]["prompt_tokens"] == 17
    finally:
        engine.close()


def test_sampling_with_a_seed_repeats(model):
    engine = Engine(model, Tokens())
    try:
        outs = []
        for _ in range(2):
            seq, out, done = run(engine, prompts()[2], "a3", Sampling(max_tokens=10, temperature=0.9, top_p=0.8, seed=7))
            assert done.wait(60)
            outs.append(seq.generated)
    finally:
        engine.close()
    assert outs[0] == outs[1]


def test_a_full_queue_refuses_and_close_drains(model):
    engine = Engine(model, Tokens(), max_batch=1, max_queue=2)
    try:
        blocker = threading.Event()
        engine.call(blocker.wait)  # hold the engine between steps
        runs = [run(engine, prompts()[i], None, Sampling(max_tokens=4)) for i in range(2)]
        with pytest.raises(QueueFull):
            run(engine, prompts()[3], None, Sampling(max_tokens=4))
        blocker.set()
        assert engine.close(drain=True, timeout=60)
        assert all(done.is_set() and out["reason"] == "length" for _, out, done in runs)
        with pytest.raises(Stopping, match="shutting down"):
            run(engine, prompts()[3], None, Sampling(max_tokens=4))
    finally:
        engine.close()


def test_an_adapter_placed_between_steps_serves_the_next_request(model):
    import copy

    fresh = copy.deepcopy(model)
    lorakit.delete_adapter(fresh, "a0")
    engine = Engine(fresh, Tokens())
    try:
        seq, out, done = run(engine, prompts()[0], "a1", Sampling(max_tokens=6))
        assert done.wait(60)

        def place():
            lorakit.inject(fresh, ["q_proj"], r=2, adapter="late")
            engine.adapters_changed()

        engine.call(place).result(30)
        seq2, out2, done2 = run(engine, prompts()[0], "late", Sampling(max_tokens=6))
        assert done2.wait(60) and out2["reason"] == "length"
    finally:
        engine.close()


def test_concurrent_loads_never_hold_more_than_max_loaded(tmp_path):
    """Loads that reach the engine together each count the others: with room for two and both held, a third
    is refused (AdapterBusy), and the model never carries more adapters than max_loaded."""
    import asyncio
    import time

    from lorakit.serve.registry import AdapterBusy, Registry

    names = [f"a{i}" for i in range(3)]
    for i, name in enumerate(names):
        model = make_tiny_llama()
        lorakit.inject(model, ["q_proj", "v_proj"], r=2, alpha=4)
        lorakit.save_adapter(model, tmp_path / name, print_fn=lambda *a: None)
    engine = Engine(make_tiny_llama(), Tokens())
    registry = Registry(engine, max_loaded=2, adapter_dir=tmp_path)

    def attached() -> set[str]:
        return {n for m in engine.model.modules() if isinstance(m, lorakit.LoraLayer) for n in m.adapters}

    async def rounds():
        outcomes = []
        for _ in range(5):
            engine.call(lambda: time.sleep(0.3))  # the engine busy while the files are read: the loads queue up
            got = await asyncio.gather(*(registry.acquire(n) for n in names), return_exceptions=True)
            outcomes.append(got)
            assert len(registry.resident) <= 2 and len(attached()) <= 2
            for name, result in zip(names, got):
                if result is None:
                    registry.release(name)
        return outcomes

    try:
        outcomes = asyncio.run(rounds())
    finally:
        engine.close()
    for got in outcomes:  # two held at once leave no room for the third
        assert sum(r is None for r in got) == 2 and sum(isinstance(r, AdapterBusy) for r in got) == 1
    assert all(h.holds == 0 for h in registry.resident.values())

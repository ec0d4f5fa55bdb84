"""The `variants` study: its pieces (smoothing, the convergence measures, DoRA's norms over a base cast to bf16)
and its quick mode, run by the real CLI, with the report's tables checked."""

import json
import math
import re

import pytest
import torch
from conftest import randomize
from torch import nn

import lorakit
from lorakit import LoraAdapter, cli, dora
from lorakit.experiments.variants import NAMES, QUICK_LAYERS, RANK, earlier_runs, first_below, pace, smooth, window

PNG = b"\x89PNG\r\n\x1a\n"
# r=64 adapters on MiniLM's query and value (384×384) in 6 layers, plus the 384→2 classifier; DoRA adds a
# magnitude per output row.
SENTIMENT_PARAMS = 2 * 6 * RANK * (384 + 384) + 770
SENTIMENT_DORA = SENTIMENT_PARAMS + 2 * 6 * 384
# SmolLM2-135M: q_proj (576→576) and v_proj (576→192) in each layer; quick mode keeps its first layers.
CAUSAL_PARAMS = QUICK_LAYERS * RANK * ((576 + 576) + (576 + 192))
CAUSAL_DORA = CAUSAL_PARAMS + QUICK_LAYERS * (576 + 192)


def test_smooth_is_a_trailing_mean():
    assert smooth([4.0, 2.0, 3.0, 1.0], 2) == [4.0, 3.0, 2.5, 2.0]
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]
    assert window(250) == 25 and window(20) == 2 and window(4) == 1


def test_pace_measures_steps_to_loras_final_loss():
    assert first_below([3.0, 2.0, 1.0], 2.0) == 2 and first_below([3.0, 2.5], 2.0) is None
    lora = [1.0] * 5 + [0.5] * 5  # smoothed over 1 step: reaches its final 0.5 at step 6
    quick = [1.0, 1.0, 0.5, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]  # at 0.5 by step 3
    p = pace(quick, lora)
    assert (p.reach, p.lora_reach, p.speedup) == (3, 6, 2.0)
    assert (p.at25, p.at50, p.end) == (0.5, 0.4, 0.4)  # steps 3 and 5 of 10
    never = pace([1.0] * 10, lora)
    assert never.reach is None and never.speedup is None


def test_an_interrupted_study_keeps_the_runs_of_its_own_settings(tmp_path):
    partial = tmp_path / "runs.partial.jsonl"
    assert earlier_runs(partial, "abc") == {}
    run = {"task": "sentiment", "variant": "DoRA", "seed": 1, "after": 0.8}
    partial.write_text(json.dumps({"plan": "abc", **run}) + "\n" + json.dumps({"plan": "other", **run, "seed": 2})
                       + "\n" + '{"plan": "abc", "task": "sent')  # a line torn by a kill
    assert earlier_runs(partial, "abc") == {("sentiment", "DoRA", 1): run}


def test_dora_norms_follow_a_base_cast_to_bf16():
    """`lorakit train` in bf16 stores the frozen weights in bf16 after the surgery (`p.data = ...`, which keeps
    the tensor's version): DoRA's norms must then be those of the bf16 W0, as on a base loaded in bf16."""
    def layer(cast_first: bool) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32))
        if cast_first:
            model[0].weight.data = model[0].weight.data.to(torch.bfloat16)
        lorakit.inject(model, ["0"], lorakit.LoraConfig(r=4, dora=True))
        randomize(model)
        return model[0]

    cast_later, cast_first = layer(False), layer(True)
    a_later, a_first = (next(m for m in x.modules() if isinstance(m, LoraAdapter)) for x in (cast_later, cast_first))
    fp32 = dora.layer_norms(cast_later, a_later).clone()
    cast_later.base.weight.data = cast_later.base.weight.data.to(torch.bfloat16)
    assert torch.equal(cast_later.base.weight, cast_first.base.weight)
    after = dora.layer_norms(cast_later, a_later)
    assert torch.equal(after, dora.layer_norms(cast_first, a_first))
    assert not torch.equal(after, fp32)  # the cast changes the norms, so the test can fail


def table(report: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first table after `heading`, by first cell."""
    body = report.split(heading, 1)[1]
    lines = [ln for ln in body.split("\n\n", 3)[2].splitlines() if ln.startswith("|")][2:]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return {r[0]: r for r in rows}


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", cell)]


@pytest.fixture(scope="module")
def quick(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("experiments")
    assert cli.main(["experiment", "variants", "--quick", "--out", str(out)]) == 0
    return out / "variants"


def test_quick_report_has_every_variant_on_both_tasks(quick):
    report = (quick / "report.md").read_text()
    for png in ("loss", "variants"):
        assert (quick / f"{png}.png").read_bytes()[:8] == PNG and f"({png}.png)" in report
    assert "quick mode" in report and "## What the numbers say" in report

    sentiment = table(report, "## Sentiment: test accuracy")
    assert list(sentiment) == NAMES, report
    for name, (_, params, accuracy, _seeds, _diff, secs, saved, reloaded) in sentiment.items():
        assert int(params.replace(",", "")) == (SENTIMENT_DORA if name == "DoRA" else SENTIMENT_PARAMS), name
        acc = numbers(accuracy)[0]
        assert 0 <= acc <= 1 and float(secs) > 0
        # fp32: every reloaded adapter, PiSSA's and OLoRA's rank-2r conversion included, scores exactly the same
        assert reloaded.endswith("(same)") and numbers(reloaded)[0] == acc, (name, reloaded)
        assert saved.endswith(f"(r={2 * RANK if name in ('PiSSA', 'OLoRA') else RANK})"), (name, saved)
    size = {n: float(sentiment[n][6].split()[0]) for n in NAMES}
    assert 1.8 < size["PiSSA"] / size["LoRA"] < 2.2 and size["LoRA+"] == size["rsLoRA"] == size["LoRA"]

    causal = table(report, "## Causal LM: test perplexity")
    assert list(causal) == NAMES, report
    base = None
    for name, (_, params, ppl, secs, saved, reloaded, diff) in causal.items():
        assert int(params.replace(",", "")) == (CAUSAL_DORA if name == "DoRA" else CAUSAL_PARAMS), name
        before, after = numbers(ppl)
        # SmolLM2 cut to two layers is no language model (perplexity near 1e8), but training must lower it
        assert all(math.isfinite(x) and x > 1 for x in (before, after)) and after < before, (name, ppl)
        assert float(secs) > 0
        again = numbers(reloaded)[0]
        if name in ("PiSSA", "OLoRA"):  # the residual and W0 round differently in bf16; the rest is exact
            assert abs(again / after - 1) < 0.02 and abs(before / base - 1) < 0.02, (name, ppl, reloaded)
        else:
            assert reloaded.endswith("(same)") and abs(again - after) < 0.006, (name, reloaded)
            base = before if base is None else base
            assert before == base, (name, before, base)  # the same base model before training
        assert (diff == "—") == (name == "LoRA")

    pace_rows = [ln for ln in report.split("## Convergence", 1)[1].splitlines() if ln.startswith("| sentiment")
                 or ln.startswith("| causal-lm")]
    assert len(pace_rows) == 2 * len(NAMES)
    for claim in ("DoRA: +2–4 points", "LoRA+: up to 2× faster", "PiSSA: faster convergence",
                  "OLoRA: faster convergence", "**rsLoRA**", "**Reload.**"):
        assert claim in report, claim


def test_quick_runs_json_keeps_every_step(quick):
    saved = json.loads((quick / "runs.json").read_text())
    runs = saved["runs"]
    assert len(runs) == 2 * len(NAMES) and saved["quick"] is True
    for r in runs:
        assert r["steps"] == 4 and len(r["losses"]) == len(r["step_seconds"]) == r["steps"], r["variant"]
        assert all(math.isfinite(x) and x > 0 for x in r["losses"] + r["step_seconds"])
    causal = [r for r in runs if r["task"] == "causal-lm"]
    assert all(len(r["test_losses"]) == saved["tasks"]["causal-lm"]["sizes"]["test"] for r in causal)

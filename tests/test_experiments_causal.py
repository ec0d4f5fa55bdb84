import math
import re

import pytest

from lorakit import cli
from lorakit.experiments.causal_lm import PROMPTS, SETTINGS, step_seconds


def test_step_seconds_from_cumulative_rates():
    # 3 steps of batch 4 over 10 examples, taking 2 s, 1 s and 1 s: the rate is examples seen so far ÷ seconds
    records = [{"event": "test_before"}, {"event": "train", "step": 1, "examples_per_s": 4 / 2},
               {"event": "train", "step": 2, "examples_per_s": 8 / 3},
               {"event": "train", "step": 3, "examples_per_s": 10 / 4}, {"event": "val"}]
    assert step_seconds(records, 4, 10) == pytest.approx([2.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="log_every = 1"):
        step_seconds([records[1], records[3]], 4, 10)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("experiments")
    assert cli.main(["experiment", "causal-lm", "--quick", "--out", str(out)]) == 0
    return out / "causal-lm" / "report.md"


def test_quick_report_table_chart_and_continuations(quick_report):
    text = quick_report.read_text()
    assert (quick_report.parent / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(perplexity.png)" in text and "quick mode" in text

    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in [s.name for s in SETTINGS]:
            rows[cells[0]] = cells
    assert list(rows) == [s.name for s in SETTINGS]  # one row each, in order
    trainable = {}
    for name, (_, params, ppl, _lr, seconds, size) in rows.items():
        before, after = (float(x) for x in re.findall(r"\d+\.\d+", ppl))
        assert math.isfinite(before) and math.isfinite(after) and 1 < after < 1e4, (name, ppl)
        trainable[name] = int(params.split()[0].replace(",", ""))
        assert float(seconds.split()[0]) > 0 and float(size.split()[0]) > 0
    qv, al, full = (trainable[s.name] for s in SETTINGS)
    # r=8 on SmolLM2-135M: q_proj (576→576) and v_proj (576→192) in 30 layers; all-linear adds k, o, gate, up, down
    assert qv == 30 * 8 * ((576 + 576) + (576 + 192))
    assert qv < al < full and full > 100_000_000

    continuations = text.split("## Sample continuations", 1)[1]
    prompt = PROMPTS[0]
    blocks = re.findall(r"```text\n(.*?)\n```", continuations, flags=re.S)
    assert len(blocks) == 1 + len(SETTINGS)  # the base, then each setting
    assert all(b.startswith(prompt) and len(b) > len(prompt) for b in blocks)

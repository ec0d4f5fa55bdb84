"""The sentiment benchmark runs end to end (its --quick smoke test) and writes a table of finite numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sentiment_benchmark_quick(tmp_path):
    out = tmp_path / "r.md"
    out.write_text("# benchmarks\n\n## Another section\n\nkept as is\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.sentiment", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    text = out.read_text()
    assert "## Another section\n\nkept as is" in text
    assert text.count("## Sentiment: LoRA vs full fine-tuning vs PEFT + Trainer") == 1
    rows = [line for line in text.splitlines() if line.startswith(("| lorakit ", "| PEFT "))]
    assert len(rows) == 5, text
    assert "End to end" in text
    for row in rows:
        after = float(row.split("|")[3].split("→")[1].strip().strip("*"))
        assert math.isfinite(after) and 0 <= after <= 1, row

    raw = json.loads((tmp_path / "sentiment.json").read_text())
    assert raw["quick"] and raw["data"]["sizes"]["train"] == 256
    assert [r["method"] for r in raw["results"]] == ["lora", "lora-bf16", "full", "peft", "peft-bf16"]
    for r in raw["results"]:
        assert all(math.isfinite(r[k]) for k in ("test_before", "test_after", "seconds")), r
        assert r["trainable_params"] > 0 and r["file_bytes"] > 0
    lora, fast, full, peft, peft_fast = raw["results"]
    assert lora["trainable_params"] == fast["trainable_params"] == peft["trainable_params"] \
        == peft_fast["trainable_params"] < full["trainable_params"]

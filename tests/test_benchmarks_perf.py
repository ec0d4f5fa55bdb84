"""The speed and memory runner (`python -m benchmarks`) runs end to end on tiny models and writes its numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.common import replace_section  # noqa: E402
from benchmarks.perf import main  # noqa: E402
from benchmarks.report import TITLE  # noqa: E402

VARIANTS = {
    "minilm-train": {"floor", "lorakit dropout 0", "peft dropout 0", "lorakit dropout 0.1", "peft dropout 0.1", "full"},
    "smollm2-train": {"floor", "lorakit", "peft"},
    "minilm-infer": {"base", "lorakit unmerged", "lorakit merged", "peft unmerged", "peft merged"},
    "smollm2-mixed": {"lorakit single", "lorakit mixed", "peft single", "peft mixed"},
}


def test_perf_runner_quick(tmp_path):
    out = tmp_path / "r.md"
    out.write_text("# benchmarks\n\n## Another section\n\nkept as is\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    text = out.read_text()
    assert "## Another section\n\nkept as is" in text
    assert text.count(TITLE) == 1 and "**Quick smoke test**" in text

    raw = json.loads((tmp_path / "perf.json").read_text())
    assert raw["quick"] and raw["device"] == "cpu" and raw["dtype"] == "fp32"
    assert set(raw["cases"]) == set(VARIANTS)
    for name, case in raw["cases"].items():
        assert set(case["variants"]) == VARIANTS[name]
        for variant, v in case["variants"].items():
            assert len(v["ms"]) == case["steps"], (name, variant)
            assert all(math.isfinite(t) and t > 0 for t in [v["median_ms"], *v["ms"]]), (name, variant, v)
    # lorakit and PEFT were given the same adapter weights, so they must compute the same logits
    for name, case in raw["cases"].items():
        for check, diff in case["check_max_abs_logit_diff"].items():
            if "should differ" in check or "vs base" in check:
                assert diff > 0, (name, check)
            else:
                assert diff < 1e-4, (name, check, diff)

    assert len(raw["speed"]) == 8
    for row in raw["speed"]:
        for impl in ("lorakit", "peft"):
            ms, x = row["ms"][impl], row["x"][impl]
            if ms is None:  # full fine-tuning has no PEFT column
                assert impl == "peft" and row["what"].startswith("full fine-tuning"), row
                continue
            assert math.isfinite(ms) and ms > 0 and math.isfinite(x) and x > 0, row
        assert row["met"] in (True, False, None)

    probed = {(m["case"], m["variant"]) for m in raw["memory"]}
    assert probed == {(c, v) for c in ("minilm-train", "smollm2-train") for v in VARIANTS[c]}
    for m in raw["memory"]:
        assert m["peak_mb"] > 0 and m["built_mb"] > 0 and m["peak_mb"] >= m["built_mb"] - 1, m
    lorakit_rows = [m for m in raw["memory_rows"] if m["impl"] == "lorakit"]
    assert len(lorakit_rows) == 3 and all(m["met"] in (True, False) for m in lorakit_rows)


def test_replace_section_keeps_the_others(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# b\n\n## Sentiment\n\nold sentiment\n")
    replace_section(path, TITLE, f"{TITLE}\n\nfirst\n")
    replace_section(path, TITLE, f"{TITLE}\n\nsecond\n")
    text = path.read_text()
    assert text == f"# b\n\n## Sentiment\n\nold sentiment\n\n{TITLE}\n\nsecond\n"

    path.write_text(f"# b\n\n{TITLE}\n\nold\n\n## Sentiment\n\nkept\n")
    replace_section(path, TITLE, f"{TITLE}\n\nnew\n")
    assert path.read_text() == f"# b\n\n{TITLE}\n\nnew\n\n## Sentiment\n\nkept\n"


def test_unknown_case_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--cases", "minilm-trian"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown case 'minilm-trian'" in err and "minilm-train" in err

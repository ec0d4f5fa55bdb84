"""The serving benchmark runs end to end (--quick, a few scenarios) and writes its section and serve.json."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_serve_benchmark_quick(tmp_path):
    out = tmp_path / "r.md"
    out.write_text("# benchmarks\n\n## Another section\n\nkept as is\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--quick", "--scenarios", "b,d,f", "--out",
                           str(out), "--work", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert "## Another section\n\nkept as is" in text and text.count("## Serving:") == 1
    raw = json.loads((tmp_path / "serve.json").read_text())
    assert set(raw["results"]) == {"b", "d", "f"}
    for r in raw["results"].values():
        assert not r["errors"] and r["requests"] == 8 and math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
    assert raw["cold"]["load_ms_p50"] > 0 and len(raw["cold"]["loads_ms"]) == 5
    assert "| (b) ≥ 0.9× (d) tokens/s |" in text


@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'lorakit[ray]')")
def test_serve_benchmark_on_ray_quick(tmp_path):
    out = tmp_path / "r.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--ray", "--quick", "--requests", "4", "--out",
                           str(out), "--work", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    raw = json.loads((tmp_path / "serve-ray.json").read_text())
    assert set(raw["results"]) == {"single", "ray1", "ray2"}
    for r in raw["results"].values():
        assert not r["errors"] and r["requests"] == 4 and r["tokens_per_s"] > 0 and r["warm"]["tokens_per_s"] > 0
    assert len(raw["results"]["ray2"]["replica_peak_mb"]) == 2 and raw["results"]["ray2"]["replica_peak_mb"][0] > 0
    assert "## Serving on Ray: 1 vs 2 engine replicas" in out.read_text()

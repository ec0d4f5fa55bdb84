"""The speed and memory runner (`python -m benchmarks`) runs end to end on tiny models and writes its numbers."""

import copy
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

import torch  # noqa: E402

import lorakit  # noqa: E402
from benchmarks.cases import LLAMA_LINEAR, LORAPLUS_RATIO, Case, Lora, Variant  # noqa: E402
from benchmarks.common import replace_section  # noqa: E402
from benchmarks.models import build, copy_to_peft, grad_diff, load_base, make_batch, max_diff, out_of  # noqa: E402
from benchmarks.models import optimizer, randomize_adapters  # noqa: E402
from benchmarks.perf import main  # noqa: E402
from benchmarks.report import TITLE  # noqa: E402
from benchmarks.timing import train_step  # noqa: E402

DORA = {"floor", "lorakit LoRA", "peft LoRA", "lorakit DoRA", "peft DoRA"}
OPTIM = {"LoRA", "LoRA+", "LoRA-FA"}
VARIANTS = {
    "minilm-train": {"floor", "lorakit dropout 0", "peft dropout 0", "lorakit dropout 0.1", "peft dropout 0.1", "full"},
    "smollm2-train": {"floor", "lorakit", "peft"},
    "minilm-infer": {"base", "lorakit unmerged", "lorakit merged", "peft unmerged", "peft merged"},
    "smollm2-mixed": {"lorakit single", "lorakit mixed", "peft single", "peft mixed"},
    "minilm-dora": DORA,
    "smollm2-dora": DORA,
    "minilm-optim": OPTIM,
    "smollm2-optim": OPTIM,
}
TRAIN = [c for c in VARIANTS if c.endswith(("-train", "-dora", "-optim"))]


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
    # lorakit and PEFT were given the same adapter weights (DoRA's magnitudes too), so they must compute the
    # same logits and the same adapter gradients
    for name, case in raw["cases"].items():
        for check, diff in [*case["check_max_abs_logit_diff"].items(), *case.get("check_max_rel_grad_diff", {}).items()]:
            if "should differ" in check or "vs base" in check:
                assert diff > 0, (name, check)
            else:
                assert diff < 1e-4, (name, check, diff)
    for name in ("minilm-dora", "smollm2-dora"):
        for checks in ("check_max_abs_logit_diff", "check_max_rel_grad_diff"):
            assert set(raw["cases"][name][checks]) == {"lorakit LoRA vs peft LoRA", "lorakit DoRA vs peft DoRA"}
        trainable = raw["cases"][name]["trainable_params"]  # DoRA trains a magnitude per output on top of A, B
        assert trainable["lorakit DoRA"] == trainable["peft DoRA"] > trainable["lorakit LoRA"] == trainable["peft LoRA"]

    assert len(raw["speed"]) == 8
    for row in raw["speed"]:
        for impl in ("lorakit", "peft"):
            ms, x = row["ms"][impl], row["x"][impl]
            if ms is None:  # full fine-tuning has no PEFT column
                assert impl == "peft" and row["what"].startswith("full fine-tuning"), row
                continue
            assert math.isfinite(ms) and ms > 0 and math.isfinite(x) and x > 0, row
        assert row["met"] in (True, False, None)

    assert [r["case"] for r in raw["dora"]] == ["minilm-dora", "smollm2-dora"]
    for row in raw["dora"]:
        assert set(row["ms"]) == {"lorakit LoRA", "lorakit DoRA", "PEFT LoRA", "PEFT DoRA"}
        assert all(math.isfinite(v) and v > 0 for v in [row["floor_ms"], *row["ms"].values()]), row
        ratios = {r["ratio"]: r for r in row["ratios"]}
        assert set(ratios) == {"lorakit DoRA ÷ lorakit LoRA", "lorakit DoRA ÷ PEFT DoRA", "PEFT DoRA ÷ PEFT LoRA"}
        assert ratios["lorakit DoRA ÷ lorakit LoRA"]["met"] in (True, False)
        assert ratios["lorakit DoRA ÷ PEFT DoRA"]["met"] in (True, False)
    assert text.count("lorakit DoRA ÷ lorakit LoRA") == 1

    probed = {(m["case"], m["variant"]) for m in raw["memory"]}
    assert probed == {(c, v) for c in TRAIN for v in VARIANTS[c]}
    for m in raw["memory"]:
        assert m["peak_mb"] > 0 and m["built_mb"] > 0 and m["peak_mb"] >= m["built_mb"] - 1, m
        assert m["saved_mb"] > 0 and m["grads_mb"] >= 0, m
    lorakit_rows = [m for m in raw["memory_rows"] if m["impl"] == "lorakit" and m["goal"]]
    assert len(lorakit_rows) == 7 and all(m["met"] in (True, False) for m in lorakit_rows)

    # the optimizer cases count gradients and AdamW state exactly: LoRA+ only regroups the same parameters,
    # LoRA-FA drops A's gradients and state
    for name in ("minilm-optim", "smollm2-optim"):
        lora, plus, fa = (next(m for m in raw["memory"] if (m["case"], m["variant"]) == (name, v))
                          for v in ("LoRA", "LoRA+", "LoRA-FA"))
        assert plus["trainable_params"] == lora["trainable_params"] > fa["trainable_params"]
        assert plus["grads_mb"] == lora["grads_mb"] > fa["grads_mb"] > 0
        assert plus["optimizer_state_mb"] == lora["optimizer_state_mb"] > fa["optimizer_state_mb"]
        for m in (lora, plus, fa):  # AdamW: exp_avg and exp_avg_sq per trained parameter, plus step counts
            assert 2 * m["grads_mb"] <= m["optimizer_state_mb"] < 2 * m["grads_mb"] + 0.01, m
        assert text.count(f"{name}: LoRA-FA trains") == 1

    # measuring one case again keeps the others, marked with the run they come from
    assert main(["--quick", "--device", "cpu", "--cases", "minilm-infer", "--keep-others", "--memory-steps", "0",
                 "--out", str(out)]) == 0
    again = json.loads((tmp_path / "perf.json").read_text())
    assert list(again["cases"]) == list(raw["cases"]) and again["memory"] == raw["memory"]
    assert "kept_from" not in again["cases"]["minilm-infer"]
    assert all(c["kept_from"]["date"] == raw["environment"]["date"] for n, c in again["cases"].items()
               if n != "minilm-infer")
    assert len(again["speed"]) == 8 and [r["case"] for r in again["dora"]] == ["minilm-dora", "smollm2-dora"]
    text = out.read_text()
    assert text.count(TITLE) == 1 and "kept from an earlier run, not measured by this command: minilm-train" in text


def test_dora_variants_compute_the_same_function_with_copied_magnitudes():
    """The parity check the runner makes: lorakit DoRA and PEFT DoRA with the same A, B and moved m give the
    same logits and gradients, and m matters (PEFT without the copied magnitudes differs)."""
    base = load_base("tiny-llama", torch.float32, "cpu")
    setting = Lora(LLAMA_LINEAR, 4, 8, 0.0, dora=True)
    batch = make_batch(base, Case("dora", "train", "tiny-llama", 2, 8, (setting,), 1), "cpu", labels=True)
    lk = build(copy.deepcopy(base), Variant("lorakit", "lorakit", setting), None).eval()
    pf = build(copy.deepcopy(base), Variant("peft", "peft", setting), None).eval()
    randomize_adapters(lk)
    adapters = [m for m in lk.modules() if isinstance(m, lorakit.LoraAdapter)]
    assert len(adapters) == 2 * len(LLAMA_LINEAR) and all(a.magnitude is not None for a in adapters)
    with torch.no_grad():
        copy_to_peft(lk, pf)
        same = max_diff(out_of(lk, batch), out_of(pf, batch))
        for m in pf.modules():  # m back at ‖W0 + s·B·A‖: the output must move
            if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector:
                m.lora_magnitude_vector["default"].weight.mul_(1.5)
        moved = max_diff(out_of(lk, batch), out_of(pf, batch))
    assert same < 1e-5 and moved > 1e-3, (same, moved)
    copy_to_peft(lk, pf)
    assert grad_diff(lk, pf, batch) < 1e-4


def test_each_timed_step_takes_dora_norms_afresh():
    """A timed step marks A and B changed, as an optimizer step would, so lorakit's DoRA cannot reuse the norms
    of the step before (it keeps them until A or B change) and does the work of a real training step."""
    base = load_base("tiny-llama", torch.float32, "cpu")
    setting = Lora(LLAMA_LINEAR, 4, 8, 0.0, dora=True)
    model = build(base, Variant("lorakit", "lorakit", setting), None).train()
    step = train_step(model, make_batch(model, Case("dora", "train", "tiny-llama", 2, 8, (setting,), 1), "cpu",
                                        labels=True), "cpu")
    adapter = next(m for m in model.modules() if isinstance(m, lorakit.LoraAdapter))
    step(0)
    first = adapter.__dict__["_norms"]
    step(1)
    assert adapter.__dict__["_norms"] is not first
    empty = build(load_base("tiny-llama", torch.float32, "cpu"), Variant("floor", "floor"), None)
    assert train_step(empty, make_batch(empty, Case("f", "train", "tiny-llama", 2, 8, (), 1), "cpu", labels=True),
                      "cpu")(0) > 0  # nothing trains in this floor: nothing to mark


def test_lora_fa_freezes_a_and_loraplus_regroups_b():
    base = load_base("tiny-llama", torch.float32, "cpu")
    setting = Lora(LLAMA_LINEAR, 4, 8, 0.0)
    v = Variant("LoRA-FA", "lorakit", setting, "adamw", train_a=False)
    fa = build(copy.deepcopy(base), v, None)
    adapters = [m for m in fa.modules() if isinstance(m, lorakit.LoraAdapter)]
    assert adapters and all(not a.lora_a.requires_grad and a.lora_b.requires_grad for a in adapters)
    trained = {id(p) for g in optimizer(fa, v).param_groups for p in g["params"]}
    assert trained == {id(a.lora_b) for a in adapters}
    v = Variant("LoRA+", "lorakit", setting, "loraplus")
    plus = build(copy.deepcopy(base), v, None)
    groups = optimizer(plus, v).param_groups
    assert [g["lr"] / groups[0]["lr"] for g in groups] == [1, LORAPLUS_RATIO]
    assert optimizer(plus, Variant("lorakit", "lorakit", setting)) is None  # no optimizer: a step is fwd + bwd


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

"""Fault injection: real processes killed by SIGKILL in the middle of lorakit's writes.

A driver (faults_driver.py, in a fresh interpreter) forks a process per kill point, which dies just before
the chosen filesystem change — every change of an adapter save, random ones (3 seeds) of each phase of a
training run and of `--overwrite` — and then does what a user would do next. Here every folder left
behind is checked: an adapter directory loads as exactly the old or exactly the new adapter; a run is
complete, or resumes to exactly the result of an uninterrupted run, or (killed before it started) was
never there; an old run replaced by `--overwrite` is untouched until the new one has started; and the
next write to a place removes the temporaries a killed writer left there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import lorakit
from lorakit.files import read_adapter
from test_cli import records

HERE = Path(__file__).parent


def drive(scenario: str, work: Path, timeout: int = 600) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, str(HERE / "faults_driver.py"), scenario, str(work)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "report.json").read_text())


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and ("tmp-" in p.name or "old-" in p.name)]


def lora_tensors(path: Path) -> dict:
    spec = read_adapter(path)
    return {f"{n}.{k}": t for n, (a, b) in spec.lora.items() for k, t in (("a", a), ("b", b))} | \
        {f"{m}.{k}": t for m, state in spec.saved.items() for k, t in state.items()}


def same(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_save_adapter_killed_at_every_change_leaves_old_or_new(tmp_path):
    report = drive("adapter_overwrite", tmp_path)
    old, new = lora_tensors(tmp_path / "old"), lora_tensors(tmp_path / "new")
    assert report["count_code"] == 0 and not same(old, new)
    swapped = next(p["n"] for p in report["points"] if p["op"][0] == "exchanged")
    for point in report["points"]:
        assert point["status"] == -9, point
        got = lora_tensors(Path(point["dir"]))
        # Before the exchange of the two folders the old adapter is there, from then on the new one.
        assert same(got, old if point["n"] < swapped else new), point
    for d in report["timed"]:
        got = lora_tensors(Path(d))
        assert same(got, old) or same(got, new), d

    from faults_driver import two_adapters

    model = two_adapters()  # the next write to each place removes what the killed writer left
    dirty = [Path(p["dir"]) for p in report["points"] if temporaries(Path(p["dir"]).parent)]
    assert dirty, "no kill point left a temporary behind"
    for d in dirty + [Path(d) for d in report["timed"]]:
        lorakit.save_adapter(model, d, adapter="new", overwrite=True, print_fn=lambda *a: None)
        assert temporaries(d.parent) == [] and temporaries(d) == [] and same(lora_tensors(d), new)


def test_two_processes_saving_one_new_adapter_one_wins(tmp_path):
    """overwrite=False: the check that the folder is free and the write are one step, so of two processes
    saving to the same new folder at the same moment exactly one succeeds and the other is refused."""
    report = drive("adapter_race", tmp_path)
    from faults_driver import two_adapters

    model = two_adapters()
    for trial in report["trials"]:
        codes = trial["codes"]
        assert sorted(codes.values()) == [0, 3], trial
        winner = next(name for name, code in codes.items() if code == 0)
        lorakit.save_adapter(model, tmp_path / f"want-{winner}", adapter=winner, overwrite=True, print_fn=lambda *a: None)
        assert same(lora_tensors(Path(trial["dir"])), lora_tensors(tmp_path / f"want-{winner}")), trial


def test_training_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path):
    report = drive("training", tmp_path)
    assert report["count_code"] == 0 and all(report["phases"].values())
    ref = tmp_path / "ref" / "run"
    want_records, want_adapter = records(ref), load_file(ref / "adapter" / "adapter_model.safetensors")
    states = set()
    for kill in report["kills"]:
        run = Path(kill["run"])
        assert kill["status"] == -9 and kill["code"] == 0, kill
        states.add(kill["state"])
        assert records(run) == want_records, kill
        got = load_file(run / "adapter" / "adapter_model.safetensors")
        assert got.keys() == want_adapter.keys() and all(torch.equal(got[k], want_adapter[k]) for k in got), kill
        assert temporaries(run.parent) == [] and temporaries(run) == [], kill
    assert {"absent", "resumable"} <= states  # killed before the run started, and after


def test_overwrite_killed_keeps_the_old_run_until_the_new_one_has_started(tmp_path):
    report = drive("overwrite", tmp_path)
    ref = tmp_path / "ref" / "run"
    states = []
    for kill in report["kills"]:
        run = Path(kill["run"])
        assert kill["status"] == -9 and kill["code"] == 0, kill
        states.append(kill["state"])
        if kill["state"] == "old":  # untouched, file for file; written again, it is the new run
            assert kill["after_kill"] == report["old"], kill
        assert records(run) == records(ref), kill
        assert temporaries(run.parent) == [] and temporaries(run) == [], kill
    assert "old" in states and set(states) - {"old"}, states

"""The processes that test_faults.py kills, run from a fresh interpreter:

    python tests/faults_driver.py SCENARIO WORKDIR

Each scenario forks one child per kill point (killpoints.killed), which dies by SIGKILL just before the
chosen filesystem change, then does what a user would do next (load the adapter, resume the run, write
again), and writes WORKDIR/report.json. The test reads the report and checks every folder left behind.
"""

import hashlib
import io
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import killpoints  # noqa: E402

import lorakit  # noqa: E402
from lorakit import hub  # noqa: E402

def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def two_adapters() -> nn.Module:
    """The tiny model with adapters "old" and "new" on the same layers, each with its own random weights."""
    model = tiny_model()
    for i, name in enumerate(("old", "new")):
        lorakit.inject(model, ["0", "2"], r=4, adapter=name, modules_to_save=["4"])
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g))
    return model


def quiet(*args, **kwargs) -> None:
    pass


def adapter_overwrite(work: Path) -> dict:
    """Kill `save_adapter(overwrite=True)` of adapter "new" over "old" before each of its filesystem changes,
    then at random moments of a process that saves the two in turn without end."""
    model = two_adapters()
    lorakit.save_adapter(model, work / "old", adapter="old", print_fn=quiet)
    lorakit.save_adapter(model, work / "new", adapter="new", print_fn=quiet)

    def place(name: str) -> Path:
        d = work / name / "adapter"
        d.parent.mkdir()
        shutil.copytree(work / "old", d)
        return d

    def save(d: Path, adapter: str = "new"):
        return lambda: lorakit.save_adapter(model, d, adapter=adapter, overwrite=True, print_fn=quiet)

    code, ops = killpoints.changes(save(place("count")))
    report = {"count_code": code, "ops": ops, "points": [], "timed": []}
    for n in range(1, len(ops) + 1):
        d = place(f"point{n}")
        report["points"].append({"n": n, "op": ops[n - 1], "dir": str(d), "status": killpoints.killed(n, save(d))})

    def forever(d: Path):
        def loop():
            while True:
                save(d, "new")()
                save(d, "old")()
        return loop

    for seed in range(5):
        d = place(f"timed{seed}")
        pid = os.fork()
        if pid == 0:
            try:
                forever(d)()
            finally:
                os._exit(1)
        time.sleep(random.Random(seed).uniform(0.05, 0.8))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        report["timed"].append(str(d))
    return report


def adapter_race(work: Path) -> dict:
    """Two processes save adapters "old" and "new" at the same moment to one new folder with overwrite=False."""
    model = two_adapters()
    report = {"trials": []}
    for trial in range(4):
        d = work / f"race{trial}" / "adapter"
        r, w = os.pipe()
        pids = []
        for name in ("old", "new"):
            pid = os.fork()
            if pid == 0:
                os.read(r, 1)
                try:
                    lorakit.save_adapter(model, d, adapter=name, overwrite=False, print_fn=quiet)
                    os._exit(0)
                except FileExistsError:
                    os._exit(3)
                except BaseException:
                    os._exit(1)
            pids.append((name, pid))
        os.write(w, b"go")
        codes = {name: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for name, pid in pids}
        report["trials"].append({"dir": str(d), "codes": codes})
    return report


# ---------------------------------------------------------------- training runs


def write_inputs(work: Path) -> tuple[Path, Path]:
    """The reviews CSV and the tiny BERT of the test suite."""
    from conftest import save_tiny_bert, write_reviews

    return write_reviews(work / "reviews.csv"), save_tiny_bert(work / "tiny-bert", hub.minilm_dir())


def train_args(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data.path", str(data), "--data.text_column", "review", "--data.label_column", "verdict",
            "--model.path", str(model), "--model.max_length", "16", "--train.batch_size", "8",
            "--train.eval_batch_size", "32", "--train.epochs", "2", "--train.checkpoint_every", "2",
            "--train.log_every", "1", "--train.lr", "1e-2", "--lora.r", "4", "--out", str(out), *extra]


def cli(argv: list[str]):
    from lorakit.cli import main

    def go():
        sys.stdout = io.TextIOWrapper(io.FileIO(os.devnull, "w"))
        return main(argv)
    return go


def phases(ops: list, run: Path) -> dict[str, list[int]]:
    """Kill points (1-based) of a run's changes by what they write: the new run's start in its temporary
    folder and its move into place; checkpoints; everything after the last checkpoint (the final writes)."""
    last_checkpoint = max(i for i, (_, path) in enumerate(ops) if f"{os.sep}checkpoint" in path or ".checkpoint." in path)
    started = next(i for i, (op, path) in enumerate(ops) if op in ("rename", "exchanged") and path == str(run))
    return {"start": list(range(1, started + 2)),
            "checkpoints": [i + 1 for i, (_, path) in enumerate(ops)
                            if started < i <= last_checkpoint and "checkpoint" in path],
            "final": list(range(last_checkpoint + 2, len(ops) + 1)),
            "any": list(range(1, len(ops) + 1))}


def finish(run: Path, again: list[str]) -> dict:
    """What a user does after a kill: resume a run that is there and unfinished, or start again where none is."""
    from lorakit.train.runs import finished

    if not run.exists():
        return {"state": "absent", "code": killpoints.run(cli(again))}
    if finished(run):
        return {"state": "complete", "code": 0}
    return {"state": "resumable", "code": killpoints.run(cli(["train", "--resume", "--out", str(run)]))}


def training(work: Path) -> dict:
    """Kill `lorakit train` at random points (3 seeds) of each phase, then resume or start again."""
    data, model = write_inputs(work)
    args = lambda out: train_args(data, model, out)  # noqa: E731
    assert killpoints.run(cli(args(work / "ref" / "run"))) == 0
    code, ops = killpoints.changes(cli(args(work / "count" / "run")))
    points = phases(ops, work / "count" / "run")
    report = {"count_code": code, "ops": len(ops), "phases": {k: len(v) for k, v in points.items()}, "kills": []}
    for seed in range(3):
        rng = random.Random(seed)
        for phase, candidates in points.items():
            n = rng.choice(candidates)
            run = work / f"{phase}{seed}" / "run"
            run.parent.mkdir()
            status = killpoints.killed(n, cli(args(run)))
            report["kills"].append({"phase": phase, "n": n, "op": ops[n - 1], "status": status, "run": str(run),
                                    **finish(run, args(run))})
    return report


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def overwrite(work: Path) -> dict:
    """Kill `lorakit train --overwrite` of a new run (r=2) over a finished one (r=4) at random points of its
    start (up to the move into place) and after; then resume the new run, or write again over the old."""
    from lorakit.train.runs import finished

    data, model = write_inputs(work)
    old = work / "old" / "run"
    assert killpoints.run(cli(train_args(data, model, old))) == 0
    new = lambda out: train_args(data, model, out, "--lora.r", "2", "--overwrite")  # noqa: E731
    assert killpoints.run(cli(new(work / "ref" / "run"))) == 0

    def place(name: str) -> Path:
        run = work / name / "run"
        shutil.copytree(old, run)
        return run

    code, ops = killpoints.changes(cli(new(place("count"))))
    start = phases(ops, work / "count" / "run")["start"]
    report = {"count_code": code, "old": snapshot(old), "kills": []}
    rng = random.Random(0)
    for n in sorted(set(rng.sample(start, min(5, len(start))) + start[-3:] + [len(ops)])):
        run = place(f"kill{n}")
        status = killpoints.killed(n, cli(new(run)))
        after = snapshot(run)
        r = json.loads((run / "config.json").read_text())["lora"]["r"]
        if r == 2:
            follow = {"state": "complete", "code": 0} if finished(run) else \
                {"state": "resumable", "code": killpoints.run(cli(["train", "--resume", "--out", str(run)]))}
        else:
            follow = {"state": "old", "code": killpoints.run(cli(new(run)))}
        report["kills"].append({"n": n, "op": ops[n - 1], "status": status, "run": str(run), "after_kill": after,
                                **follow})
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)  # no thread pool before the forks
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    result = globals()[scenario](workdir)
    (workdir / "report.json").write_text(json.dumps(result, indent=1))

"""A user's own splits and files: train on train.csv with val.csv / test.csv, score a run on any file, label
the texts of a CSV / JSONL file and write the labels out; and bad files give the CLI's one-line errors."""

import csv
import json
from pathlib import Path

import pytest

from lorakit import cli
from lorakit.train.config import build_config
from lorakit.train.tasks import prepare
from test_cli import WORDS, run_cli, tiny_args

LABELS = list(WORDS)


def write_csv(path: Path, rows: range, text_column: str = "review", label_column: str = "verdict") -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([text_column, label_column])
        for i in rows:
            w.writerow([f"{WORDS[LABELS[i % 3]]} (review {i})", LABELS[i % 3]])
    return path


@pytest.fixture
def files(tmp_path):
    return (write_csv(tmp_path / "train.csv", range(0, 60)), write_csv(tmp_path / "val.csv", range(60, 75)),
            write_csv(tmp_path / "test.csv", range(75, 96)))


def classify_cfg(train, *extra):
    return build_config({}, ["--data.path", str(train), "--data.text_column", "review", "--data.label_column",
                             "verdict", "--model.max_length", "16", *extra])


def test_val_and_test_files_are_the_validation_and_test_sets(files, tiny_bert):
    train, val, test = files
    task = prepare(classify_cfg(train, "--data.val_path", str(val), "--data.test_path", str(test),
                                "--model.path", str(tiny_bert)), with_model=False)
    assert {k: s.size for k, s in task.splits.items()} == {"train": 60, "val": 15, "test": 21}
    assert task.texts["val"][0] == f"{WORDS['good']} (review 60)" and task.held_out == "test"


def test_val_file_alone_leaves_no_test_set_and_test_file_alone_cuts_val_from_the_data(files, tiny_bert):
    train, val, test = files
    task = prepare(classify_cfg(train, "--data.val_path", str(val), "--model.path", str(tiny_bert)), with_model=False)
    assert set(task.splits) == {"train", "val"} and task.splits["train"].size == 60 and task.held_out == "val"
    task = prepare(classify_cfg(train, "--data.test_path", str(test), "--model.path", str(tiny_bert)), with_model=False)
    sizes = {k: s.size for k, s in task.splits.items()}
    assert sizes["test"] == 21 and sizes["train"] + sizes["val"] == 60 and sizes["val"] > 0


def test_causal_lm_val_and_test_files(tmp_path, tiny_bert):
    text = " ".join(f"word{i}" for i in range(400))
    for name in ("train", "val", "test"):
        (tmp_path / f"{name}.txt").write_text(text)
    cfg = build_config({}, ["--task", "causal-lm", "--model.path", str(tiny_bert), "--data.block_size", "16",
                            "--data.path", str(tmp_path / "train.txt"), "--data.val_path", str(tmp_path / "val.txt"),
                            "--data.test_path", str(tmp_path / "test.txt")])
    task = prepare(cfg, with_model=False)
    assert task.splits["train"].size == task.splits["val"].size == task.splits["test"].size > 0
    cfg = build_config({}, ["--task", "causal-lm", "--model.path", str(tiny_bert), "--data.block_size", "16",
                            "--data.path", str(tmp_path / "train.txt"), "--data.val_path", str(tmp_path / "val.txt")])
    assert set(prepare(cfg, with_model=False).splits) == {"train", "val"}


def test_a_run_on_own_splits_trains_scores_and_predicts(files, tiny_bert, tmp_path, capsys):
    train, val, test = files
    run = tmp_path / "run"
    code, out, err = run_cli(tiny_args(train, run, "--model.path", str(tiny_bert), "--data.val_path", str(val)), capsys)
    assert code == 0, err
    assert "val accuracy before training" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "test_after"

    code, out, err = run_cli(["eval", str(run), "--data.path", str(test)], capsys)
    assert code == 0, err
    scored = json.loads(out)
    assert scored["split"] == str(test) and 0 <= scored["accuracy"] <= 1
    code, _, err = run_cli(["eval", str(run)], capsys)
    assert code == 2 and "has no test split" in err and "--split val" in err

    other = write_csv(tmp_path / "other.csv", range(96, 108), "body", "stars")
    code, out, _ = run_cli(["eval", str(run), "--data.path", str(other), "--data.text_column", "body",
                            "--data.label_column", "stars"], capsys)
    assert code == 0 and json.loads(out)["loss"] > 0

    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"review": t}) + "\n" for t in ("a wonderful moving film", "a dull mess")))
    code, out, err = run_cli(["predict", str(run), "--file", str(jsonl), "--output", str(tmp_path / "labels.csv")], capsys)
    assert code == 0, err
    with (tmp_path / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == ["a wonderful moving film", "a dull mess"]
    assert all(r["label"] in LABELS and abs(sum(float(r[f"p_{n}"]) for n in LABELS) - 1) < 1e-4 for r in rows)

    code, _, err = run_cli(["predict", str(run), "--file", str(test), "--output", str(tmp_path / "labels.jsonl")], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert len(lines) == 21 and set(lines[0]["probabilities"]) == set(LABELS)


@pytest.mark.parametrize("case, message", [
    ("val label unknown", "label 'great' is not one of the training labels"),
    ("val file missing", "data file not found"),
    ("val not UTF-8", "not UTF-8"),
    ("output extension", "--output"),
])
def test_bad_own_files_are_one_line(files, tiny_bert, tmp_path, capsys, case, message):
    train, val, test = files
    out = tmp_path / "run"
    if case == "val label unknown":
        val.write_text("review,verdict\nsuperb,great\n")
        argv = tiny_args(train, out, "--model.path", str(tiny_bert), "--data.val_path", str(val))
    elif case == "val file missing":
        argv = tiny_args(train, out, "--model.path", str(tiny_bert), "--data.val_path", str(tmp_path / "nope.csv"))
    elif case == "val not UTF-8":
        val.write_bytes(b"review,verdict\ncaf\xe9,good\n")
        argv = tiny_args(train, out, "--model.path", str(tiny_bert), "--data.val_path", str(val))
    else:
        assert run_cli(tiny_args(train, out, "--model.path", str(tiny_bert), "--train.epochs", "1"), capsys)[0] == 0
        argv = ["predict", str(out), "a text", "--output", str(tmp_path / "labels.xlsx")]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bf16_auto_resolves_and_is_recorded(reviews, tiny_bert, tmp_path, capsys):
    from lorakit.train.tasks import native_bf16
    import torch

    run = tmp_path / "run"
    assert cli.main(tiny_args(reviews, run, "--model.path", str(tiny_bert), "--train.epochs", "1")) == 0
    recorded = json.loads((run / "config.json").read_text())["train"]["bf16"]
    assert recorded is native_bf16(torch.device("cpu"))

"""Every kind of file lorakit reads, malformed in the ways a user or a crash produces them.

Command-line cases: exit code 2, one line on stderr naming the problem, no traceback, and nothing created or
changed in the folder the case works in (hashed before and after). Adapter cases (the library): an
AdapterFileError with a one-line message, the folder and the model unchanged.
"""

import copy
import gzip
import hashlib
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import AdapterFileError, cli
from test_cli import break_training_forward

TRAIN = ["--data.text_column", "review", "--data.label_column", "verdict", "--model.max_length", "16",
         "--train.batch_size", "16", "--train.eval_batch_size", "32", "--train.epochs", "1", "--lora.r", "2"]


@dataclass
class Inputs:
    reviews: Path
    model: Path  # the tiny BERT
    finished: Path  # a finished run
    interrupted: Path  # a run stopped after its first checkpoints
    other: Path  # a finished run of another rank


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def inputs(reviews, tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")

    def train(out: Path, *extra: str) -> Path:
        assert cli.main(["train", "--data.path", str(reviews), "--model.path", str(tiny_bert), *TRAIN,
                         "--train.checkpoint_every", "2", "--out", str(out), *extra]) == 0
        return out

    with pytest.MonkeyPatch.context() as m:
        break_training_forward(m, 4, KeyboardInterrupt())
        assert cli.main(["train", "--data.path", str(reviews), "--model.path", str(tiny_bert), *TRAIN,
                         "--train.checkpoint_every", "2", "--out", str(root / "interrupted")]) == 130
    return Inputs(reviews, tiny_bert, train(root / "finished"), root / "interrupted",
                  train(root / "other", "--lora.r", "4"))


def train_args(ws: Path, i: Inputs, *extra: str, data: Path | None = None) -> list[str]:
    return ["train", "--data.path", str(data or i.reviews), "--model.path", str(i.model), *TRAIN,
            "--out", str(ws / "out"), *extra]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def recipe(ws: Path, i: Inputs, name: str, content: str | bytes) -> list[str]:
    return ["train", str(write(ws / name, content)), "--data.path", str(i.reviews), "--model.path", str(i.model),
            *TRAIN, "--out", str(ws / "out")]


def data(ws: Path, i: Inputs, name: str, content: str | bytes, *extra: str) -> list[str]:
    return train_args(ws, i, *extra, data=write(ws / name, content))


def causal(ws: Path, i: Inputs, content: str | bytes) -> list[str]:
    return ["train", "--task", "causal-lm", "--model.path", str(i.model), "--data.block_size", "16",
            "--data.path", str(write(ws / "text.txt", content)), "--out", str(ws / "out")]


def model_dir(ws: Path, i: Inputs, change) -> list[str]:
    model = ws / "model"
    shutil.copytree(i.model, model)
    change(model)
    return ["train", "--data.path", str(i.reviews), *TRAIN, "--model.path", str(model), "--out", str(ws / "out")]


def run_copy(ws: Path, source: Path, change=None) -> Path:
    run = ws / "run"
    shutil.copytree(source, run)
    if change is not None:
        change(run)
    return run


def idx(magic: int, shape: tuple[int, ...], payload: int) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(s.to_bytes(4, "big") for s in shape) + bytes(payload)


def images(ws: Path, files: dict[str, bytes]) -> list[str]:
    for name, content in files.items():
        write(ws / "images" / name, content)
    return ["train", "--task", "image", "--data.path", str(ws / "images"), "--out", str(ws / "out")]


class Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def head_of_two(model: Path) -> None:
    from transformers import BertForSequenceClassification

    BertForSequenceClassification.from_pretrained(model, num_labels=2).save_pretrained(model)


def cut(path: Path, n: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:-n])


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def tampered(path: Path) -> None:
    """Valid safetensors with other values: what a bit flip in a tensor, or an edit, gives."""
    tensors = load_file(path)
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, path)


def bump_r(c: dict) -> None:
    c["lora"]["r"] = 8


def break_lr_type(c: dict) -> None:
    c["train"]["lr"] = "fast"


CLI_CASES = {
    # recipes
    "recipe not UTF-8": (lambda ws, i: recipe(ws, i, "r.toml", b"[lora]\nr = 4 # \xff\xfe\n"), "not UTF-8"),
    "recipe bad TOML": (lambda ws, i: recipe(ws, i, "r.toml", "[lora\nr = 4\n"), "is not valid TOML"),
    "recipe bad YAML": (lambda ws, i: recipe(ws, i, "r.yaml", "lora: [r: 4\n"), "is not valid YAML"),
    "recipe YAML list": (lambda ws, i: recipe(ws, i, "r.yaml", "- lora\n- train\n"), "must hold a mapping"),
    "recipe section not a table": (lambda ws, i: recipe(ws, i, "r.toml", "lora = 3\n"), "lora is not a section"),
    "recipe top-level value": (lambda ws, i: recipe(ws, i, "r.toml", "task = 5\n"), "task must be one of"),
    "recipe unknown key": (lambda ws, i: recipe(ws, i, "r.toml", "[lora]\nrank = 4\n"), "unknown key lora.rank"),
    "recipe wrong type": (lambda ws, i: recipe(ws, i, "r.toml", '[lora]\ndropout = "high"\n'),
                          "lora.dropout must be a number, got 'high'"),
    "recipe TOML inf": (lambda ws, i: recipe(ws, i, "r.toml", "[train]\nlr = inf\n"), "train.lr must be a finite number > 0"),
    "recipe YAML nan": (lambda ws, i: recipe(ws, i, "r.yaml", "lora:\n  alpha: .nan\n"), "lora.alpha must be a finite number"),
    "recipe YAML number key": (lambda ws, i: recipe(ws, i, "r.yaml", "1: x\n"), "unknown key 1"),
    "recipe targets not a list": (lambda ws, i: recipe(ws, i, "r.toml", "[lora]\ntargets = 5\n"), "lora.targets"),
    "recipe is a folder": (lambda ws, i: ["train", str((ws / "r.toml").mkdir() or ws / "r.toml")], "is a folder"),
    "recipe extension": (lambda ws, i: recipe(ws, i, "r.json", "{}"), "must end in .toml, .yaml or .yml"),
    # classification data
    "csv not UTF-8": (lambda ws, i: data(ws, i, "d.csv", b"review,verdict\ncaf\xe9,good\nbad,bad\n"), "not UTF-8"),
    "csv no label column": (lambda ws, i: data(ws, i, "d.csv", "review,stars\nfine,1\n"), "no label column 'verdict'"),
    "csv header only": (lambda ws, i: data(ws, i, "d.csv", "review,verdict\n"), "no rows"),
    "csv one class": (lambda ws, i: data(ws, i, "d.csv", "review,verdict\n" + "nice,good\n" * 20), "has one class"),
    "csv field too large": (lambda ws, i: data(ws, i, "d.csv", 'review,verdict\n"' + "x" * 200_000 + '",good\n'),
                            "field larger than field limit"),
    "jsonl broken line": (lambda ws, i: data(ws, i, "d.jsonl", '{"review": "a", "verdict": "x"}\n{"review": \n'),
                          "line 2 is not valid JSON"),
    "jsonl array line": (lambda ws, i: data(ws, i, "d.jsonl", '["a", "x"]\n'), "is a JSON list, expected an object"),
    "jsonl text not a string": (lambda ws, i: data(ws, i, "d.jsonl", '{"review": 5, "verdict": "x"}\n'),
                                "must hold a string"),
    "jsonl label a float": (lambda ws, i: data(ws, i, "d.jsonl", '{"review": "a", "verdict": 1.5}\n'),
                            "must hold a string or an integer"),
    "gzip corrupt": (lambda ws, i: data(ws, i, "d.csv.gz", b"\x1f\x8b\x08\x00garbage"), "cannot read"),
    "data is a folder": (lambda ws, i: train_args(ws, i, data=(ws / "d.csv").mkdir() or ws / "d.csv"), "is a folder"),
    "data extension": (lambda ws, i: data(ws, i, "d.xlsx", "x"), "unsupported data file"),
    # language-model text
    "text not UTF-8": (lambda ws, i: causal(ws, i, b"To be, or not \xff to be"), "not UTF-8"),
    "text empty": (lambda ws, i: causal(ws, i, "  \n"), "is empty"),
    "text shorter than a block": (lambda ws, i: causal(ws, i, "To be."), "text.txt: 5 tokens are fewer than one block of 16"),
    # images
    "idx bad magic": (lambda ws, i: images(ws, {"train-images-idx3-ubyte": idx(0x999, (1, 28, 28), 784)}),
                      "bad IDX magic number"),
    "idx truncated": (lambda ws, i: images(ws, {"train-images-idx3-ubyte": idx(0x803, (10, 28, 28), 784)}),
                      "IDX header says shape (10, 28, 28)"),
    "cifar pickle with code": (lambda ws, i: images(ws, {"batches.meta": pickle.dumps(Evil())}) + [
        "--data.dataset", "cifar10"], "refusing to unpickle"),
    # model directories
    "model config not JSON": (lambda ws, i: model_dir(ws, i, lambda m: write(m / "config.json", "{oops")),
                              "config.json is not valid JSON"),
    "model config no model_type": (lambda ws, i: model_dir(ws, i, lambda m: write(m / "config.json", "{}")),
                                   "not a model config"),
    "model config wrong types": (lambda ws, i: model_dir(ws, i, lambda m: edit_json(
        m / "config.json", lambda c: c.update(hidden_size="wide"))), "cannot load its"),
    "model only a pickle": (lambda ws, i: model_dir(ws, i, lambda m: (
        (m / "model.safetensors").unlink(), torch.save({}, m / "pytorch_model.bin"))), "only pickled weights"),
    "model weights truncated": (lambda ws, i: model_dir(ws, i, lambda m: cut(m / "model.safetensors")),
                                "is truncated or corrupt"),
    "model head with fewer labels": (lambda ws, i: model_dir(ws, i, head_of_two),
                                     "2-label classification head but the data has 3 labels"),
    "model no tokenizer": (lambda ws, i: model_dir(ws, i, lambda m: [p.unlink() for p in m.glob("tok*")]),
                           "cannot load its tokenizer"),
    "model is a file": (lambda ws, i: ["train", "--model.path", str(write(ws / "m.bin", "x")), "--out", str(ws / "out")],
                        "is a file, not a model directory"),
    "max_length beyond positions": (lambda ws, i: train_args(ws, i, "--model.max_length", "100"),
                                    "model.max_length = 100 exceeds the 64 positions"),
    "out is a file": (lambda ws, i: train_args(ws, i) and ["train", "--data.path", str(i.reviews), "--model.path",
                                                           str(i.model), "--out", str(write(ws / "out", "x"))],
                      "is a file; give a folder"),
    "out holds other folders": (lambda ws, i: (ws / "out" / "photos").mkdir(parents=True) or train_args(ws, i),
                                "ws/out holds photos, which is not part of what is written there"),
    # run folders
    "run config not JSON": (lambda ws, i: ["eval", str(run_copy(ws, i.finished, lambda r: write(r / "config.json", "{")))],
                            "is not valid JSON"),
    "run config a list": (lambda ws, i: ["eval", str(run_copy(ws, i.finished, lambda r: write(r / "config.json", "[]")))],
                          "must hold a JSON object"),
    "run config wrong type": (lambda ws, i: ["eval", str(run_copy(ws, i.finished, lambda r: edit_json(
        r / "config.json", break_lr_type)))], "train.lr must be a number, got 'fast'"),
    "run folder without config": (lambda ws, i: ["eval", str((ws / "empty").mkdir() or ws / "empty")],
                                  "is not a run directory"),
    "run without adapter": (lambda ws, i: ["eval", str(run_copy(ws, i.interrupted))], "the run has not finished"),
    "run adapter config wrong types": (lambda ws, i: ["eval", str(run_copy(ws, i.finished, lambda r: edit_json(
        r / "adapter" / "adapter_config.json", lambda c: c["layers"].update({k: {"r": "2", "alpha": 2}
                                                                                for k in c["layers"]}))))],
                                       "is malformed"),
    "run adapter truncated": (lambda ws, i: ["eval", str(run_copy(ws, i.finished, lambda r: cut(
        r / "adapter" / "adapter_model.safetensors")))], "is truncated"),
    "run adapter settings edited": (lambda ws, i: ["eval", str(run_copy(ws, i.finished, lambda r: edit_json(
        r / "adapter" / "adapter_config.json", lambda c: [v.update(alpha=800) for v in c["layers"].values()])))],
                                    "does not match the settings"),
    "resume config not JSON": (lambda ws, i: ["train", "--resume", "--out", str(run_copy(
        ws, i.interrupted, lambda r: write(r / "config.json", "{")))], "is not valid JSON"),
    "resume metrics damaged": (lambda ws, i: ["train", "--resume", "--out", str(run_copy(
        ws, i.interrupted, lambda r: write(r / "metrics.jsonl", "{broken\n" + (r / "metrics.jsonl").read_text())))],
                               "line 1 is not JSON"),
    "resume checkpoint truncated": (lambda ws, i: ["train", "--resume", "--out", str(run_copy(
        ws, i.interrupted, lambda r: cut(r / "checkpoint" / "optimizer.safetensors")))], "does not match its checksum"),
    "resume checkpoint values changed": (lambda ws, i: ["train", "--resume", "--out", str(run_copy(
        ws, i.interrupted, lambda r: tampered(r / "checkpoint" / "trainable.safetensors")))],
                                         "trainable.safetensors does not match its checksum"),
    "resume checkpoint without manifest": (lambda ws, i: ["train", "--resume", "--out", str(run_copy(
        ws, i.interrupted, lambda r: (r / "checkpoint" / "manifest.json").unlink()))], "has no manifest.json"),
    "resume checkpoint state not JSON": (lambda ws, i: ["train", "--resume", "--out", str(run_copy(
        ws, i.interrupted, lambda r: write(r / "checkpoint" / "state.json", "{")))], "state.json does not match"),
    "resume checkpoint of another run": (lambda ws, i: ["train", "--resume", "--out", str(run_copy(
        ws, i.interrupted, lambda r: (shutil.rmtree(r / "checkpoint"), shutil.copytree(i.other / "checkpoint",
                                                                                       r / "checkpoint"))))],
                                         "does not match the model"),
    "resume changes the rank": (lambda ws, i: ["train", "--resume", "--out", str(run_copy(ws, i.interrupted)),
                                               "--lora.r", "8"], "--resume cannot change lora.r (2 → 8)"),
    "resume a finished run": (lambda ws, i: ["train", "--resume", "--out", str(run_copy(ws, i.finished))],
                              "already finished"),
    "predict file not UTF-8": (lambda ws, i: ["predict", str(run_copy(ws, i.finished)), "--file",
                                              str(write(ws / "t.txt", b"ok\n\xff\n"))], "not UTF-8"),
    "predict file is a folder": (lambda ws, i: ["predict", str(run_copy(ws, i.finished)), "--file",
                                                str((ws / "t").mkdir() or ws / "t")], "is a folder"),
    "merge out is a file": (lambda ws, i: ["merge", str(run_copy(ws, i.finished)), "--out",
                                           str(write(ws / "merged", "x"))], "is a file"),
    "merge out holds other files": (lambda ws, i: ["merge", str(run_copy(ws, i.finished)), "--out",
                                                   str(write(ws / "merged" / "notes.txt", "x").parent), "--overwrite"],
                                    "holds files that are not a model"),
    "generate empty prompt": (lambda ws, i: ["generate", str(run_copy(ws, i.finished)), "--prompt", "  "],
                              "the prompt is empty"),
    # arguments
    "generate zero tokens": (lambda ws, i: ["generate", str(run_copy(ws, i.finished)), "--prompt", "Hi",
                                            "--max-new-tokens", "0"], "must be an integer >= 1, got '0'"),
    "unknown option": (lambda ws, i: ["eval", str(run_copy(ws, i.finished)), "--bogus"], "unrecognized arguments"),
    "bad choice": (lambda ws, i: ["eval", str(run_copy(ws, i.finished)), "--split", "dev"], "invalid choice"),
    "nproc zero": (lambda ws, i: ["train", "--nproc", "0"], "must be an integer >= 1"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_malformed_input_is_one_line_exit_2_nothing_changed(case, inputs, tmp_path, capsys):
    build, message = CLI_CASES[case]
    ws = tmp_path / "ws"
    ws.mkdir()
    argv = build(ws, inputs)
    before = snapshot(ws)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's errors exit from inside
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert snapshot(ws) == before


# ---------------------------------------------------------------- adapter files (the library)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def saved(folder: Path, fmt: str = "lorakit") -> Path:
    model = tiny()
    lorakit.inject(model, ["0", "2"], r=2, alpha=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    lorakit.save_adapter(model, folder, format=fmt, print_fn=lambda *a: None)
    return folder


def rewrite(folder: Path, change) -> None:
    """Rewrite the weights file without lorakit's metadata (as another tool would), tensors changed by `change`."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def first(tensors: dict, value) -> None:
    key = sorted(tensors)[0]
    tensors[key] = value(tensors[key])


ADAPTER_CASES = {
    "config not JSON": ("lorakit", lambda d: write(d / "adapter_config.json", "{"), "is not valid JSON"),
    "config a list": ("lorakit", lambda d: write(d / "adapter_config.json", "[]"), "must hold a JSON object"),
    "lora not an object": ("lorakit", lambda d: edit_json(d / "adapter_config.json", lambda c: c.update(lora=3)),
                           "lora must be a dict"),
    "layer entry not an object": ("lorakit", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c["layers"].update({"0": 2})), "layers.0 must be a dict"),
    "rank a string": ("lorakit", lambda d: edit_json(d / "adapter_config.json", lambda c: c["layers"]["0"].update(r="2")),
                      "r must be an integer"),
    "alpha infinite": ("lorakit", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c["layers"]["0"].update(alpha=float("inf"))), "alpha must be a finite"),
    "slices malformed": ("lorakit", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c["layers"]["0"].update(slices=[[5, 2, 1]])), "slices must be a list"),
    "modules_to_save a string": ("lorakit", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c.update(modules_to_save="2")), "modules_to_save must be a list"),
    "format_version a number": ("lorakit", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c.update(format_version=1)), "no valid format_version"),
    "format from a newer major": ("lorakit", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c.update(format_version="2.0")), "from a newer lorakit"),
    "alpha edited": ("lorakit", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c["layers"]["0"].update(alpha=400)), "does not match the settings"),
    "targets edited": ("lorakit", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c["layers"].update({"2": {**c["layers"]["2"], "slices": [[0, 2]]}})),
                       "does not match the settings"),
    "weights truncated": ("lorakit", lambda d: cut(d / "adapter_model.safetensors", 7), "is truncated"),
    "weights a pickle": ("lorakit", lambda d: write(d / "adapter_model.safetensors", pickle.dumps(Evil())),
                         "is truncated or not safetensors"),
    "weights gzip": ("lorakit", lambda d: write(d / "adapter_model.safetensors", gzip.compress(b"x" * 100)),
                     "is truncated or not safetensors"),
    "weights missing, a bin": ("lorakit", lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"),
                               "a pickle, which lorakit never loads"),
    "directory is a file": ("lorakit", lambda d: (shutil.rmtree(d), write(d, "x")), "is a file"),
    "tensor changed": ("lorakit", lambda d: rewrite(d, lambda t: first(t, lambda v: v + 1)), "does not match"),
    "peft tensor NaN": ("peft", lambda d: rewrite(d, lambda t: first(t, lambda v: v * float("nan"))),
                        "holds non-finite values"),
    "peft tensor infinite": ("peft", lambda d: rewrite(d, lambda t: first(t, lambda v: v / 0)), "holds non-finite values"),
    "peft tensor int8": ("peft", lambda d: rewrite(d, lambda t: first(t, lambda v: v.to(torch.int8))),
                         "is torch.int8; adapter tensors are floating point"),
    "peft tensor bool": ("peft", lambda d: rewrite(d, lambda t: first(t, lambda v: v > 0)), "is torch.bool"),
    "peft only lora_A": ("peft", lambda d: rewrite(d, lambda t: [t.pop(k) for k in list(t) if "lora_B" in k]),
                         "has only lora_A"),
    "peft alpha_pattern not an object": ("peft", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c.update(alpha_pattern=[1])), "alpha_pattern must be a dict"),
    "peft use_rslora a string": ("peft", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c.update(use_rslora="yes")), "use_rslora must be a bool"),
    "peft dropout a string": ("peft", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c.update(lora_dropout="high")), "dropout must be in"),
    "peft unsupported option": ("peft", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c.update(lora_bias=True)), "lora_bias=True"),
    "peft use_dora without magnitudes": ("peft", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c.update(use_dora=True)), "lacks lora_magnitude_vector"),
    "peft use_dora a string": ("peft", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c.update(use_dora="yes")), "use_dora must be a bool"),
    "peft residual init pissa_niter": ("peft", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c.update(init_lora_weights="pissa_niter_16")),
        "init_lora_weights='pissa_niter_16'"),
    "peft residual init loftq": ("peft", lambda d: edit_json(
        d / "adapter_config.json", lambda c: c.update(init_lora_weights="loftq")), "the residual base"),
    "peft alpha edited": ("peft", lambda d: edit_json(d / "adapter_config.json", lambda c: c.update(lora_alpha=400)),
                          "does not match the settings"),
    "peft another type": ("peft", lambda d: edit_json(d / "adapter_config.json", lambda c: c.update(peft_type="IA3")),
                          "lorakit reads LORA"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_malformed_adapter_is_refused_and_nothing_changes(case, tmp_path):
    fmt, change, message = ADAPTER_CASES[case]
    folder = saved(tmp_path / "adapter", fmt)
    change(folder)
    before = snapshot(tmp_path)
    model = tiny()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterFileError) as e:
        lorakit.load_adapter(model, folder)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert snapshot(tmp_path) == before
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_tables_cover_at_least_forty_cases():
    assert len(CLI_CASES) + len(ADAPTER_CASES) >= 40

"""The `lorakit` command end to end on tiny inputs: every subcommand, resume, and each bad input."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from lorakit import cli
from lorakit.train import tasks
from lorakit.train.runs import load_run

from conftest import WORDS, make_tiny_llama


def tiny_args(data, out, *extra):
    return ["train", "--data.path", str(data), "--data.text_column", "review", "--data.label_column", "verdict",
            "--model.max_length", "16", "--train.batch_size", "8", "--train.eval_batch_size", "32",
            "--train.epochs", "2", "--train.checkpoint_every", "2", "--train.log_every", "1", "--lora.r", "4",
            "--out", str(out), *extra]


def run_cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_a_complete_run(reviews, tmp_path, capsys):
    code, out, err = run_cli(tiny_args(reviews, tmp_path / "run"), capsys)
    assert code == 0, err
    run = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "adapter", "curves.png"} <= {p.name for p in run.iterdir()}
    assert "replaced 12 modules with LoRA adapter" in out and "trainable params:" in out
    assert "test accuracy before training" in out and "examples after training" in out
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "test_before" and events[-1] == "test_after" and events.count("val") == 2
    config = json.loads((run / "config.json").read_text())
    assert config["lora"]["r"] == 4 and config["data"]["text_column"] == "review"
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_predict_merge_inspect(reviews, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(tiny_args(reviews, run), capsys)[0] == 0
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]

    code, out, _ = run_cli(["eval", str(run)], capsys)
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(final["accuracy"])
    code, out, _ = run_cli(["eval", str(run), "--base", "--split", "val"], capsys)
    assert code == 0 and json.loads(out)["adapter"] is False

    code, out, _ = run_cli(["predict", str(run), "a wonderful moving film", "a dull tedious mess"], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and all(line.split("\t")[0] in WORDS for line in lines)

    code, out, _ = run_cli(["merge", str(run), "--out", str(tmp_path / "merged")], capsys)
    assert code == 0
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    cfg, task = load_run(str(run), as_trained=False)  # the fp32 base the merge added the adapter to
    batch = task.splits["test"].collate(list(range(4)))
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch.inputs).logits, task.model(**batch.inputs).logits, atol=1e-5, rtol=0)

    code, out, _ = run_cli(["inspect", "--data.path", str(reviews), "--data.text_column", "review",
                            "--data.label_column", "verdict"], capsys)
    marked = [line for line in out.splitlines() if line.startswith("◆")]
    assert code == 0 and len(marked) == 2 and "● " in out and "would replace 12 modules" in out
    assert "0–5 (BertLayer) × 6, identical: 0 shown" in out  # the six layers in one

    page = tmp_path / "pages" / "run.html"
    code, out, _ = run_cli(["inspect", str(run), "--shapes", "--html", str(page)], capsys)
    assert code == 0 and f"wrote the graph of the run's model to {page}" in out
    query = next(line for line in out.splitlines() if "query (LoraLayer)" in line)
    assert query.startswith("◆") and "adapter 'default'" in query and query.endswith("[2×16×384] → [2×16×384]")
    text = page.read_text()
    data = json.loads(text.split('type="application/json">')[1].split("</script>")[0])
    assert [r["after"] for r in data["surgery"]].count("LoRA r=4 α=16") == 12 and len(data["surgery"]) == 13


def test_inspect_a_bf16_run_as_it_evaluates(reviews, tmp_path, capsys):
    """A bf16 run stores its frozen weights in bf16 beside fp32 LoRA weights: inspect traces it under the
    run's autocast, as eval runs it, on any machine."""
    run = tmp_path / "run"
    assert run_cli(tiny_args(reviews, run) + ["--train.bf16", "true"], capsys)[0] == 0
    page = tmp_path / "run.html"
    code, out, _ = run_cli(["inspect", str(run), "--shapes", "--html", str(page)], capsys)
    query = next(line for line in out.splitlines() if "query (LoraLayer)" in line)
    assert code == 0 and query.endswith("[2×16×384] → [2×16×384]") and page.is_file()


def test_inspect_refuses_a_folder_for_html_and_options_with_a_run(tmp_path, capsys):
    code, _, err = run_cli(["inspect", "--html", str(tmp_path)], capsys)
    assert code == 2 and "--html takes the HTML file to write" in err and err.count("\n") == 1
    code, _, err = run_cli(["inspect", str(tmp_path), "--lora.r", "4"], capsys)
    assert code == 2 and "is a run folder" in err and err.count("\n") == 1
    code, _, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1


def break_training_forward(monkeypatch, at: int, error: BaseException) -> None:
    """Make the at-th forward in training mode raise `error` (Ctrl-C, or a kill that runs no handler)."""
    calls = {"n": 0}
    forward = tasks.Prepared.forward

    def breaking(self, model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == at:
                raise error
        return forward(self, model, batch)

    monkeypatch.setattr(tasks.Prepared, "forward", breaking)


def records(run):
    """metrics.jsonl without the timing field, which differs between runs."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "examples_per_s"} for x in lines]


def test_resume_after_interrupt_gives_the_same_result(reviews, tmp_path, capsys, monkeypatch):
    assert run_cli(tiny_args(reviews, tmp_path / "whole"), capsys)[0] == 0
    with monkeypatch.context() as m:
        break_training_forward(m, 9, KeyboardInterrupt())  # mid-epoch 1 (12 batches an epoch)
        code, _, err = run_cli(tiny_args(reviews, tmp_path / "cut"), capsys)
    assert code == 130 and "interrupted at step 8; checkpoint saved" in err and "--resume" in err
    code, out, err = run_cli(["train", "--resume", "--out", str(tmp_path / "cut")], capsys)
    assert code == 0, err
    assert "resuming" in out
    assert records(tmp_path / "cut") == records(tmp_path / "whole")


def test_resume_after_a_hard_kill_drops_records_past_the_checkpoint(reviews, tmp_path, capsys, monkeypatch):
    """A kill -9 runs no handler: the run resumes from the last periodic checkpoint, and the records
    logged after it are written again, not twice."""
    assert run_cli(tiny_args(reviews, tmp_path / "whole"), capsys)[0] == 0
    with monkeypatch.context() as m:
        break_training_forward(m, 12, SystemExit("power cut"))  # checkpoint at step 10, step 11 logged
        with pytest.raises(SystemExit):
            cli.main(tiny_args(reviews, tmp_path / "cut"))
    assert '"step": 11' in (tmp_path / "cut" / "metrics.jsonl").read_text()
    code, _, err = run_cli(["train", "--resume", "--out", str(tmp_path / "cut")], capsys)
    assert code == 0, err
    assert records(tmp_path / "cut") == records(tmp_path / "whole")
    code, _, err = run_cli(["train", "--resume", "--out", str(tmp_path / "cut")], capsys)
    assert code == 2 and "already finished" in err


def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(reviews, tmp_path, capsys, monkeypatch):
    forward = tasks.Prepared.forward
    calls = {"n": 0}

    def exploding(self, model, batch):
        loss, logits = forward(self, model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 5:
                return loss * float("nan"), logits
        return loss, logits

    monkeypatch.setattr(tasks.Prepared, "forward", exploding)
    run = tmp_path / "nan"
    code, _, err = run_cli(tiny_args(reviews, run), capsys)
    assert code == 2 and "loss became nan at step 5" in err and err.count("\n") == 1
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["progress"]["step"] == 4  # the last good checkpoint
    assert not (run / "adapter").exists()


def test_sigint_from_outside_checkpoints_and_resumes(reviews, tmp_path):
    out = tmp_path / "sig"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [sys.executable, "-m", "lorakit", *tiny_args(reviews, out, "--train.epochs", "30", "--train.checkpoint_every", "1")]
    # A job started in the background of a non-interactive shell inherits SIGINT ignored; the child here
    # gets the default handling back, as a terminal's Ctrl-C would find it.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and sum('"train"' in line for line in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    assert (out / "checkpoint" / "state.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--data.path", "/no/such/file.csv"], "data file not found: /no/such/file.csv"),
    (["--data.text_column", "body"], "'body'"),
    (["--lora.r", "0"], "lora.r must be an integer >= 1, got 0"),
    (["--lora.targets", "qeury"], "target 'qeury' matches no module"),
    (["--model.path", "EMPTY_MODEL_DIR"], "holds no weights"),
    (["--train.epochs", "two"], "train.epochs must be an integer, got 'two'"),
    (["--lora.nonsense", "1"], "unrecognized arguments: --lora.nonsense"),
    (["--model.quantize", "int8"], "model.quantize must be one of none, nf4; got 'int8'"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(reviews, tmp_path, capsys, extra, message):
    if "EMPTY_MODEL_DIR" in extra:
        empty = tmp_path / "model"
        empty.mkdir()
        (empty / "config.json").write_text('{"model_type": "bert"}')
        extra = [str(empty) if e == "EMPTY_MODEL_DIR" else e for e in extra]
    out_dir = tmp_path / "out"
    code, out, err = run_cli(tiny_args(reviews, out_dir) + extra, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lorakit: error: ") and message in err
    assert "Traceback" not in err
    assert not out_dir.exists()


def test_inspect_bad_target_is_one_line(reviews, capsys):
    code, out, err = run_cli(["inspect", "--data.path", str(reviews), "--data.text_column", "review",
                              "--data.label_column", "verdict", "--lora.targets", "qeury"], capsys)
    assert code == 2 and "target 'qeury' matches no module" in err and err.count("\n") == 1


def test_bad_data_files(tmp_path, capsys):
    one_class = tmp_path / "one.csv"
    one_class.write_text("review,verdict\n" + "".join(f"nice {i},good\n" for i in range(20)))
    empty = tmp_path / "empty.csv"
    empty.write_text("review,verdict\n")
    for path, message in ((one_class, "has one class"), (empty, "empty")):
        code, _, err = run_cli(tiny_args(path, tmp_path / "out"), capsys)
        assert code == 2 and message in err and err.count("\n") == 1
        assert not (tmp_path / "out").exists()


def test_existing_run_is_refused_without_overwrite(reviews, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    code, _, err = run_cli(tiny_args(reviews, run), capsys)
    assert code == 2 and "already holds a run; pass --overwrite" in err
    assert (run / "config.json").read_text() == "{}"


@pytest.mark.parametrize("command", ["train", "eval", "predict", "generate", "merge", "inspect"])
def test_help(command):
    result = subprocess.run([sys.executable, "-m", "lorakit", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and f"lorakit {command}" in result.stdout


def save_tiny_llama(path: Path, tokenizer_dir: Path, width: int) -> Path:
    """A 2-layer random Llama `width` wide (FFN 2×) with SmolLM2's tokenizer, saved as a Hugging Face directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer random Llama with SmolLM2's tokenizer, as a Hugging Face directory."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir, 32)


def test_causal_lm_lowers_perplexity_and_generates(tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / "lm"
    code, out, err = run_cli(["train", "recipes/causal-lm.toml", "--model.path", str(tiny_llama_dir),
                              "--data.block_size", "32", "--data.max_train", "96", "--train.batch_size", "8",
                              "--train.lr", "1e-2", "--train.epochs", "2", "--lora.r", "4", "--out", str(run)], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    before, after = records[0]["perplexity"], records[-1]["perplexity"]
    assert after < before
    code, out, _ = run_cli(["generate", str(run), "--prompt", "To be, or not", "--max-new-tokens", "5"], capsys)
    assert code == 0 and "--- without adapter:" in out and "--- with adapter:" in out


@pytest.fixture(scope="module")
def tiny_llama64_dir(tmp_path_factory, smollm2_dir):
    """Like tiny_llama_dir, but 64 wide: every Linear reads whole 64-value NF4 blocks per row."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama64"), smollm2_dir, 64)


def test_qlora_run_evaluates_on_the_float_base_and_merges_to_float(tiny_llama64_dir, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "qlm"
    code, out, err = run_cli(["train", "recipes/causal-lm.toml", "--model.path", str(tiny_llama64_dir),
                              "--model.quantize", "nf4", "--data.block_size", "32", "--data.max_train", "48",
                              "--train.batch_size", "8", "--train.lr", "1e-2", "--lora.r", "4", "--out", str(run)],
                             capsys)
    assert code == 0, err
    assert "quantized 14 Linear layers to NF4 + double quant" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["perplexity"] < records[0]["perplexity"]
    code, out, err = run_cli(["eval", str(run)], capsys)
    on_nf4 = json.loads(out)
    assert code == 0 and on_nf4["quantize"] == "nf4" and "base_mismatch" not in on_nf4
    assert on_nf4["perplexity"] == pytest.approx(records[-1]["perplexity"], rel=1e-4)
    code, out, err = run_cli(["eval", str(run), "--quantize", "none"], capsys)
    on_float = json.loads(out)
    assert code == 0 and on_float["quantize"] == "none" and "NF4 + double quant copy" in on_float["base_mismatch"][0]
    assert "lorakit: note:" in err and on_float["perplexity"] != on_nf4["perplexity"]
    code, out, err = run_cli(["merge", str(run), "--out", str(tmp_path / "merged")], capsys)
    assert code == 0 and "dequantized to fp32" in out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_image_recipe_trains_and_lora_adapts_it(tmp_path, capsys):
    pytest.importorskip("numpy")
    from lorakit.train.data import FASHION_MNIST_DIR

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    base = tmp_path / "image"
    code, out, err = run_cli(["train", "recipes/image.toml", "--data.max_train", "3000", "--train.epochs", "1",
                              "--out", str(base)], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["accuracy"] > 0.5 > records[0]["accuracy"]
    lora = tmp_path / "image-lora"
    code, out, err = run_cli(["train", "recipes/image-lora.toml", "--model.path", str(base / "model.safetensors"),
                              "--data.max_train", "2000", "--out", str(lora)], capsys)
    assert code == 0, err
    assert "replaced 3 modules" in out and "trainable params: 3,272" in out
    code, out, _ = run_cli(["eval", str(lora)], capsys)
    assert code == 0 and json.loads(out)["accuracy"] > 0.5


def test_bf16_run_keeps_the_frozen_base_in_bf16_and_its_adapter_names_the_fp32_base(reviews, tmp_path, capsys):
    from lorakit import load_adapter
    from lorakit.adapters import holders
    from lorakit.train.runs import frozen_to_bf16
    from lorakit.train.tasks import prepare

    run = tmp_path / "run"
    code, out, err = run_cli(tiny_args(reviews, run, "--train.bf16", "true"), capsys)
    assert code == 0, err
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0 <= final["accuracy"] <= 1
    code, out, _ = run_cli(["eval", str(run)], capsys)  # scored as the run scored it: base in bf16
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(final["loss"], abs=1e-6)
    cfg, _ = load_run(str(run))
    fp32 = prepare(cfg).model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a BaseMismatch warning would fail here
        load_adapter(fp32, run / "adapter")
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    adapters = {id(p) for h in holders(fp32) for p in h.adapters.parameters()}
    assert frozen_to_bf16(fp32, [p for p in fp32.parameters() if id(p) in adapters]) > 0
    assert all((p.dtype == torch.float32) == (id(p) in adapters) for p in fp32.parameters())


# ---------------------------------------------------------------- nothing lost, nothing silent


def snapshot(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def bert_args(reviews, tiny_bert, out, *extra):
    return tiny_args(reviews, out, "--model.path", str(tiny_bert), "--train.lr", "1e-2", *extra)


@pytest.mark.parametrize("extra, message", [
    (["--data.path", "/no/such/file.csv"], "data file not found"),
    (["--lora.targets", "qeury"], "target 'qeury' matches no module"),
    (["--model.max_length", "1000"], "exceeds the 64 positions"),
    (["--model.path", "/no/such/model"], "model.path /no/such/model not found"),
    (["--train.lr", "inf"], "train.lr must be a finite number > 0"),
])
def test_overwrite_with_bad_input_keeps_the_old_run(reviews, tiny_bert, tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    assert run_cli(bert_args(reviews, tiny_bert, run), capsys)[0] == 0
    before = snapshot(tmp_path)
    code, _, err = run_cli(bert_args(reviews, tiny_bert, run, "--overwrite", *extra), capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_the_run_and_keeps_the_users_other_files(reviews, tiny_bert, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(bert_args(reviews, tiny_bert, run, "--lora.r", "2"), capsys)[0] == 0
    (run / "notes.txt").write_text("mine")
    assert run_cli(bert_args(reviews, tiny_bert, run, "--overwrite"), capsys)[0] == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "config.json").read_text())["lora"]["r"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary left beside it


def test_killed_before_the_adapter_is_written_the_run_resumes_to_completion(reviews, tiny_bert, tmp_path, capsys,
                                                                             monkeypatch):
    """The final test score is the run's last record, written after the adapter: a run stopped between the
    two is not finished, and --resume completes it."""
    from lorakit.train import recipe

    assert run_cli(bert_args(reviews, tiny_bert, tmp_path / "whole"), capsys)[0] == 0
    with monkeypatch.context() as m:
        def power_cut(*args, **kwargs):
            raise SystemExit("power cut")
        m.setattr(recipe, "write_adapter", power_cut)
        with pytest.raises(SystemExit):
            cli.main(bert_args(reviews, tiny_bert, tmp_path / "cut"))
    code, _, err = run_cli(["eval", str(tmp_path / "cut")], capsys)
    assert code == 2 and "the run has not finished; `lorakit train --resume" in err
    code, _, err = run_cli(["train", "--resume", "--out", str(tmp_path / "cut")], capsys)
    assert code == 0, err
    assert records(tmp_path / "cut") == records(tmp_path / "whole")
    assert run_cli(["eval", str(tmp_path / "cut")], capsys)[0] == 0


def test_resume_applies_the_settings_that_may_change_and_records_them(reviews, tiny_bert, tmp_path, capsys,
                                                                        monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        break_training_forward(m, 5, KeyboardInterrupt())
        assert run_cli(bert_args(reviews, tiny_bert, run), capsys)[0] == 130
    code, out, err = run_cli(["train", "--resume", "--out", str(run), "--train.lr", "5e-3", "--train.epochs", "3"], capsys)
    assert code == 0, err
    assert "resuming with train.epochs 2 → 3, train.lr 0.01 → 0.005" in out
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["lr"] == 5e-3 and config["train"]["epochs"] == 3
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = next(i for i, r in enumerate(log) if r["event"] == "resume")
    assert log[resumed]["changed"] == {"train.lr": {"from": 0.01, "to": 0.005}, "train.epochs": {"from": 2, "to": 3}}
    assert sum(r["event"] == "val" for r in log) == 3
    from lorakit.train.config import build_config
    from lorakit.train.recipe import schedule

    per_epoch = sum(r["event"] == "train" and r["epoch"] == 1 for r in log)  # a record every step
    factor = schedule(build_config(config), 3 * per_epoch)  # now 3 epochs
    for r in log[resumed:]:
        if r["event"] == "train":  # the rate of each step after resuming: the new base rate on the new schedule
            assert r["lr"] == pytest.approx(5e-3 * factor(r["step"]), rel=1e-9)


def test_weights_that_turn_non_finite_are_never_checkpointed(reviews, tiny_bert, tmp_path, capsys, monkeypatch):
    """A step that leaves a weight infinite (its loss was still finite) stops the run at the next checkpoint,
    which is not written: the checkpoint on disk is the last one whose weights are all finite."""
    from lorakit import tensorfile
    from lorakit.train import checkpoint

    step = torch.optim.AdamW.step
    calls = {"n": 0}

    def exploding(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 6:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", exploding)
    run = tmp_path / "run"
    code, _, err = run_cli(bert_args(reviews, tiny_bert, run), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "became non-finite by step 6" in err and "the last checkpoint, all of whose weights are finite, is from step 4" in err
    assert "lorakit train --resume --out" in err and "--train.lr 0.001" in err
    state, weights, _ = checkpoint.read(run / "checkpoint")
    assert state["progress"]["step"] == 4 and tensorfile.first_non_finite(weights) is None


def test_metrics_are_strict_json_when_a_metric_is_not_finite(reviews, tiny_bert, tmp_path, capsys, monkeypatch):
    from lorakit.train import recipe

    evaluate = recipe.evaluate

    def nan_on_val(task, model, split, *args, **kwargs):
        result = evaluate(task, model, split, *args, **kwargs)
        return {**result, "loss": float("nan")} if split == "val" else result

    monkeypatch.setattr(recipe, "evaluate", nan_on_val)
    run = tmp_path / "run"
    assert run_cli(bert_args(reviews, tiny_bert, run), capsys)[0] == 0

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    lines = [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines if r["event"] == "val"] == [None, None]


def test_a_resumed_loraplus_run_keeps_b_at_its_ratio_of_the_new_rate(tiny_llama):
    """--resume --train.lr X gives every optimizer group the new rate, B's group (LoRA+) still ×ratio."""
    from lorakit.train.config import build_config
    from lorakit.train.recipe import _apply_resume_changes

    import lorakit

    lorakit.inject(tiny_llama, ["q_proj"], r=2)
    optimizer = torch.optim.AdamW(lorakit.param_groups(tiny_llama, lr=1e-2, loraplus_ratio=16))
    half = lambda step: 0.5  # noqa: E731 - the schedule's factor at the current step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, half)
    cfg = build_config({"train": {"lr": 4e-3, "loraplus_ratio": 16}})
    _apply_resume_changes(cfg, 1e-2, optimizer, scheduler, half)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-3, 32e-3])
    assert scheduler.base_lrs == pytest.approx([4e-3, 64e-3])
    fa = make_tiny_llama()
    lorakit.inject(fa, ["q_proj"], r=2, train_a=False)  # LoRA-FA: B's group is the only one
    optimizer = torch.optim.AdamW(lorakit.param_groups(fa, lr=1e-2, loraplus_ratio=16))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, half)
    assert len(optimizer.param_groups) == 1
    _apply_resume_changes(cfg, 1e-2, optimizer, scheduler, half)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(32e-3) and scheduler.base_lrs == pytest.approx([64e-3])


def test_train_with_loraplus(reviews, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(tiny_args(reviews, run, "--train.loraplus_ratio", "16", "--train.epochs", "1"), capsys)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["train"]["loraplus_ratio"] == 16
    code, _, err = run_cli(tiny_args(reviews, tmp_path / "bad", "--train.loraplus_ratio", "0"), capsys)
    assert code == 2 and "train.loraplus_ratio must be a finite number > 0" in err and err.count("\n") == 1


def test_a_lora_fa_run_trains_b_alone_and_resumes_with_its_a(reviews, tiny_bert, tmp_path, capsys, monkeypatch):
    """--lora.train_a false: A stays as drawn through training and a resume, which takes A from the checkpoint
    (here a fresh draw would differ) and keeps the setting: --resume cannot change it."""
    from safetensors.torch import load_file

    from lorakit import LoraAdapter
    from lorakit.train import checkpoint

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        break_training_forward(m, 5, KeyboardInterrupt())
        code, out, _ = run_cli(bert_args(reviews, tiny_bert, run, "--lora.train_a", "false"), capsys)
    assert code == 130 and "train_a=False" in out
    _, weights, _ = checkpoint.read(run / "checkpoint")
    a_keys = sorted(k for k in weights if k.endswith("lora_a"))
    assert len(a_keys) == 4 and all(weights[k].abs().max() > 0 for k in a_keys)
    code, _, err = run_cli(["train", "--resume", "--out", str(run), "--lora.train_a", "true"], capsys)
    assert code == 2 and "--resume cannot change lora.train_a (False → True)" in err
    with monkeypatch.context() as m:
        m.setattr(LoraAdapter, "reset_parameters", lambda self: self.lora_a.data.fill_(0.5))
        code, _, err = run_cli(["train", "--resume", "--out", str(run)], capsys)
    assert code == 0, err
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["lora"]["train_a"] is False
    assert json.loads((run / "config.json").read_text())["lora"]["train_a"] is False
    for key in a_keys:  # checkpoint keys are parameter names: ...query.adapters.default.lora_a
        layer = key.removesuffix(".adapters.default.lora_a")
        assert torch.equal(adapter[f"{layer}.lora_a"], weights[key])
        assert not torch.equal(adapter[f"{layer}.lora_b"], weights[key.replace("lora_a", "lora_b")])


def test_inspect_shows_the_rank_pattern_and_refuses_bad_json(reviews, tiny_bert, capsys):
    data = ["--data.path", str(reviews), "--data.text_column", "review", "--data.label_column", "verdict",
            "--model.path", str(tiny_bert)]
    code, out, err = run_cli(["inspect", *data, "--lora.rank_pattern", '{"layer.1.attention.self.query": 6}'], capsys)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("bert.encoder.layer.")]
    assert {row[0]: row[-3] for row in rows} == {"bert.encoder.layer.0.attention.self.query": "8",
                                                "bert.encoder.layer.0.attention.self.value": "8",
                                                "bert.encoder.layer.1.attention.self.query": "6",
                                                "bert.encoder.layer.1.attention.self.value": "8"}
    code, _, err = run_cli(["inspect", *data, "--lora.rank_pattern", "{query: 6}"], capsys)
    assert code == 2 and "lora.rank_pattern must be a JSON object" in err and err.count("\n") == 1
    code, _, err = run_cli(["inspect", *data, "--lora.rank_pattern", '{"qeury": 6}'], capsys)
    assert code == 2 and "rank_pattern key 'qeury' names none of the 4 targeted layers; closest layer names: query" \
        in err and err.count("\n") == 1

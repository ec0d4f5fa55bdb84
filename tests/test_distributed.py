"""Distributed training on 2 CPU processes (gloo) with a tiny BERT: 2 ranks × batch b train exactly
as 1 process × batch 2b, under DDP and FSDP; the adapter loads in one process with the reported
metrics; resume after an interruption matches an uninterrupted run; a partial tensor is never saved."""

import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit import AdapterFileError, cli, inject
from lorakit.files import adapter_spec, write_adapter
from lorakit.train import tasks
from lorakit.train.distributed import Dist
from test_cli import records, run_cli

B = 4  # per-rank batch; the single process takes 2·B


def args(data, model, out, batch, *extra):
    return ["train", "--data.path", str(data), "--data.text_column", "review", "--data.label_column", "verdict",
            "--model.path", str(model), "--model.max_length", "16", "--train.batch_size", str(batch),
            "--train.eval_batch_size", "16", "--train.epochs", "2", "--train.checkpoint_every", "3",
            "--train.log_every", "1", "--train.lr", "1e-2", "--lora.r", "4", "--lora.dropout", "0", "--train.bf16", "false",
            "--out", str(out), *extra]


def adapter(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
    assert any(k.endswith("lora_b") and want[k].abs().max() > 1e-3 for k in want)  # it did learn


def torchrun(argv, timeout=1200):
    """`lorakit ARGV --nproc 2` as a user runs it (in its own process group, killed whole on a timeout)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", *argv, "--nproc", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _rank(rank, port, argv, term_at):
    """One rank, set up as torchrun would; rank 1 sends itself SIGTERM at its term_at-th training forward."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    if term_at and rank == 1:
        forward, calls = tasks.Prepared.forward, {"n": 0}

        def terminating(self, model, batch):
            calls["n"] += model.training
            if calls["n"] == term_at and model.training:
                os.kill(os.getpid(), signal.SIGTERM)
            return forward(self, model, batch)

        tasks.Prepared.forward = terminating
    sys.exit(cli.main(argv))


def spawn(argv, term_at=0, timeout=1200):
    """Two ranks as spawned processes (the test can reach into them); their exit codes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(rank, port, argv, term_at)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def single(reviews, tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli.main(args(reviews, tiny_bert, out, 2 * B)) == 0
    return out


@pytest.fixture(scope="module")
def ddp(reviews, tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun(args(reviews, tiny_bert, out, B))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def assert_same_records(run, reference):
    """metrics.jsonl of both runs: the same events, the numbers equal to 1e-5."""
    ours, theirs = records(run), records(reference)
    assert [r["event"] for r in ours] == [r["event"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (b[k] if isinstance(b[k], str) else pytest.approx(b[k], abs=1e-5)), (a, k)


def test_two_ranks_train_as_one_process_with_twice_the_batch(single, ddp):
    run, result = ddp
    assert_same_adapter(adapter(run), adapter(single))
    assert_same_records(run, single)
    assert result.stdout.count("test accuracy before training") == 1  # rank 0 alone prints


def test_distributed_adapter_loads_in_one_process_with_the_reported_metrics(ddp, capsys):
    run, _ = ddp
    reported = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert reported["event"] == "test_after"
    code, out, _ = run_cli(["eval", str(run)], capsys)
    got = json.loads(out)
    assert code == 0 and got["accuracy"] == reported["accuracy"]
    assert got["loss"] == pytest.approx(reported["loss"], abs=1e-5)
    code, out, _ = run_cli(["eval", str(run), "--base"], capsys)
    assert json.loads(out)["loss"] != pytest.approx(reported["loss"], abs=1e-3)


def test_distributed_resume_after_sigterm_gives_the_same_run(ddp, reviews, tiny_bert, tmp_path, capsys):
    whole, _ = ddp
    cut = tmp_path / "cut"
    # Only rank 1 is signalled, at its 5th training forward (step 5): both ranks stop after that step.
    assert spawn(args(reviews, tiny_bert, cut, B), term_at=5) == [130, 130]
    state = json.loads((cut / "checkpoint" / "state.json").read_text())
    assert state["progress"]["step"] == 5 and not (cut / "adapter").exists()
    code, _, err = run_cli(["train", "--resume", "--out", str(cut)], capsys)
    assert code == 2 and "trained on 2 processes, this is 1; resume it with --nproc 2" in err
    result = torchrun(["train", "--resume", "--out", str(cut)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    assert records(cut) == records(whole)
    assert_same_adapter(adapter(cut), adapter(whole))


def test_fsdp_trains_as_one_process_and_saves_whole_tensors(single, reviews, tiny_bert, tmp_path):
    run = tmp_path / "fsdp"
    assert spawn(args(reviews, tiny_bert, run, B, "--train.distributed", "fsdp")) == [0, 0]
    assert_same_adapter(adapter(run), adapter(single))
    assert_same_records(run, single)


def test_nproc_refuses_bad_input_before_starting(reviews, tiny_bert, tmp_path, capsys, monkeypatch):
    from lorakit.train import distributed

    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("launched torchrun on bad input"))
    existing = tmp_path / "x"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    for extra, message in ((["--lora.r", "0"], "lora.r must be an integer >= 1, got 0"),
                           ([], "already holds a run; pass --overwrite")):
        code, _, err = run_cli(args(reviews, tiny_bert, existing, B, "--nproc", "2", *extra), capsys)
        assert code == 2 and err.count("\n") == 1 and message in err


def test_a_shard_or_an_empty_tensor_is_never_saved(tiny_gpt2, tmp_path):
    inject(tiny_gpt2, {"c_attn": ("q", "v")}, r=4, modules_to_save=["lm_head"])
    spec = adapter_spec(tiny_gpt2, "default")
    name = next(iter(spec.lora))
    a, b = spec.lora[name]
    half = tiny_gpt2.get_submodule(name).adapters["default"].lora_a.shape[0] // 2
    for bad, shape in (((a[:half], b), f"{name}.lora_a has shape ({half}, 32), expected (8, 32)"),
                       ((a, b[:0]), f"{name}.lora_b has shape (0, 4), expected (64, 4)")):
        spec.lora[name] = bad
        with pytest.raises(AdapterFileError, match=r"refusing to save adapter 'default': .*" + re.escape(shape)):
            write_adapter(tiny_gpt2, spec, tmp_path / "a", "default")
        assert not (tmp_path / "a").exists()
    spec.lora[name] = (a, b)
    spec.saved["lm_head"]["weight"] = torch.empty(0)
    with pytest.raises(AdapterFileError, match=r"lm_head.weight has shape \(0,\)"):
        write_adapter(tiny_gpt2, spec, tmp_path / "a", "default")
    spec.saved["lm_head"]["weight"] = tiny_gpt2.get_submodule("lm_head").original.weight
    write_adapter(tiny_gpt2, spec, tmp_path / "a", "default", print_fn=lambda s: None)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_shards_of_a_global_batch_weight_to_its_mean():
    index = list(range(7))
    parts = [Dist(rank=k, world=2).shard(index) for k in range(2)]
    assert parts == [([0, 1, 2, 3], pytest.approx(8 / 7)), ([4, 5, 6], pytest.approx(6 / 7))]
    assert Dist(rank=1, world=2).shard([9]) == ([9], 0.0)  # an empty slice runs one example, weight 0
    assert Dist().shard(index) == (index, 1.0)
    batches = [[0], [1], [2]]
    assert Dist(rank=1, world=2, strategy="fsdp").eval_batches(batches) == [([1], True), ([0], False)]
    assert Dist(rank=1, world=2, strategy="ddp").eval_batches(batches) == [([1], True)]


def test_ddp_sends_only_trainable_parameters_at_start(tiny_gpt2, monkeypatch):
    import torch.distributed as tdist

    from lorakit.train.distributed import wrap

    inject(tiny_gpt2, {"c_attn": ("q", "v")}, r=4, modules_to_save=["lm_head"])
    sent, coalesced = [], []
    monkeypatch.setattr(tdist, "broadcast", lambda t, src, *a, **k: sent.append(t.data_ptr()))
    monkeypatch.setattr(tdist, "_broadcast_coalesced", lambda *a, **k: coalesced.append(a))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrap(tiny_gpt2, Dist(rank=0, world=2))
    finally:
        tdist.destroy_process_group()
    trainable = [p.data_ptr() for p in tiny_gpt2.parameters() if p.requires_grad]
    assert sent == trainable and not coalesced
    assert len(trainable) == 2 * 2 + 1 and sum(1 for _ in tiny_gpt2.parameters()) > 20  # A, B of 2 layers; the head


def test_fsdp_trains_dora_as_one_process(reviews, tiny_bert, tmp_path):
    """DoRA's norms read the whole W0, which FSDP gathers for each forward: 2 ranks train as 1 process."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(args(reviews, tiny_bert, one, 2 * B, "--lora.dora", "true", "--train.epochs", "1")) == 0
    assert spawn(args(reviews, tiny_bert, two, B, "--lora.dora", "true", "--train.epochs", "1",
                      "--train.distributed", "fsdp")) == [0, 0]
    assert any(k.endswith(".magnitude") for k in adapter(one))
    assert_same_adapter(adapter(two), adapter(one))

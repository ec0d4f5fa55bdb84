"""Adapter files: round trips, PEFT in both directions, and every refusal leaves the model as it was."""

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import AdapterFileError, LoraLayer
from lorakit.files import BaseMismatch, UnverifiedBase

from conftest import assert_untouched, make_tiny_llama, plain_state, randomize

TOKENS = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(3))


def trained_minilm(minilm, **kwargs):
    base = copy.deepcopy(minilm)
    lorakit.inject(minilm, ["query", "value"], r=8, alpha=16, **kwargs)
    randomize(minilm, std=0.05)
    return base, minilm


def test_round_trip_identical_logits_only_adapter_tensors(minilm, tmp_path):
    base, model = trained_minilm(minilm)
    expected = model(TOKENS).logits
    path = lorakit.save_adapter(model, tmp_path / "a", print_fn=lambda s: None)
    keys = set(load_file(path))
    assert len(keys) == 24 and all(k.endswith((".lora_a", ".lora_b")) for k in keys)
    assert path.stat().st_size < 300_000  # 73,728 fp32 values
    fresh = copy.deepcopy(base)
    assert lorakit.load_adapter(fresh, tmp_path / "a")
    got = fresh(TOKENS).logits
    assert torch.equal(got, expected)
    assert (got - base(TOKENS).logits).abs().max() > 1e-3
    assert not any(p.requires_grad for p in fresh.parameters())
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["format_version"] == "1.1" and config["lora"]["r"] == 8
    assert config["base"]["architecture"] == "BertForSequenceClassification"
    assert len(config["layers"]) == 12 and len(config["base"]["weights_sha256"]) == 64


def test_sixteen_bit_file_is_under_200_kb(minilm, tmp_path):
    base, model = trained_minilm(minilm)
    expected = model(TOKENS).logits
    path = lorakit.save_adapter(model, tmp_path / "a", dtype=torch.bfloat16, print_fn=lambda s: None)
    assert path.stat().st_size < 200_000
    fresh = copy.deepcopy(base)
    lorakit.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(TOKENS).logits, expected, atol=1e-2, rtol=0)
    assert fresh.bert.encoder.layer[0].attention.self.query.adapters["default"].lora_a.dtype == torch.float32


def test_modules_to_save_round_trip(minilm, tmp_path):
    base, model = trained_minilm(minilm, modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.adapters["default"].weight.add_(0.5)
    expected = model(TOKENS).logits
    lorakit.save_adapter(model, tmp_path / "a", print_fn=lambda s: None)
    fresh = copy.deepcopy(base)
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(TOKENS).logits, expected)
    lorakit.disable_adapters(fresh)
    assert torch.equal(fresh(TOKENS).logits, base(TOKENS).logits)


def test_save_refuses_to_overwrite_and_leaves_no_temp_files(minilm, tmp_path):
    _, model = trained_minilm(minilm)
    lorakit.save_adapter(model, tmp_path, print_fn=lambda s: None)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        lorakit.save_adapter(model, tmp_path, print_fn=lambda s: None)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    lorakit.save_adapter(model, tmp_path, overwrite=True, print_fn=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_prints_size(minilm, tmp_path):
    _, model = trained_minilm(minilm)
    out = []
    lorakit.save_adapter(model, tmp_path, print_fn=out.append)
    assert "24 tensors, 291.7 KiB" in out[0]  # 288 KiB of fp32 values plus the header and its metadata


# ---------------------------------------------------------------- PEFT both ways

def peft_round_trips(base, model, targets, tmp_path, tokens):
    peft = pytest.importorskip("peft")
    expected = model(tokens).logits
    assert (expected - base(tokens).logits).abs().max() > 1e-3
    # lorakit → PEFT
    lorakit.save_adapter(model, tmp_path / "ours", format="peft", print_fn=lambda s: None)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(input_ids=tokens).logits, expected, atol=1e-5, rtol=0)
    # PEFT → lorakit
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.05)
    twin.eval()
    twin.save_pretrained(tmp_path / "theirs")
    peft_logits = twin(input_ids=tokens).logits
    ours = copy.deepcopy(base)
    with pytest.warns(UnverifiedBase, match="carries no base fingerprint"):  # PEFT files have none
        lorakit.load_adapter(ours, tmp_path / "theirs")
    got = ours(tokens).logits
    torch.testing.assert_close(got, peft_logits, atol=1e-5, rtol=0)
    assert (got - base(tokens).logits).abs().max() > 1e-3


def test_peft_both_ways_minilm(minilm, tmp_path):
    base, model = trained_minilm(minilm)
    peft_round_trips(base, model, ["query", "value"], tmp_path, TOKENS)


def test_peft_both_ways_smollm2(smollm2, tmp_path):
    base = copy.deepcopy(smollm2)
    lorakit.inject(smollm2, ["q_proj", "v_proj"], r=8, alpha=16)
    randomize(smollm2, std=0.02)
    tokens = torch.randint(100, 40000, (2, 10), generator=torch.Generator().manual_seed(5))
    peft_round_trips(base, smollm2, ["q_proj", "v_proj"], tmp_path, tokens)


def test_fused_slices_export_to_peft_as_whole_layer_lora(tiny_gpt2, tmp_path):
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(tiny_gpt2)
    lorakit.inject(tiny_gpt2, {"c_attn": ("q", "v")}, r=4, alpha=8)
    randomize(tiny_gpt2)
    ids = torch.randint(0, 100, (2, 9))
    expected = tiny_gpt2(ids).logits
    lorakit.save_adapter(tiny_gpt2, tmp_path, format="peft", print_fn=lambda s: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    assert (expected - base(ids).logits).abs().max() > 1e-2
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path)
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- refusals

@pytest.fixture
def saved(minilm, tmp_path):
    """A saved MiniLM adapter and a fresh base to load it into."""
    base, model = trained_minilm(minilm)
    lorakit.save_adapter(model, tmp_path / "a", print_fn=lambda s: None)
    return base, tmp_path / "a"


def assert_refused(model, path, match):
    """load_adapter raises AdapterFileError matching `match` and leaves the model as it was."""
    state = plain_state(model)
    with pytest.raises(AdapterFileError, match=match):
        lorakit.load_adapter(model, path)
    assert_untouched(model, state)


def test_refuses_a_different_base_unless_forced(saved):
    base, path = saved
    with torch.no_grad():
        base.bert.encoder.layer[3].attention.self.value.weight.mul_(1.01)  # a fine-tuned base
    assert_refused(base, path, r"trained on a different base model \(the frozen weights of the "
                               r"adapted layers differ\); pass force=True")
    with pytest.warns(UserWarning, match="loading anyway because force=True"):
        lorakit.load_adapter(base, path, force=True)
    assert any(isinstance(m, LoraLayer) for m in base.modules())


def test_refuses_shape_mismatch_naming_keys(saved, tmp_path):
    base, path = saved
    tensors = load_file(path / "adapter_model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query.lora_a"
    tensors[key] = torch.zeros(8, 500)
    from safetensors.torch import save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "adapter_model.safetensors")
    config = json.loads((path / "adapter_config.json").read_text())
    del config["weights_sha256"]
    config["format_version"] = "1.0"  # a file of the format before settings digests, written by hand
    (bad / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(base, bad, r"query.lora_a has shape \(8, 500\) in the file but \(8, 384\) here")


@pytest.mark.parametrize("cut", [10, 1000, 100_000])
def test_refuses_truncated_file(saved, cut):
    base, path = saved
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-cut])
    assert_refused(base, path, "is truncated or corrupt")


def test_refuses_flipped_bytes_by_hash(saved):
    base, path = saved
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_refused(base, path, "does not match its checksum")


def test_refuses_a_pickle_and_never_unpickles(saved):
    import pickle

    base, path = saved

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (path / "adapter_model.safetensors").write_bytes(pickle.dumps(Boom()))
    assert_refused(base, path, "is truncated or")


def test_refuses_corrupt_config(saved):
    base, path = saved
    (path / "adapter_config.json").write_text("{ not json")
    with pytest.raises(AdapterFileError, match="is not valid JSON"):
        lorakit.load_adapter(base, path)


def test_refuses_newer_major_version(saved):
    base, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    config["format_version"] = "2.0"
    (path / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(base, path, "format_version 2.0, from a newer lorakit; this version reads format 1.x")


def test_unknown_keys_from_newer_minor_warn_and_load(saved):
    base, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    config["format_version"] = "1.7"
    config["quantum_flux"] = True
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"ignoring unknown keys quantum_flux \(format 1.7 is newer than 1.1\)"):
        lorakit.load_adapter(base, path)
    assert any(isinstance(m, LoraLayer) for m in base.modules())


def test_missing_directory(minilm, tmp_path):
    with pytest.raises(AdapterFileError, match="adapter directory .*nope not found"):
        lorakit.load_adapter(minilm, tmp_path / "nope")


# ---------------------------------------------------------------- hot swap, many adapters

def test_hot_swap_replaces_weights_in_place(minilm, tmp_path):
    base, model = trained_minilm(minilm)
    lorakit.save_adapter(model, tmp_path / "one", print_fn=lambda s: None)
    randomize(model, std=0.08)
    lorakit.save_adapter(model, tmp_path / "two", print_fn=lambda s: None)
    second = model(TOKENS).logits
    fresh = copy.deepcopy(base)
    lorakit.load_adapter(fresh, tmp_path / "one", name="live")
    layer = fresh.bert.encoder.layer[0].attention.self.query
    first = fresh(TOKENS).logits
    lorakit.hot_swap(fresh, tmp_path / "two", "live")
    assert fresh.bert.encoder.layer[0].attention.self.query is layer
    assert torch.equal(fresh(TOKENS).logits, second) and not torch.equal(first, second)


def test_load_second_adapter_beside_first(minilm, tmp_path):
    base, model = trained_minilm(minilm)
    lorakit.save_adapter(model, tmp_path / "a", print_fn=lambda s: None)
    a_logits = model(TOKENS).logits
    randomize(model, std=0.1)
    lorakit.save_adapter(model, tmp_path / "b", print_fn=lambda s: None)
    b_logits = model(TOKENS).logits
    fresh = copy.deepcopy(base)
    lorakit.load_adapter(fresh, tmp_path / "a", name="a")
    lorakit.load_adapter(fresh, tmp_path / "b", name="b")
    assert lorakit.list_adapters(fresh) == ["a", "b"]
    assert torch.equal(fresh(TOKENS).logits, a_logits)  # the first stays active
    lorakit.set_adapter(fresh, "b")
    assert torch.equal(fresh(TOKENS).logits, b_logits)
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        lorakit.load_adapter(fresh, tmp_path / "a", name="a")


def test_refuses_an_adapter_for_another_model(saved, tiny_gpt2):
    _, path = saved
    assert_refused(tiny_gpt2, path, r"does not fit GPT2LMHeadModel: layer "
                                    r"'bert.encoder.layer.0.attention.self.query' is not in GPT2LMHeadModel")


@pytest.mark.parametrize("fmt", ["lorakit", "peft"])
def test_trained_biases_round_trip(convnet, tmp_path, fmt):
    base = copy.deepcopy(convnet)
    lorakit.inject(convnet, ["fc1", "fc2"], r=2, bias="lora_only")
    randomize(convnet)
    with torch.no_grad():
        convnet.fc1.base.bias.add_(1.0)
    x = torch.randn(2, 3, 32, 32)
    expected = convnet(x)
    lorakit.save_adapter(convnet, tmp_path, format=fmt, print_fn=lambda s: None)
    fresh = copy.deepcopy(base)
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh.eval()(x), expected, atol=1e-6, rtol=0)
    assert (expected - base(x)).abs().max() > 1e-3


# ---------------------------------------------------------------- what a save refuses, keeps and checks

@pytest.mark.parametrize("existing", ["adapter_model.safetensors", "adapter_config.json", "adapter_model.bin"])
def test_save_refuses_any_existing_adapter_file_without_overwrite(minilm, tmp_path, existing):
    _, model = trained_minilm(minilm)
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / existing).write_bytes(b"the user's")
    with pytest.raises(FileExistsError, match=f"{existing} already exists; pass overwrite=True"):
        lorakit.save_adapter(model, folder, print_fn=lambda s: None)
    assert [p.name for p in folder.iterdir()] == [existing] and (folder / existing).read_bytes() == b"the user's"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_overwrite_replaces_the_adapter_and_keeps_the_folders_other_files(minilm, tmp_path):
    base, model = trained_minilm(minilm)
    folder = tmp_path / "a"
    lorakit.save_adapter(model, folder, print_fn=lambda s: None)
    (folder / "README.md").write_text("my notes")
    (folder / "adapter_model.bin").write_bytes(b"an old PEFT pickle")
    randomize(model, std=0.08)
    lorakit.save_adapter(model, folder, overwrite=True, print_fn=lambda s: None)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (folder / "README.md").read_text() == "my notes"
    fresh = copy.deepcopy(base)
    lorakit.load_adapter(fresh, folder)
    assert torch.equal(fresh(TOKENS).logits, model(TOKENS).logits)


def test_save_refuses_non_finite_adapter_weights(minilm, tmp_path):
    _, model = trained_minilm(minilm)
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.value.adapters["default"].lora_b[0, 0] = float("nan")
    with pytest.raises(AdapterFileError, match=r"layer.1.attention.self.value.lora_b holds non-finite values"):
        lorakit.save_adapter(model, tmp_path / "a", print_fn=lambda s: None)
    assert not (tmp_path / "a").exists()


def test_non_finite_check_is_exact_where_a_sum_overflows():
    """The check sums each tensor first; a sum that overflows (huge but finite values) must not refuse it."""
    from lorakit.tensorfile import first_non_finite

    big = torch.full((4,), 3e38)
    assert first_non_finite({"big": big, "half": big.half().clamp(-6e4, 6e4), "empty": torch.empty(0)}) is None
    assert first_non_finite({"big": big, "nan": torch.tensor([1.0, float("nan")])}) == "nan"
    assert first_non_finite({"ok": torch.ones(3), "inf": torch.tensor([float("-inf")]).bfloat16()}) == "inf"


def test_tensors_that_share_memory_are_saved(tmp_path):
    """A module trained in full whose parameters are tied (two names, one tensor) still saves and loads."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"body": torch.nn.Linear(8, 8), "head": torch.nn.Sequential(
            torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))})
        model["head"][1].weight = model["head"][0].weight
        model.forward = lambda x: model["head"](model["body"](x))
        return model

    model, x = build(), torch.randn(3, 8)
    lorakit.inject(model, ["body"], r=2, modules_to_save=["head"])
    randomize(model)
    with torch.no_grad():
        model["head"].adapters["default"][0].weight.add_(1.0)
    lorakit.save_adapter(model, tmp_path / "a", print_fn=lambda s: None)
    fresh = build()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(x), model(x)) and not torch.equal(fresh(x), build()(x))


def test_hot_swap_with_another_rank_is_refused_and_changes_nothing(minilm, tmp_path):
    base, model = trained_minilm(minilm)
    lorakit.save_adapter(model, tmp_path / "r8", print_fn=lambda s: None)
    other = copy.deepcopy(base)
    lorakit.inject(other, ["query", "value"], r=4, alpha=64)
    randomize(other)
    lorakit.save_adapter(other, tmp_path / "r4", print_fn=lambda s: None)
    fresh = copy.deepcopy(base)
    lorakit.load_adapter(fresh, tmp_path / "r8", name="live")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    scales = [m.scale for m in fresh.modules() if isinstance(m, lorakit.LoraAdapter)]
    logits = fresh(TOKENS).logits
    with pytest.raises(AdapterFileError, match=r"cannot hot-swap 'live' .* has r=4, slices=None in the file but r=8"):
        lorakit.hot_swap(fresh, tmp_path / "r4", "live")
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    assert [m.scale for m in fresh.modules() if isinstance(m, lorakit.LoraAdapter)] == scales
    assert torch.equal(fresh(TOKENS).logits, logits)


def test_lorakit_peft_export_carries_the_base_fingerprint(minilm, tmp_path):
    """PEFT ignores the weights file's metadata; lorakit puts its fingerprint there and checks it."""
    base, model = trained_minilm(minilm)
    lorakit.save_adapter(model, tmp_path / "p", format="peft", print_fn=lambda s: None)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.bert.encoder.layer[0].attention.self.query.weight.add_(0.01)  # same shapes, other weights
    assert_refused(other, tmp_path / "p", "was trained on a different base model")
    with pytest.warns(BaseMismatch, match="loading anyway because force=True"):
        lorakit.load_adapter(other, tmp_path / "p", force=True)
    fresh = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own base: no warning at all
        lorakit.load_adapter(fresh, tmp_path / "p")
    assert torch.equal(fresh(TOKENS).logits, model(TOKENS).logits)


@pytest.mark.parametrize("fmt, key", [("lorakit", "alpha"), ("peft", "lora_alpha")])
def test_editing_alpha_after_saving_is_refused(minilm, tmp_path, fmt, key):
    base, model = trained_minilm(minilm)
    lorakit.save_adapter(model, tmp_path / "a", format=fmt, print_fn=lambda s: None)
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    if fmt == "lorakit":
        for layer in config["layers"].values():
            layer[key] = 800
    else:
        config[key] = 800
    path.write_text(json.dumps(config))
    assert_refused(copy.deepcopy(base), tmp_path / "a", "does not match the settings adapter_model.safetensors was saved with")


def test_a_file_whose_layers_overlap_its_modules_to_save_is_refused(minilm, tmp_path):
    base, model = trained_minilm(minilm)
    lorakit.save_adapter(model, tmp_path / "a", format="peft", print_fn=lambda s: None)
    path = tmp_path / "a"
    from safetensors.torch import save_file

    tensors = load_file(path / "adapter_model.safetensors")
    inner = "bert.encoder.layer.0.attention.self"
    tensors.update({f"base_model.model.{inner}.{k}": v.clone() for k, v in base.get_submodule(inner).state_dict().items()})
    save_file(tensors, path / "adapter_model.safetensors")
    config = json.loads((path / "adapter_config.json").read_text())
    config["modules_to_save"] = ["layer.0.attention.self"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UnverifiedBase):
        assert_refused(copy.deepcopy(base), path, f"modules_to_save '{inner}' contains the LoRA target '{inner}.query'")


def test_prepare_changes_nothing_and_attach_equals_load(minilm, tmp_path):
    """prepare_adapter checks and builds without touching the model; attach_adapter then gives exactly what
    load_adapter gives (and differs from the base), with the adapter frozen."""
    from lorakit.files import attach_adapter, prepare_adapter, read_adapter

    base, model = trained_minilm(minilm, modules_to_save=["classifier"])
    lorakit.save_adapter(model, path := tmp_path / "a", print_fn=lambda s: None)
    loaded = copy.deepcopy(base)
    lorakit.load_adapter(loaded, path)
    fresh = copy.deepcopy(base)
    state = plain_state(fresh)
    prepared = prepare_adapter(fresh, read_adapter(path), "a")
    assert_untouched(fresh, state)
    attach_adapter(fresh, prepared)
    out = fresh(TOKENS).logits
    assert torch.equal(out, loaded(TOKENS).logits) and not torch.allclose(out, base(TOKENS).logits)
    assert lorakit.active_adapter(fresh) == "a" and not any(p.requires_grad for p in fresh.parameters())


def test_attach_refuses_a_taken_name_or_a_replaced_module_and_changes_nothing(minilm, tmp_path):
    from lorakit.files import attach_adapter, prepare_adapter, read_adapter

    base, model = trained_minilm(minilm)
    lorakit.save_adapter(model, path := tmp_path / "a", print_fn=lambda s: None)
    fresh = copy.deepcopy(base)
    first, second = (prepare_adapter(fresh, read_adapter(path), "a") for _ in range(2))
    attach_adapter(fresh, first)
    state = plain_state(fresh)
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        attach_adapter(fresh, second)
    assert plain_state(fresh).keys() == state.keys()
    other = copy.deepcopy(base)
    prepared = prepare_adapter(other, read_adapter(path), "b")
    layer = "bert.encoder.layer.0.attention.self.query"
    parent, child = layer.rsplit(".", 1)
    setattr(other.get_submodule(parent), child, torch.nn.Linear(384, 384))
    with pytest.raises(ValueError, match="was replaced after adapter 'b' was prepared"):
        attach_adapter(other, prepared)
    assert not any(isinstance(m, LoraLayer) for m in other.modules())


# ---------------------------------------------------------------- per-layer ranks, LoRA-FA


def test_per_layer_ranks_and_alphas_round_trip(tiny_llama, tmp_path):
    base = copy.deepcopy(tiny_llama)
    lorakit.inject(tiny_llama, ["q_proj", "v_proj"], r=4, alpha=8, rank_pattern={r"layers\.1\.self_attn\.q_proj": 8},
                   alpha_pattern={"v_proj": 2})
    randomize(tiny_llama)
    ids = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = tiny_llama(ids).logits
    lorakit.save_adapter(tiny_llama, tmp_path, print_fn=lambda s: None)
    spec = lorakit.read_adapter(tmp_path)
    assert {n.removeprefix("model.layers."): (c.r, c.alpha) for n, (c, _) in spec.layers.items()} == {
        "0.self_attn.q_proj": (4, 8), "0.self_attn.v_proj": (4, 2), "1.self_attn.q_proj": (8, 8),
        "1.self_attn.v_proj": (4, 2)}
    fresh = copy.deepcopy(base)
    lorakit.load_adapter(fresh, tmp_path)
    got = fresh(ids).logits
    assert torch.equal(got, expected) and (got - base(ids).logits).abs().max() > 1e-2


def test_train_a_is_recorded_and_leaves_the_settings_digest_as_it_was(tiny_llama, tmp_path):
    """A LoRA-FA adapter computes what any adapter with its weights computes: its file has the digest of the same
    adapter trained in full, so any lorakit loads it (an older one ignores lora.train_a); loaded to train, A stays
    frozen."""
    from lorakit.files import SETTINGS_KEY

    lorakit.inject(tiny_llama, ["q_proj", "v_proj"], r=4, train_a=False)
    randomize(tiny_llama)
    lorakit.save_adapter(tiny_llama, tmp_path / "fa", print_fn=lambda s: None)
    for _, layer in lorakit.lora_layers(tiny_llama):
        adapter = layer.adapters["default"]
        adapter.config = dataclasses.replace(adapter.config, train_a=True)
    lorakit.save_adapter(tiny_llama, tmp_path / "full", print_fn=lambda s: None)
    assert json.loads((tmp_path / "fa" / "adapter_config.json").read_text())["lora"]["train_a"] is False
    digests = [safe_open_metadata(tmp_path / d / "adapter_model.safetensors")[SETTINGS_KEY] for d in ("fa", "full")]
    assert digests[0] == digests[1]
    fresh = make_tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "fa", trainable=True)
    adapters = [layer.adapters["default"] for _, layer in lorakit.lora_layers(fresh)]
    assert not any(a.lora_a.requires_grad for a in adapters) and all(a.lora_b.requires_grad for a in adapters)
    config_path = tmp_path / "fa" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["lora"]["train_a"]  # as a lorakit that predates train_a reads it: A trains again
    config_path.write_text(json.dumps(config))
    fresh = make_tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "fa", trainable=True)
    assert all(layer.adapters["default"].lora_a.requires_grad for _, layer in lorakit.lora_layers(fresh))


def safe_open_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ---------------------------------------------------------------- files written by earlier versions

DATA = Path(__file__).parent / "data"


class Tiny(nn.Module):
    """The base of the files in tests/data/adapter-v1.1, its weights a fixed function of their position."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.copy_(torch.sin(torch.arange(p.numel(), dtype=torch.float32) * 0.7 + i).view(p.shape) * 0.5)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.embed(ids))))


@pytest.mark.parametrize("fmt", ["lorakit", "peft"])
def test_files_saved_by_format_1_1_still_load_and_compute_what_they_did(fmt):
    """tests/data/adapter-v1.1 was written by lorakit 0.1.0 (format 1.1, before per-layer patterns and train_a):
    fc1 and fc2 at r=2, alpha=3, and the logits the adapted model gave then. The settings digest in its weights
    file must still equal the one computed now, and the adapter must give those logits."""
    expected = json.loads((DATA / "adapter-v1.1" / "expected.json").read_text())
    ids, logits = torch.tensor(expected["ids"]), torch.tensor(expected["logits"])
    model = Tiny().eval()
    with torch.no_grad():
        assert (model(ids) - logits).abs().max() > 1e-2
    lorakit.load_adapter(model, DATA / "adapter-v1.1" / fmt)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), logits, atol=1e-6, rtol=0)
    assert {layer.adapters["default"].config.r for _, layer in lorakit.lora_layers(model)} == {2}

"""PiSSA and OLoRA: A, B and the residual W0 equal PEFT's; the initialisation changes nothing; a trained adapter
saved for the original base (rank 2r) gives the trained model's logits on a fresh base, in lorakit and in PEFT;
the residual form belongs on the residual base only; deleting the adapter gives W0 back; what cannot be is
refused before anything changes."""

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
from packaging.version import Version
from conftest import make_tiny_llama

import lorakit
from lorakit import LoraAdapter
from lorakit.files import AdapterFileError

LLAMA = ["q_proj", "v_proj", "down_proj"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def nudge(model, seed=3, std=0.05):
    """Move every adapter's A and B as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraAdapter):
                m.lora_a.add_(torch.randn(m.lora_a.shape, generator=g) * std)
                m.lora_b.add_(torch.randn(m.lora_b.shape, generator=g) * std)


def assert_same_as_peft(ours, twin, atol=0.0):
    inner = twin.base_model.model
    compared = 0
    for name, layer in lorakit.lora_layers(ours):
        theirs, mine = inner.get_submodule(name), layer.adapters["default"]
        torch.testing.assert_close(mine.lora_a, theirs.lora_A["default"].weight, atol=atol, rtol=0)
        torch.testing.assert_close(mine.lora_b, theirs.lora_B["default"].weight, atol=atol, rtol=0)
        torch.testing.assert_close(layer.base.weight, theirs.base_layer.weight, atol=atol, rtol=0)
        compared += 1
    assert compared


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_tiny_llama_init_equals_peft_and_changes_nothing(init):
    base = make_tiny_llama()
    ids = torch.randint(0, 120, (2, 9))
    before = logits(base, ids)
    ours = copy.deepcopy(base)
    lorakit.inject(ours, LLAMA, r=4, alpha=8, init=init)
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA,
                                                                     init_lora_weights=init))
    assert_same_as_peft(ours, twin)
    q = ours.model.layers[0].self_attn.q_proj
    assert (q.base.weight - base.model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-2  # W0 is a residual
    torch.testing.assert_close(logits(ours, ids), before, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(twin, ids), logits(ours, ids), atol=1e-6, rtol=0)
    ours.train(), twin.train()
    F.cross_entropy(ours(ids).logits.flatten(0, 1), ids.flatten()).backward()
    F.cross_entropy(twin(input_ids=ids).logits.flatten(0, 1), ids.flatten()).backward()
    inner = twin.base_model.model
    for name, layer in lorakit.lora_layers(ours):
        mine, theirs = layer.adapters["default"], inner.get_submodule(name)
        torch.testing.assert_close(mine.lora_a.grad, theirs.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.lora_b.grad, theirs.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
        assert mine.lora_b.grad.abs().max() > 0


def test_minilm_pissa_equals_peft(minilm):
    tokens = {"input_ids": torch.randint(1000, 5000, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    base = copy.deepcopy(minilm)
    before = minilm(**tokens).logits
    lorakit.inject(minilm, ["query", "value"], r=8, alpha=16, init="pissa")
    twin = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                     init_lora_weights="pissa"))
    assert_same_as_peft(minilm, twin)
    torch.testing.assert_close(minilm(**tokens).logits, before, atol=1e-5, rtol=0)
    nudge(minilm)
    for name, layer in lorakit.lora_layers(minilm):  # the same training step in both
        theirs = twin.base_model.model.get_submodule(name)
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(layer.adapters["default"].lora_a)
            theirs.lora_B["default"].weight.copy_(layer.adapters["default"].lora_b)
    ours = minilm(**tokens).logits
    torch.testing.assert_close(ours, twin(**tokens).logits, atol=1e-5, rtol=0)
    assert (ours - before).abs().max() > 1e-3


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_gpt2_conv1d_init_equals_peft(tiny_gpt2, init):
    """GPT-2's Conv1D stores (in, out): factorised in the Linear layout, as PEFT does with fan_in_fan_out."""
    if init == "olora" and Version(peft.__version__) < Version("0.22"):
        pytest.skip("PEFT before 0.22 builds OLoRA's A for a Conv1D in the stored (in, out) layout: (r, out), "
                    "which its own forward cannot multiply")
    base = copy.deepcopy(tiny_gpt2)
    ids = torch.randint(0, 100, (2, 12))
    lorakit.inject(tiny_gpt2, ["c_fc"], r=4, alpha=8, init=init)
    twin = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc"], fan_in_fan_out=True,
                                                     init_lora_weights=init))
    assert_same_as_peft(tiny_gpt2, twin)
    torch.testing.assert_close(logits(tiny_gpt2, ids), logits(twin, ids), atol=1e-5, rtol=0)


def test_pissa_niter_approximates_the_top_singular_directions():
    base = make_tiny_llama()
    ids = torch.randint(0, 120, (2, 9))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a spectrum that falls off after 4 directions, as pretrained weights' do
        for layer in base.model.layers:
            w = layer.mlp.down_proj.weight
            w.copy_(torch.randn(w.shape[0], 4, generator=g) @ torch.randn(4, w.shape[1], generator=g) * 0.1 + w * 0.1)
    exact, fast = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.inject(exact, ["down_proj"], r=4, init="pissa")
    lorakit.inject(fast, ["down_proj"], r=4, init="pissa_niter_8")
    for (_, e), (_, f) in zip(lorakit.lora_layers(exact), lorakit.lora_layers(fast)):
        top, approx = e.adapters["default"].delta_weight(), f.adapters["default"].delta_weight()
        assert (approx - top).norm() < 0.05 * top.norm()
    torch.testing.assert_close(logits(fast, ids), logits(base, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init, dora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_trained_adapter_saved_for_the_original_base_loads_on_a_fresh_base(tmp_path, init, dora):
    """s·[B, −B0]·[A; A0]: a plain LoRA (DoRA) of rank 2r, read by lorakit and by PEFT on an unmodified base."""
    ids = torch.randint(0, 120, (2, 9))
    base_logits = logits(make_tiny_llama(), ids)
    model = make_tiny_llama()
    lorakit.inject(model, LLAMA, r=4, alpha=8, init=init, dora=dora)
    nudge(model)
    trained = logits(model, ids)
    assert (trained - base_logits).abs().max() > 1e-2
    for fmt in ("lorakit", "peft"):
        lorakit.save_adapter(model, tmp_path / fmt, format=fmt, print_fn=lambda s: None)
        fresh = make_tiny_llama()
        lorakit.load_adapter(fresh, tmp_path / fmt)
        torch.testing.assert_close(logits(fresh, ids), trained, atol=1e-5, rtol=0)
        q = fresh.model.layers[0].self_attn.q_proj.adapters["default"]
        assert q.config.r == 8 and q.config.init == "kaiming" and q.scale == 2.0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(theirs, ids), trained, atol=1e-5, rtol=0)


def test_residual_form_loads_on_the_residual_base_only(tmp_path):
    ids = torch.randint(0, 120, (2, 9))
    model = make_tiny_llama()
    lorakit.inject(model, LLAMA, r=4, alpha=8, init="pissa")
    nudge(model)
    trained = logits(model, ids)
    lorakit.save_adapter(model, tmp_path / "res", residual_form=True, print_fn=lambda s: None)
    config = json.loads((tmp_path / "res" / "adapter_config.json").read_text())
    assert config["lora"]["init"] == "pissa" and config["layers"][f"model.layers.0.self_attn.q_proj"]["r"] == 4
    residual_base = make_tiny_llama()
    with torch.no_grad():
        for name, layer in lorakit.lora_layers(model):
            residual_base.get_submodule(name).weight.copy_(layer.base.weight)
    lorakit.load_adapter(residual_base, tmp_path / "res")
    torch.testing.assert_close(logits(residual_base, ids), trained, atol=1e-6, rtol=0)
    with pytest.raises(AdapterFileError, match="trained on a different base model"):
        lorakit.load_adapter(make_tiny_llama(), tmp_path / "res")


def test_delete_gives_w0_back_and_merge_is_exact():
    base = make_tiny_llama()
    ids = torch.randint(0, 120, (2, 9))
    model = copy.deepcopy(base)
    lorakit.inject(model, LLAMA, r=4, alpha=8, init="olora")
    nudge(model)
    unmerged = logits(model, ids)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    for refused in (lambda: lorakit.disable_adapters(model),
                    lambda: lorakit.mixed_batch(model, ["default", None]).__enter__()):
        with pytest.raises(ValueError, match="left their layers' W0 a residual"):
            refused()
    with lorakit.mixed_batch(model, ["default", "default"]):
        torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    lorakit.delete_adapter(model, "default")
    for name, layer in lorakit.lora_layers(model):
        torch.testing.assert_close(layer.base.weight, base.get_submodule(name).weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-5, rtol=0)


def test_what_a_residual_init_cannot_do_is_refused_before_anything_changes(tiny_gpt2, tmp_path):
    from conftest import assert_untouched, plain_state

    state = plain_state(tiny_gpt2)
    for targets, what in ((["wte"], "not a embedding layer"), ({"c_attn": ("q", "v")}, "not output slices")):
        with pytest.raises(TypeError, match=what):
            lorakit.inject(tiny_gpt2, targets, r=4, init="pissa")
    for bad in ("pissa_niter_0", "svd", "PiSSA"):
        with pytest.raises(ValueError, match="init must be one of"):
            lorakit.inject(tiny_gpt2, ["c_fc"], r=4, init=bad)
    assert_untouched(tiny_gpt2, state)
    lorakit.inject(tiny_gpt2, ["c_fc"], r=4, adapter="plain")
    with pytest.raises(ValueError, match="already has adapters \\(plain\\) trained against W0"):
        lorakit.inject(tiny_gpt2, ["c_fc"], r=4, init="olora", adapter="o")
    lorakit.inject(tiny_gpt2, ["c_proj"], r=4, init="pissa", adapter="p")
    lorakit.save_adapter(tiny_gpt2, tmp_path / "p", adapter="p", print_fn=lambda s: None)
    with pytest.raises(ValueError, match="residual that adapter 'p''s pissa initialisation left"):
        lorakit.inject(tiny_gpt2, ["c_proj"], r=4, adapter="later")
    with pytest.raises(AdapterFileError, match="residual that adapter 'p''s pissa initialisation left"):
        lorakit.load_adapter(tiny_gpt2, tmp_path / "p", name="again")
    assert sorted(lorakit.list_adapters(tiny_gpt2)) == ["p", "plain"]
    with pytest.raises(ValueError, match="residual_form is for adapters initialised by PiSSA or OLoRA"):
        lorakit.save_adapter(tiny_gpt2, tmp_path / "no", adapter="plain", residual_form=True)
    lorakit.delete_adapter(tiny_gpt2, "p")
    for i in range(2):
        key = f"transformer.h.{i}.attn.c_proj.weight"
        torch.testing.assert_close(tiny_gpt2.get_parameter(key.replace("weight", "base.weight")), state[key],
                                   atol=1e-6, rtol=0)


def test_train_with_pissa_from_the_cli_and_evaluate_the_run(reviews, tmp_path, capsys):
    from test_cli import run_cli, tiny_args

    run = tmp_path / "run"
    code, out, err = run_cli(tiny_args(reviews, run, "--lora.init", "pissa", "--train.epochs", "1",
                                       "--lora.dropout", "0"), capsys)
    assert code == 0, err
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["lora"]["init"] == "kaiming" and {v["r"] for v in config["layers"].values()} == {8}
    code, out, _ = run_cli(["eval", str(run)], capsys)
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(final["accuracy"])
    code, _, err = run_cli(tiny_args(reviews, tmp_path / "bad", "--lora.init", "pissa_niter_x"), capsys)
    assert code == 2 and err.count("\n") == 1 and "lora.init must be one of" in err

"""lorakit against Hugging Face PEFT with identical weights: same logits, same LoRA gradients."""

import copy

import pytest
import torch

import lorakit

peft = pytest.importorskip("peft")

from conftest import randomize  # noqa: E402


def peft_twin(model, lora_model, **peft_kwargs):
    """A PEFT model over a copy of `model`, its A and B copied from lorakit's `lora_model`."""
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**peft_kwargs))
    inner = twin.base_model.model
    for name, layer in lorakit.lora_layers(lora_model):
        ours, theirs = layer.adapters["default"], inner.get_submodule(name)
        with torch.no_grad():
            if layer.geometry.kind == "embedding":
                theirs.lora_embedding_A["default"].copy_(ours.lora_a)
                theirs.lora_embedding_B["default"].copy_(ours.lora_b)
            else:
                theirs.lora_A["default"].weight.copy_(ours.lora_a)
                theirs.lora_B["default"].weight.copy_(ours.lora_b.view_as(theirs.lora_B["default"].weight))
    return twin


def assert_same_grads(lora_model, twin):
    inner = twin.base_model.model
    pairs = 0
    for name, layer in lorakit.lora_layers(lora_model):
        ours, theirs = layer.adapters["default"], inner.get_submodule(name)
        if layer.geometry.kind == "embedding":
            their_a, their_b = theirs.lora_embedding_A["default"].grad, theirs.lora_embedding_B["default"].grad
        else:
            their_a, their_b = theirs.lora_A["default"].weight.grad, theirs.lora_B["default"].weight.grad
        torch.testing.assert_close(ours.lora_a.grad, their_a.view_as(ours.lora_a), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.lora_b.grad, their_b.view_as(ours.lora_b), atol=1e-5, rtol=1e-4)
        assert ours.lora_a.grad.abs().max() > 0 and ours.lora_b.grad.abs().max() > 0
        pairs += 1
    assert pairs > 0


@pytest.mark.parametrize("rslora", [False, True])
def test_minilm_query_value_matches_peft(minilm, rslora):
    tokens = {"input_ids": torch.randint(1000, 5000, (3, 16)), "attention_mask": torch.ones(3, 16, dtype=torch.long)}
    labels = torch.tensor([0, 1, 1])
    base_logits = minilm(**tokens).logits
    base = copy.deepcopy(minilm)

    report = lorakit.inject(minilm, ["query", "value"], r=8, alpha=16, rslora=rslora)
    assert len(report.replaced) == 12
    randomize(minilm, std=0.05)
    twin = peft_twin(base, minilm, r=8, lora_alpha=16, use_rslora=rslora, target_modules=["query", "value"],
                     lora_dropout=0.0)

    ours = minilm(**tokens, labels=labels)
    theirs = twin(**tokens, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert (ours.logits - base_logits).abs().max() > 1e-3
    ours.loss.backward()
    theirs.loss.backward()
    assert_same_grads(minilm, twin)


@pytest.mark.parametrize("target, extra", [("c_attn", {"fan_in_fan_out": True}), ("wte", {})])
def test_gpt2_matches_peft(tiny_gpt2, target, extra):
    """GPT-2's fused Conv1D c_attn (stored transposed) and its token embedding."""
    ids = torch.randint(0, 100, (2, 20))
    base_logits = tiny_gpt2(ids).logits
    base = copy.deepcopy(tiny_gpt2)
    lorakit.inject(tiny_gpt2, [target], r=4, alpha=8)
    randomize(tiny_gpt2)
    twin = peft_twin(base, tiny_gpt2, r=4, lora_alpha=8, target_modules=[target], **extra)

    ours, theirs = tiny_gpt2(ids, labels=ids), twin(input_ids=ids, labels=ids)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert (ours.logits - base_logits).abs().max() > 1e-2
    ours.loss.backward()
    theirs.loss.backward()
    assert_same_grads(tiny_gpt2, twin)


def test_convnet_conv2d_and_linear_match_peft(convnet):
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    base_out = convnet(x)
    base = copy.deepcopy(convnet)
    lorakit.inject(convnet, ["conv1", "conv2", "fc1", "fc2"], r=3, alpha=6)
    randomize(convnet)
    twin = peft_twin(base, convnet, r=3, lora_alpha=6, target_modules=["conv1", "conv2", "fc1", "fc2"])
    ours, theirs = convnet(x), twin(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - base_out).abs().max() > 1e-2
    torch.nn.functional.cross_entropy(ours, y).backward()
    torch.nn.functional.cross_entropy(theirs, y).backward()
    assert_same_grads(convnet, twin)


def test_trainable_counts_match_peft(minilm):
    base = copy.deepcopy(minilm)
    lorakit.inject(minilm, ["query", "value"], r=8)
    ours = lorakit.summary(minilm, print_fn=lambda s: None)
    twin = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["query", "value"]))
    trainable, total = twin.get_nb_trainable_parameters()
    assert (ours.trainable, ours.total) == (trainable, total) == (73_728, ours.total)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_residual_form_adapter_is_refused_and_its_conversion_loads_exactly(tiny_llama, tmp_path, init):
    """A PEFT PiSSA/OLoRA adapter saved as trained belongs on the residual base its initialisation made:
    load_adapter refuses it, saying so, rather than give wrong logits on the original base. PEFT's converted
    save (path_initial_model_for_weight_conversion: rank 2r, for the original base) loads, and lorakit on a
    fresh unmodified base gives the trained residual model's logits."""
    from conftest import make_tiny_llama

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=init)
    model = peft.get_peft_model(tiny_llama, config)
    model.peft_config["default"].init_lora_weights = True  # the initial adapter, saved for the conversion
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = init
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training": the adapter moves away from its initial value
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(0, 120, (2, 7), generator=g)
    with torch.no_grad():
        trained = model(ids).logits
    model.save_pretrained(tmp_path / "residual")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))

    base = make_tiny_llama()
    with torch.no_grad():
        plain = base(ids).logits
    with pytest.raises(lorakit.AdapterFileError, match=f"init_lora_weights='{init}'.*residual base"):
        lorakit.load_adapter(base, tmp_path / "residual")
    assert not any(isinstance(m, lorakit.LoraLayer) for m in base.modules())  # nothing changed
    lorakit.load_adapter(base, tmp_path / "converted")
    with torch.no_grad():
        ours = base(ids).logits
    torch.testing.assert_close(ours, trained, atol=1e-5, rtol=0)
    assert (ours - plain).abs().max() > 1e-3

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

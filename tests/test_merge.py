"""Merge: merged equals unmerged, unmerge restores W0, merge_and_unload gives back the base model."""

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraLayer

from conftest import ConvNet, randomize


def adapted_gpt2(model):
    lorakit.inject(model, ["c_fc", "wpe", {"c_attn": ("q", "v")}], r=4, alpha=8)
    randomize(model)
    return model


def test_merged_equals_unmerged_and_unmerge_restores_w0(tiny_gpt2):
    ids = torch.randint(0, 100, (2, 12))
    base_logits = tiny_gpt2(ids).logits
    w0 = {n: p.clone() for n, p in tiny_gpt2.named_parameters()}
    model = adapted_gpt2(tiny_gpt2)
    unmerged = model(ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-2

    lorakit.merge(model)
    merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    attn = model.transformer.h[0].attn.c_attn.base.weight
    assert (attn - w0["transformer.h.0.attn.c_attn.weight"]).abs().max() > 1e-3

    lorakit.unmerge(model)
    for name, layer in lorakit.lora_layers(model):
        torch.testing.assert_close(layer.base.weight, w0[f"{name}.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)


def test_merge_twice_is_a_no_op(tiny_gpt2):
    model = adapted_gpt2(tiny_gpt2)
    lorakit.merge(model)
    once = {n: p.clone() for n, p in model.named_parameters()}
    lorakit.merge(model)
    assert all(torch.equal(p, once[n]) for n, p in model.named_parameters())


def test_merge_convnet_conv2d_and_linear(convnet):
    x = torch.randn(4, 3, 32, 32)
    y0 = convnet(x)
    lorakit.inject(convnet, ["conv1", "conv2", "fc1", "fc2", "fc3"], r=3, alpha=6)
    randomize(convnet)
    unmerged = convnet(x)
    assert (unmerged - y0).abs().max() > 1e-2
    lorakit.merge(convnet)
    torch.testing.assert_close(convnet(x), unmerged, atol=1e-5, rtol=0)


def test_merge_and_unload_loads_strictly_into_a_fresh_base(tiny_gpt2):
    from transformers import GPT2LMHeadModel

    ids = torch.randint(0, 100, (2, 12))
    base_logits = tiny_gpt2(ids).logits
    model = adapted_gpt2(tiny_gpt2)
    adapted = model(ids).logits
    unloaded = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in unloaded.modules())
    assert type(unloaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"

    fresh = GPT2LMHeadModel(tiny_gpt2.config).eval()
    fresh.load_state_dict(unloaded.state_dict(), strict=True)
    torch.testing.assert_close(fresh(ids).logits, adapted, atol=1e-5, rtol=0)
    assert (fresh(ids).logits - base_logits).abs().max() > 1e-2


def test_merge_and_unload_convnet_state_dict_strict(convnet):
    lorakit.inject(convnet, ["fc1", "conv2"], r=2)
    randomize(convnet)
    x = torch.randn(2, 3, 32, 32)
    expected = convnet(x)
    plain = lorakit.merge_and_unload(convnet)
    fresh = ConvNet()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=0)


def test_merge_in_fp32_over_bf16_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    w0 = model[0].weight.float().clone()
    lorakit.inject(model, ["0"], r=4)
    randomize(model, std=0.01)
    delta = model[0].adapters["default"].delta_weight()
    lorakit.merge(model)
    assert model[0].base.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model[0].base.weight.float(), (w0 + delta).to(torch.bfloat16).float(), atol=0, rtol=0)


def test_merge_refuses_tied_weights(tiny_gpt2):
    lorakit.inject(tiny_gpt2, ["wte", "c_fc"], r=2)
    randomize(tiny_gpt2)
    before = tiny_gpt2.lm_head.weight.clone()
    with pytest.raises(ValueError, match=r"cannot merge into 'transformer.wte': its weight is shared with lm_head"):
        lorakit.merge(tiny_gpt2)
    assert torch.equal(tiny_gpt2.lm_head.weight, before)
    assert all(not layer.merged for _, layer in lorakit.lora_layers(tiny_gpt2))


def test_merge_without_lora_layers_is_an_error():
    with pytest.raises(ValueError, match="Sequential has no LoRA layers; call lorakit.inject first"):
        lorakit.merge(nn.Sequential(nn.Linear(2, 2)))


def test_merge_unknown_adapter_is_an_error(convnet):
    lorakit.inject(convnet, ["fc1"], r=2)
    with pytest.raises(ValueError, match="layer 'fc1' has no adapter 'other'; it has: default"):
        lorakit.merge(convnet, "other")


def test_training_after_unmerge_still_works(convnet):
    lorakit.inject(convnet, ["fc1"], r=2)
    randomize(convnet)
    lorakit.merge(convnet)
    lorakit.unmerge(convnet)
    x = torch.randn(2, 3, 32, 32)
    convnet(x).sum().backward()
    assert convnet.fc1.adapters["default"].lora_a.grad.abs().sum() > 0
    assert convnet.fc1.base.weight.grad is None
    copy.deepcopy(convnet)  # a LoRA model stays deep-copyable

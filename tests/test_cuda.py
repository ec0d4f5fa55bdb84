"""The parity checks again on a CUDA GPU, where a LoRA Linear trains through plain autograd ops: the
update and its gradients, dropout, a bf16 base, merge, mixed batches and QLoRA. Skipped where torch sees
no GPU (CI); run them on a GPU machine."""

import copy

import pytest
import torch
from conftest import make_tiny_llama, randomize
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraLayer
from test_layers import reference
from test_quant import dequantized_twin

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_linear(n_in: int, n_out: int, dtype: torch.dtype, **config) -> tuple[LoraLayer, lorakit.LoraAdapter]:
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(n_in, n_out).to(CUDA, dtype))
    a = layer.add("default", LoraConfig(**config))
    with torch.no_grad():
        a.lora_a.normal_(std=0.3)
        a.lora_b.normal_(std=0.3)
    return layer, a


def test_lora_on_cuda_equals_the_dense_formula_with_gradients():
    layer, a = lora_linear(48, 40, torch.float64, r=4, alpha=8)
    x = torch.randn(6, 9, 48, device=CUDA, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    want = reference(layer, x, None, 0.0)
    assert out.device.type == CUDA and (out - layer.base(x)).abs().max() > 0.1
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, a.lora_a, a.lora_b), g)
    ref = torch.autograd.grad(want, (x, a.lora_a, a.lora_b), g)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)


def test_dropout_on_cuda_uses_the_mask_it_drew():
    """Square invertible A and B, so the dropped input can be read back from the output."""
    n, p = 8, 0.25
    layer, a = lora_linear(n, n, torch.float64, r=n, alpha=4, dropout=p)
    layer.train()
    x = (torch.rand(300, n, device=CUDA, dtype=torch.float64) + 0.5).requires_grad_()
    torch.manual_seed(3)
    out = layer(x)
    p = round(p * 65536) / 65536
    with torch.no_grad():
        xd = ((out - layer.base(x)) / a.scale) @ torch.linalg.inv(a.lora_b.T) @ torch.linalg.inv(a.lora_a.T)
    keep = xd.abs() > 1e-6
    assert abs((1 - keep.double().mean()).item() - p) < 0.05
    want = reference(layer, x, keep, p)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    g = torch.randn_like(out)
    for u, v in zip(torch.autograd.grad(out, (x, a.lora_a, a.lora_b), g),
                    torch.autograd.grad(want, (x, a.lora_a, a.lora_b), g)):
        torch.testing.assert_close(u, v, atol=1e-10, rtol=0)


def test_bf16_base_with_fp32_adapters_on_cuda():
    layer, a = lora_linear(256, 128, torch.bfloat16, r=8, alpha=16)
    x = torch.randn(64, 256, device=CUDA, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and a.lora_a.dtype == torch.float32
    with torch.no_grad():
        w = layer.base.weight.double() + a.scale * a.lora_b.double() @ a.lora_a.double()
        ref = x.double() @ w.T + layer.base.bias.double()
        base = layer.base(x).double()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-2, err
    assert (base - ref).norm() / ref.norm() > 10 * err  # the update is far larger than bf16 rounding
    out.float().sum().backward()
    assert a.lora_a.grad.dtype == torch.float32 and a.lora_b.grad.abs().sum() > 0


def test_merge_and_mixed_batch_on_cuda():
    model = make_tiny_llama(64).to(CUDA)
    x = torch.randint(0, 120, (4, 10), device=CUDA)
    with torch.no_grad():
        base = model(x).logits
    for name in ("a", "b"):
        lorakit.inject(model, list(LLAMA_LINEAR), r=4, alpha=8, adapter=name)
    randomize(model)
    lorakit.set_adapter(model, "a")
    with torch.no_grad():
        outs = {}
        for name in ("a", "b"):
            lorakit.set_adapter(model, name)
            outs[name] = model(x).logits
        with lorakit.mixed_batch(model, ["a", "b", "b", "a"]):
            mixed = model(x).logits
        merged = copy.deepcopy(model)
        lorakit.merge(merged)
        after = merged(x).logits
    assert (outs["a"] - base).abs().max() > 1e-2 and (outs["b"] - outs["a"]).abs().max() > 1e-2
    for i, name in enumerate(["a", "b", "b", "a"]):
        torch.testing.assert_close(mixed[i], outs[name][i], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after, outs["b"], atol=1e-4, rtol=1e-4)


def test_qlora_on_cuda_equals_lora_over_the_dequantized_weights_and_trains():
    pytest.importorskip("bitsandbytes")
    model = make_tiny_llama(64).to(CUDA)
    report = lorakit.quantize_base(model, compute_dtype=torch.bfloat16)
    assert len(report.names) == 14 and model.model.layers[0].mlp.up_proj.weight.device.type == CUDA
    twin = dequantized_twin(model)
    x = torch.randint(0, 120, (2, 12), device=CUDA)
    with torch.no_grad():
        base = model(x).logits.float()
    for m in (model, twin):
        lorakit.inject(m, "all-linear", r=4, alpha=8)
        randomize(m)
    with torch.no_grad(), torch.autocast(CUDA, dtype=torch.bfloat16):
        ours, ref = model(x).logits.float(), twin(x).logits.float()
    assert (ours - base).abs().max() > 1e-2
    assert ((ours - ref).norm() / ref.norm()).item() < 2e-2  # bf16 compute on both sides
    model.train()
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        model(x, labels=x).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

"""LoRA layers against the dense formula W0 + s·B·A, for every supported base kind."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import Geometry, LoraConfig, LoraLayer, kind_of

ATOL = 1e-5


def conv1d(fan_in: int, fan_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(fan_out, fan_in)
    nn.init.normal_(m.weight, std=0.2)
    return m


def bases():
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(12, 10),
        "conv1d": conv1d(12, 10),
        "conv2d": nn.Conv2d(3, 5, 3, stride=2, padding=1),
        "embedding": nn.Embedding(20, 6, padding_idx=0),
    }


def inputs(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if kind == "embedding":
        return torch.randint(0, 20, (4, 9), generator=g)
    if kind == "conv2d":
        return torch.randn(2, 3, 8, 8, generator=g)
    return torch.randn(4, 7, 12, generator=g)


def randomize(layer: LoraLayer) -> None:
    with torch.no_grad():
        for a in layer.adapters.values():
            a.lora_a.normal_(std=0.3)
            a.lora_b.normal_(std=0.3)


def dense(base: nn.Module, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The base layer's own function with W0 + delta in place of W0."""
    w = base.weight + delta
    kind = kind_of(base)
    if kind == "linear":
        return F.linear(x, w, base.bias)
    if kind == "conv1d":
        return x @ w + base.bias
    if kind == "conv2d":
        return F.conv2d(x, w, base.bias, base.stride, base.padding, base.dilation)
    return F.embedding(x, w, base.padding_idx)


def ba_product(layer: LoraLayer) -> torch.Tensor:
    """s·B·A written out independently of LoraAdapter.delta_weight, in the base weight's layout."""
    a = layer.adapters[layer.active]
    A, B, s = a.lora_a.detach(), a.lora_b.detach(), a.scale
    kind = layer.geometry.kind
    if kind == "conv2d":
        return s * torch.einsum("or,rikl->oikl", B, A)
    dw = s * B @ A
    return dw.T if kind in ("conv1d", "embedding") else dw


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding"])
def test_zero_init_equals_base_exactly(kind):
    base = bases()[kind]
    x = inputs(kind)
    y0 = base(x)
    layer = LoraLayer(base)
    layer.add("default", LoraConfig(r=2, alpha=4))
    assert torch.equal(layer(x), y0)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_equals_dense_formula(kind, rslora):
    base = bases()[kind]
    x = inputs(kind)
    y0 = base(x).detach()
    layer = LoraLayer(base)
    layer.add("default", LoraConfig(r=3, alpha=6, rslora=rslora))
    randomize(layer)
    expected = dense(base, ba_product(layer), x)
    got = layer(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - y0).abs().max() > 1e-2
    # delta_weight is the same product
    torch.testing.assert_close(layer.adapters["default"].delta_weight(), ba_product(layer), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_slices_equal_dense_formula_and_leave_other_slices(kind):
    torch.manual_seed(0)
    base = nn.Linear(16, 48) if kind == "linear" else conv1d(16, 48)
    x = torch.randn(3, 5, 16)
    y0 = base(x).detach()
    layer = LoraLayer(base)
    slices = ((0, 16), (32, 48))  # q and v of a fused qkv
    a = layer.add("default", LoraConfig(r=2, alpha=4), slices)
    assert a.lora_a.shape == (4, 16) and a.lora_b.shape == (32, 2)
    randomize(layer)
    A, B, s = a.lora_a.detach(), a.lora_b.detach(), a.scale
    dw = torch.zeros(48, 16)  # (out, in)
    dw[0:16] = s * B[:16] @ A[:2]
    dw[32:48] = s * B[16:] @ A[2:]
    expected = dense(base, dw.T if kind == "conv1d" else dw, x)
    got = layer(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[..., 16:32], y0[..., 16:32], atol=0, rtol=0)  # k untouched
    assert (got[..., :16] - y0[..., :16]).abs().max() > 1e-2
    assert (got[..., 32:] - y0[..., 32:]).abs().max() > 1e-2


def test_default_init_kaiming_uniform_and_b_zero():
    layer = LoraLayer(nn.Linear(400, 50))
    a = layer.add("default", LoraConfig(r=8))
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=√5) on fan_in 400
    assert a.lora_a.abs().max() <= bound and a.lora_a.abs().max() > 0.9 * bound
    assert torch.count_nonzero(a.lora_b) == 0


def test_gaussian_init_std_one_over_r():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(2000, 64))
    a = layer.add("default", LoraConfig(r=4, init="gaussian"))
    assert abs(a.lora_a.std().item() - 0.25) < 0.01
    assert torch.count_nonzero(a.lora_b) == 0


def test_embedding_init_a_zero_b_normal():
    layer = LoraLayer(nn.Embedding(100, 16))
    a = layer.add("default", LoraConfig(r=4))
    assert torch.count_nonzero(a.lora_a) == 0 and a.lora_b.std() > 0.5


def test_scale_alpha_over_r_and_rslora():
    assert LoraConfig(r=8).scale == 1.0
    assert LoraConfig(r=4, alpha=32).scale == 8.0
    assert LoraConfig(r=16, alpha=8, rslora=True).scale == 2.0


def test_dropout_applies_in_training_only():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(32, 32))
    layer.add("default", LoraConfig(r=4, dropout=0.5))
    randomize(layer)
    x = torch.randn(8, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be an integer >= 1, got 0"),
    ({"r": 2.5}, "got 2.5"),
    ({"dropout": -0.1}, "dropout must be in [0, 1), got -0.1"),
    ({"bias": "some"}, "bias must be one of ('none', 'all', 'lora_only'), got 'some'"),
    ({"init": "xavier"}, "got 'xavier'"),
    ({"alpha": -1}, "alpha must be a finite number > 0"),
    ({"alpha": float("inf")}, "alpha must be a finite number > 0 (or None for alpha = r), got inf"),
    ({"alpha": float("nan")}, "alpha must be a finite number > 0 (or None for alpha = r), got nan"),
    ({"alpha": True}, "alpha must be a finite number > 0"),
    ({"dropout": float("nan")}, "dropout must be in [0, 1), got nan"),
    ({"rslora": "yes"}, "rslora must be True or False"),
    ({"train_a": 0}, "train_a must be True or False, got 0"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError) as e:
        LoraConfig(**kwargs)
    assert message in str(e.value)


def test_rank_above_min_dimension_is_refused():
    layer = LoraLayer(nn.Linear(6, 40))
    with pytest.raises(ValueError, match=r"r=7 exceeds min\(in, out\)=6"):
        layer.add("default", LoraConfig(r=7))
    assert len(layer.adapters) == 0


def test_unsupported_module_names_supported_kinds():
    with pytest.raises(TypeError, match="LoRA cannot adapt LayerNorm; supported: Linear, Conv1D"):
        Geometry.of(nn.LayerNorm(4))
    with pytest.raises(TypeError, match="groups=1"):
        Geometry.of(nn.Conv2d(4, 4, 3, groups=2))


def test_gradients_reach_only_a_and_b():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    base.requires_grad_(False)
    layer = LoraLayer(base)
    a = layer.add("default", LoraConfig(r=2))
    layer(torch.randn(3, 8)).sum().backward()
    assert a.lora_b.grad is not None and a.lora_b.grad.abs().sum() > 0
    assert a.lora_a.grad is not None  # zero while B is zero, but computed
    assert base.weight.grad is None


def test_adapters_stay_fp32_over_bf16_base():
    base = nn.Linear(16, 16).to(torch.bfloat16)
    layer = LoraLayer(base)
    a = layer.add("default", LoraConfig(r=4))
    randomize(layer)
    y = layer(torch.randn(2, 16, dtype=torch.bfloat16))
    assert a.lora_a.dtype == torch.float32 and y.dtype == torch.bfloat16


def reference(layer: LoraLayer, x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """y = base(x) + s·up·A·(x ⊙ keep / (1-p)), written with plain autograd ops."""
    a = layer.adapters[layer.active]
    xd = x if keep is None else x * keep / (1 - p)
    return layer.base(x) + a.scale * (xd @ a.lora_a.T) @ a.up().T


def grads(out: torch.Tensor, g: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, g))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_step_gradients_equal_plain_autograd(kind):
    """The fused node's forward and its gradients for x, A and B against plain autograd, dropout 0."""
    base = bases()[kind].double()
    layer = LoraLayer(base)
    a = layer.add("default", LoraConfig(r=3, alpha=6))
    randomize(layer)
    x = inputs(kind).double().requires_grad_()
    out = layer(x)
    want = reference(layer, x, None, 0.0)
    g = torch.randn_like(out)
    assert (out - layer.base(x)).abs().max() > 0.1
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    for got, ref in zip(grads(out, g, x, a.lora_a, a.lora_b), grads(want, g, x, a.lora_a, a.lora_b)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_fused_dropout_gradients_match_the_mask_it_drew():
    """With dropout, the mask the node drew is read back from its output (square, invertible A and B
    in float64) and the gradients must be those of the dense formula with that mask."""
    torch.manual_seed(0)
    p, n = 0.3, 6
    layer = LoraLayer(nn.Linear(n, n).double())
    a = layer.add("default", LoraConfig(r=n, alpha=3, dropout=p))
    randomize(layer)
    x = (torch.rand(50, n, dtype=torch.float64) + 0.5).requires_grad_()  # no zeros: a dropped entry shows
    layer.train()
    p = round(p * 65536) / 65536  # the probability the mask draws with
    out = layer(x)
    with torch.no_grad():  # solve s·(xd Aᵀ) Bᵀ = out − base(x) for xd
        xd = ((out - layer.base(x)) / a.scale) @ torch.linalg.inv(a.lora_b.T) @ torch.linalg.inv(a.lora_a.T)
    keep = xd.abs() > 1e-6
    assert 0.2 < 1 - keep.double().mean() < 0.4  # about p of the entries dropped
    torch.testing.assert_close(xd[keep], (x / (1 - p))[keep].detach(), atol=1e-9, rtol=1e-9)
    want = reference(layer, x, keep, p)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    g = torch.randn_like(out)
    for got, ref in zip(grads(out, g, x, a.lora_a, a.lora_b), grads(want, g, x, a.lora_a, a.lora_b)):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


def test_plain_update_taken_on_gpus_equals_the_fused_node():
    """`plain_update` (the GPU path) against `FusedLinear` (the CPU path) in float64: same output and
    gradients without dropout; with dropout, the formula with the mask F.dropout draws from the same seed."""
    from lorakit.fused import FusedLinear, plain_update

    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 12, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(20, 10, generator=g, dtype=torch.float64)
    a = torch.randn(4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    plain, fused = plain_update(x, y, a, up, 0.5, 0.0), FusedLinear.apply(x, y, a, up, 0.5, None, 0.0)
    assert (plain - y).abs().max() > 0.1
    torch.testing.assert_close(plain, fused, atol=1e-12, rtol=0)
    gout = torch.randn_like(plain)
    for u, v in zip(grads(plain, gout, x, a, up), grads(fused, gout, x, a, up)):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)
    torch.manual_seed(0)
    xd = F.dropout(x, 0.3, training=True)
    torch.manual_seed(0)
    out = plain_update(x, y, a, up, 0.5, 0.3)
    assert (xd == 0).any()
    torch.testing.assert_close(out, y + 0.5 * (xd @ a.T) @ up.T, atol=1e-12, rtol=0)


def test_dropout_saves_a_bool_mask_not_a_copy_of_x():
    """For backward, a LoRA layer with dropout keeps x itself and a 1-byte mask, not x ⊙ mask in fp32."""
    layer = LoraLayer(nn.Linear(64, 64))
    layer.add("default", LoraConfig(r=4, dropout=0.1))
    layer.train()
    x = torch.randn(32, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert any(t is x or (t.data_ptr() == x.data_ptr()) for t in big)
    floats = {t.data_ptr() for t in big if t.is_floating_point()}
    assert floats == {x.data_ptr()}, "a float copy of x was saved"
    assert [t.dtype for t in big if not t.is_floating_point()] == [torch.bool]


def test_autocast_bf16_runs_the_update_in_bf16_and_trains_fp32_weights():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(32, 16))
    a = layer.add("default", LoraConfig(r=4, dropout=0.1))
    randomize(layer)
    x = torch.randn(8, 32)
    layer.eval()
    with torch.no_grad():
        fp32 = layer(x)
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert a.lora_a.grad.dtype == torch.float32 and a.lora_b.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x).float(), fp32, atol=0.05, rtol=0.02)


def test_keep_mask_drops_p_of_the_entries_independently():
    from lorakit.fused import keep_mask

    torch.manual_seed(0)
    x = torch.empty(1000, 1001)  # an odd count: the last 64-bit draw is only partly used
    keep, p = keep_mask(x, 0.1)
    assert keep.shape == x.shape and keep.dtype == torch.bool
    assert p == round(0.1 * 65536) / 65536 and abs(p - 0.1) < 1e-5
    n = x.numel()
    assert abs((~keep).sum().item() / n - p) < 4 * (p * (1 - p) / n) ** 0.5
    words = (~keep).flatten()[: n - n % 4].view(-1, 4).float()  # the four words of one draw are independent
    for i in range(4):
        assert abs(words[:, i].mean().item() - p) < 4 * (p * (1 - p) / words.shape[0]) ** 0.5
    assert abs((words[:, 0] * words[:, 3]).mean().item() - p * p) < 0.003
    keep2, _ = keep_mask(x, 0.1)
    assert not torch.equal(keep, keep2)


def test_fast_dropout_draws_bernoulli_masks_scales_and_backpropagates_through_them():
    from lorakit import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(0.1)
    x = torch.rand(400, 500) + 0.5  # no zeros: a zero in the output is a dropped entry
    x.requires_grad_()
    out = drop(x)
    kept = out != 0
    p = round(0.1 * 65536) / 65536
    n = x.numel()
    assert abs((~kept).sum().item() / n - p) < 4 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(out[kept], (x / (1 - p))[kept], atol=1e-6, rtol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))
    drop.eval()
    assert drop(x) is x


def test_fast_dropout_swaps_the_base_dropout_and_leaves_the_adapters_own(minilm):
    from lorakit import FastDropout, fast_dropout, inject

    plain = sum(type(m) is nn.Dropout for m in minilm.modules())
    inject(minilm, ["query", "value"], r=4, dropout=0.2)
    assert sum(type(m) is nn.Dropout for m in minilm.modules()) == plain  # adapters apply theirs as a function
    assert fast_dropout(minilm) == plain
    for m in minilm.modules():
        if isinstance(m, LoraLayer):
            assert all(a.config.dropout == 0.2 for a in m.adapters.values())
    swapped = [m for m in minilm.modules() if type(m) is FastDropout]
    assert len(swapped) == plain and all(m.p == 0.1 for m in swapped)
    assert fast_dropout(minilm) == 0


def test_layers_reading_the_same_input_share_one_dropout_mask():
    """q and v of one attention read the same x: with dropout they drop the same entries (one draw) while
    the graph holding the mask lives; a layer called twice, another x, or x changed in place draw anew."""
    torch.manual_seed(0)
    layers = [LoraLayer(nn.Linear(8, 8).double()) for _ in range(2)]
    for layer in layers:
        a = layer.add("default", LoraConfig(r=8, alpha=8, dropout=0.4))
        with torch.no_grad():
            a.lora_a.copy_(torch.eye(8, dtype=torch.float64))
            a.lora_b.copy_(torch.eye(8, dtype=torch.float64))
        layer.train()
    x = (torch.rand(64, 8, dtype=torch.float64) + 0.5).requires_grad_()
    kept = []  # the outputs, and with them the graphs that hold the masks

    def dropped(layer, inp):
        kept.append(out := layer(inp))
        return (out - layer.base(inp)).detach() == 0  # A = B = I: the update is dropout(x)

    first, second = dropped(layers[0], x), dropped(layers[1], x)
    assert 0.25 < first.double().mean() < 0.55
    assert torch.equal(first, second)
    assert not torch.equal(first, dropped(layers[1], x))  # the same layer again
    assert not torch.equal(first, dropped(layers[0], x * 1.0))  # a new tensor
    y = x.detach().clone()
    before = dropped(layers[0], y)
    with torch.no_grad():
        y.mul_(1.0)
    assert not torch.equal(before, dropped(layers[1], y))  # changed in place


# ---------------------------------------------------------------- LoRA-FA: A frozen, B trains


def lora_fa_pair(dropout: float = 0.0):
    """Two copies of one randomized model (a Linear, a Conv1D and a Linear) whose LoRA weights are equal, the
    second with train_a=False; float64."""
    import lorakit

    models = []
    for train_a in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 10), conv1d(10, 8), nn.Tanh(), nn.Linear(8, 6)).double()
        lorakit.inject(model, ["0", "1", "3"], r=3, alpha=6, dropout=dropout, train_a=train_a)
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                torch.manual_seed(1)
                randomize(layer)
        models.append(model.train())
    return models


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_fa_gradients_of_b_equal_plain_loras_and_a_gets_none(dropout):
    from lorakit import lora_layers

    plain, fa = lora_fa_pair(dropout)
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for model in (plain, fa):
        torch.manual_seed(3)  # the same dropout masks
        model(x).square().sum().backward()
    for (_, ours), (_, theirs) in zip(lora_layers(fa), lora_layers(plain)):
        a, b = ours.adapters["default"], theirs.adapters["default"]
        assert not a.lora_a.requires_grad and a.lora_a.grad is None and b.lora_a.grad.abs().max() > 0
        assert a.lora_b.grad.abs().max() > 0
        torch.testing.assert_close(a.lora_b.grad, b.lora_b.grad, atol=1e-12, rtol=0)


def test_a_lora_fa_step_keeps_a_and_moves_b_without_warning():
    import lorakit

    _, model = lora_fa_pair(0.1)
    adapters = [m for m in model.modules() if isinstance(m, lorakit.LoraAdapter)]
    before = [(a.lora_a.detach().clone(), a.lora_b.detach().clone()) for a in adapters]
    optimizer = torch.optim.AdamW(lorakit.param_groups(model, lr=1e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "training with LoRA adapter frozen" warning: B trains
        model(torch.randn(5, 12, dtype=torch.float64)).square().sum().backward()
    optimizer.step()
    for adapter, (a, b) in zip(adapters, before):
        assert torch.equal(adapter.lora_a, a) and (adapter.lora_b - b).abs().max() > 1e-3


@pytest.mark.parametrize("train_a", [True, False])
def test_the_fused_node_keeps_x_only_while_a_trains(train_a):
    """A's gradient is the only one that reads x: with A frozen (LoRA-FA) nothing of x's size is kept in fp32."""
    base = nn.Linear(64, 64)
    base.requires_grad_(False)
    layer = LoraLayer(base)
    layer.add("default", LoraConfig(r=4, dropout=0.1, train_a=train_a)).lora_a.requires_grad_(train_a)
    layer.train()
    x = torch.randn(32, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    kept = [t for t in saved if t.numel() == x.numel() and t.is_floating_point()]
    assert [t.data_ptr() for t in kept] == ([x.data_ptr()] if train_a else [])
    out.sum().backward()
    assert x.grad.abs().max() > 0

"""QLoRA: NF4 storage error, LoRA over a 4-bit base, merge into it, adapter files across precisions."""

import copy
import warnings

import pytest
import torch
from conftest import make_tiny_llama, randomize
from torch import nn

import lorakit
from lorakit import quant
from lorakit.files import AdapterFileError, BaseMismatch

pytest.importorskip("bitsandbytes")


def blocks(t: torch.Tensor, size: int = 64) -> torch.Tensor:
    """The flattened (row-major) tensor in rows of `size`: NF4's blocks."""
    return t.reshape(-1, size)


def quantized_linear(w: torch.Tensor, double_quant: bool) -> nn.Module:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    return quant.to_nf4(linear, double_quant=double_quant)


def test_nf4_half_gap_is_between_the_two_lowest_codes():
    code = quant.nf4_code()
    assert code.shape == (16,) and code[0] == -1 and code[7] == 0 and code[-1] == 1
    # NF4 is asymmetric (8 levels above 0, 7 below): the widest gap is q_1 - q_0 = 1 - 0.6962.
    assert quant.nf4_half_gap() == pytest.approx((code[1] - code[0]).item() / 2)
    assert quant.nf4_half_gap() == pytest.approx(0.1519, abs=1e-4)


def test_nf4_round_trip_error_is_within_half_a_code_gap_of_each_block_absmax():
    """Round to nearest: |w - m·q_k| ≤ m·max_j(q_{j+1} - q_j)/2 for every weight of a block with absmax m."""
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-3, 1, 96)[:, None]  # rows of very different magnitude
    w = torch.randn(96, 256, generator=g) * scale
    w[0, :64] = 0.0  # an all-zero block must come back exactly
    q = quantized_linear(w, double_quant=False)
    back = quant.dequantize(q)
    err = blocks((back - w).abs()).amax(1)
    absmax = blocks(w.abs()).amax(1)
    bound = absmax * quant.nf4_half_gap()
    assert torch.all(err <= bound * (1 + 1e-6) + 1e-12)
    assert err[0] == 0
    assert (err / bound.clamp_min(1e-30))[1:].max() > 0.9  # the bound is tight, not a loose number


def test_nf4_double_quant_adds_only_the_error_of_the_8_bit_scales():
    """With double quantization the block keeps m̃ (8-bit) instead of m: |w - m̃·q_k| ≤ m·gap/2 + |m - m̃|."""
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 512, generator=g) * 0.02
    q = quantized_linear(w, double_quant=True)
    qs = q.weight.quant_state
    assert qs.nested
    m_tilde = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    m = blocks(w.abs()).amax(1)
    err = blocks((quant.dequantize(q) - w).abs()).amax(1)
    assert torch.all(err <= m * quant.nf4_half_gap() + (m - m_tilde).abs() + 1e-7)
    assert (m - m_tilde).abs().max() < 0.01 * m.max()  # the 8-bit scales are close


@pytest.fixture
def tiny_llama():
    """A 2-layer random Llama whose Linear layers read 64 or 128 features: whole NF4 blocks per row."""
    return make_tiny_llama(64)


@pytest.fixture
def nf4_llama(tiny_llama):
    report = lorakit.quantize_base(tiny_llama)
    assert len(report.names) == 14 and type(tiny_llama.lm_head) is nn.Linear
    return tiny_llama


def dequantized_twin(model: nn.Module) -> nn.Module:
    """The same model with every 4-bit layer replaced by an nn.Linear holding its dequantized weight."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if lorakit.is_quantized(module):
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, quant.dequantized_copy(module))
    return twin


@pytest.mark.parametrize("dora", [False, True])
def test_lora_over_nf4_equals_lora_over_the_dequantized_weights(nf4_llama, dora):
    """DoRA's norms too are those of the dequantized W0 + s·B·A."""
    x = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        base = nf4_llama(x).logits
    twin = dequantized_twin(nf4_llama)
    for m in (nf4_llama, twin):
        lorakit.inject(m, "all-linear", r=4, alpha=8, dora=dora)
        randomize(m)
    assert lorakit.is_quantized(nf4_llama.model.layers[0].mlp.up_proj.base)
    with torch.no_grad():
        ours, ref = nf4_llama(x).logits, twin(x).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - base).abs().max() > 1e-2
    # Gradients reach A and B through the 4-bit matmul, and match too.
    nf4_llama.train(), twin.train()
    nf4_llama(x, labels=x).loss.backward()
    twin(x, labels=x).loss.backward()
    a = nf4_llama.model.layers[0].self_attn.q_proj.adapters["default"].lora_a.grad
    b = twin.model.layers[0].self_attn.q_proj.adapters["default"].lora_a.grad
    assert a is not None and a.abs().sum() > 0
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_merge_into_nf4_reports_a_bounded_error_and_refuses_unmerge(tiny_llama):
    lorakit.quantize_base(tiny_llama, double_quant=False)
    lorakit.inject(tiny_llama, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize(tiny_llama)
    x = torch.randint(0, 120, (2, 12))
    layers = dict(lorakit.lora_layers(tiny_llama))
    target = {n: quant.dequantize(m.base) + m.adapters["default"].delta_weight() for n, m in layers.items()}
    with torch.no_grad():
        unmerged = tiny_llama(x).logits
    with pytest.warns(UserWarning, match="re-quantize"):
        report = lorakit.merge(tiny_llama, probe=x)
    assert set(report.requant_error) == set(layers)
    for name, layer in layers.items():
        got = (quant.dequantize(layer.base) - target[name]).abs().max().item()
        assert report.requant_error[name] == pytest.approx(got)
        assert 0 < got <= target[name].abs().max().item() * quant.nf4_half_gap() * (1 + 1e-6)
    with torch.no_grad():
        merged = tiny_llama(x).logits
    assert report.output_error == pytest.approx((merged - unmerged).abs().max().item())
    assert 0 < report.output_error < 0.5 * unmerged.abs().max().item()
    assert "output changed by up to" in str(report)
    with pytest.raises(ValueError, match="cannot unmerge"):
        lorakit.unmerge(tiny_llama)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_and_unload_to_float_is_exact_and_leaves_no_4_bit_layer(nf4_llama, dora):
    lorakit.inject(nf4_llama, ["q_proj", "v_proj"], r=4, alpha=8, dora=dora)
    randomize(nf4_llama)
    x = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        unmerged = nf4_llama(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact merge warns about nothing
        plain = lorakit.merge_and_unload(nf4_llama, dtype=torch.float32)
    assert not any(lorakit.is_quantized(m) or isinstance(m, lorakit.LoraLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, unmerged, atol=1e-5, rtol=0)


def test_nf4_adapter_round_trips_and_loads_onto_the_float_base(tiny_llama, tmp_path):
    float_base = copy.deepcopy(tiny_llama)
    nf4_again = copy.deepcopy(tiny_llama)
    lorakit.quantize_base(tiny_llama)
    lorakit.inject(tiny_llama, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize(tiny_llama)
    x = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        trained = tiny_llama(x).logits
        float_logits = float_base(x).logits
    lorakit.save_adapter(tiny_llama, tmp_path / "a", print_fn=lambda *_: None)

    lorakit.quantize_base(nf4_again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same NF4 base: loads without a word
        lorakit.load_adapter(nf4_again, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(nf4_again(x).logits, trained)

    with pytest.warns(BaseMismatch, match="trained on an NF4 \\+ double quant copy"):
        lorakit.load_adapter(float_base, tmp_path / "a")
    with torch.no_grad():
        on_float = float_base(x).logits
    gap = (on_float - trained).abs().max()
    assert 0 < gap < (on_float - float_logits).abs().max()  # closer to training than the adapter's own effect

    torch.manual_seed(5)
    other = type(float_base)(float_base.config).eval()
    with pytest.raises(AdapterFileError, match="different base model"):
        lorakit.load_adapter(other, tmp_path / "a")


def test_float_adapter_onto_an_nf4_base_is_refused_unless_forced(tiny_llama, tmp_path):
    nf4 = copy.deepcopy(tiny_llama)
    lorakit.inject(tiny_llama, ["q_proj"], r=4)
    lorakit.save_adapter(tiny_llama, tmp_path / "a", print_fn=lambda *_: None)
    lorakit.quantize_base(nf4)
    with pytest.raises(AdapterFileError, match="quantized to NF4 and the adapter was trained on different"):
        lorakit.load_adapter(nf4, tmp_path / "a")
    with pytest.warns(BaseMismatch, match="force=True"):
        lorakit.load_adapter(nf4, tmp_path / "a", force=True)


def test_quantize_refusals_name_the_bad_value(tiny_llama, tiny_gpt2):
    twin = copy.deepcopy(tiny_llama)
    lorakit.quantize_base(tiny_llama)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj' is already quantized"):
        lorakit.quantize_base(tiny_llama)
    with pytest.raises(ValueError, match="is the output head"):
        lorakit.quantize_base(twin, ["lm_head"])
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj' has in_features=64, not a multiple of block_size=128"):
        lorakit.quantize_base(twin, block_size=128)
    with pytest.raises(ValueError, match="block_size must be one of .* got 100"):
        lorakit.quantize_base(twin, block_size=100)
    with pytest.raises(ValueError, match="compute_dtype must be one of .* got torch.int8"):
        lorakit.quantize_base(twin, compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="converts nn.Linear layers; 'transformer.h.0.attn.c_attn' is Conv1D"):
        lorakit.quantize_base(tiny_gpt2, ["c_attn"])
    lorakit.inject(twin, ["q_proj"], r=4)
    with pytest.raises(ValueError, match="already a LoRA layer; quantize the base before"):
        lorakit.quantize_base(twin, ["q_proj"])
    with pytest.raises(TypeError, match="not a 4-bit quantized layer"):
        quant.dequantize(nn.Linear(4, 4))


def test_storage_table_counts_what_bitsandbytes_stores(tiny_llama):
    """Per layer of n weights: n/2 bytes of 4-bit codes and the 16 fp32 NF4 code values, plus
    NF4: n/64 fp32 scales; NF4 + DQ: n/64 uint8 scales, ⌈n/64/256⌉ fp32 second-level scales, the
    256 fp32 values of the 8-bit code and one fp32 offset."""
    table = lorakit.storage_table(tiny_llama)
    sizes = [m.weight.numel() for n, m in tiny_llama.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    assert table.layers == len(sizes) == 14 and table.weights == sum(sizes) and table.fp32 == 4 * table.weights
    assert table.nf4 == sum(n // 2 + 16 * 4 + n // 64 * 4 for n in sizes)
    assert table.nf4_dq == sum(n // 2 + 16 * 4 + n // 64 + -(-n // 64 // 256) * 4 + 256 * 4 + 4 for n in sizes)
    assert quant.nf4_bits_per_weight(64, True) < quant.nf4_bits_per_weight(64, False) == 4.5
    assert "NF4 + double quant" in str(table)


def test_a_transformers_4bit_model_is_adapted_like_ours(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama.save_pretrained(tmp_path / "m")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=config, device_map="cpu").eval()
    assert lorakit.is_quantized(model.model.layers[0].self_attn.q_proj)
    # transformers leaves bitsandbytes' bf16 CPU inference path on; turn it off to compare at fp32 precision.
    for m in model.modules():
        if lorakit.is_quantized(m):
            m.support_avx512bf16_for_cpu = False
    twin = dequantized_twin(model)
    for m in (model, twin):
        lorakit.inject(m, ["q_proj", "v_proj"], r=4, alpha=8)
        randomize(m)
    x = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, twin(x).logits, atol=1e-5, rtol=0)
    lorakit.save_adapter(model, tmp_path / "a", print_fn=lambda *_: None)
    with pytest.warns(BaseMismatch, match="NF4"):
        lorakit.load_adapter(tiny_llama, tmp_path / "a")
    with pytest.warns(UserWarning, match="re-quantize"):
        report = lorakit.merge(model, probe=x)
    assert report.max_weight_error > 0 and report.output_error > 0


def test_quantize_config_values():
    from lorakit.train.config import ConfigError, build_config

    assert build_config({}, ["--model.quantize", "nf4"]).model.quantize == "nf4"
    assert build_config({"model": {"quantize": "nf4"}}, ["--model.quantize", "none"]).model.quantize == "none"
    assert build_config({}, ["--model.double_quant", "false"]).model.double_quant is False
    with pytest.raises(ConfigError, match="model.quantize must be one of none, nf4; got 'int8'"):
        build_config({}, ["--model.quantize", "int8"])
    with pytest.raises(ConfigError, match="lora.method = full cannot train it"):
        build_config({}, ["--model.quantize", "nf4", "--lora.method", "full"])

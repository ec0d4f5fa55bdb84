"""DoRA: the dense formula, dropout as PEFT defines it, merge, files both ways, mixed batches, the recipe. (Parity
with PEFT's outputs and gradients for every layer kind: test_parity_peft.py.)"""

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize
from test_adapters import assert_mixed_equals_rowwise, check_bf16_rows
from test_parity_peft import vary_magnitudes
from torch import nn

import lorakit
from lorakit import LoraAdapter, LoraLayer
from lorakit.files import AdapterFileError


class Kinds(nn.Module):
    """One layer of each kind DoRA adapts: an embedding, a linear (with bias) and a Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin, self.conv = nn.Embedding(20, 8), nn.Linear(8, 6), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(self.emb(ids)), self.conv(img)


def dense(weight: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, out_axis: int) -> torch.Tensor:
    """W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖, the norm over everything but the output axis — the paper's formula."""
    w = weight + delta
    dims = tuple(d for d in range(w.ndim) if d != out_axis)
    shape = [1] * w.ndim
    shape[out_axis] = -1
    return m.view(shape) * w / torch.linalg.vector_norm(w, dim=dims, keepdim=True)


def test_fresh_dora_adapter_changes_nothing_and_magnitude_starts_at_the_weight_norm():
    torch.manual_seed(0)
    model, ids, img = Kinds(), torch.randint(0, 20, (2, 5)), torch.randn(2, 3, 6, 6)
    before = model(ids, img)
    report = lorakit.inject(model, ["emb", "lin", "conv"], r=2, dora=True)
    after = model(ids, img)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.lin.adapters["default"].magnitude, model.lin.base.weight.norm(dim=1))
    torch.testing.assert_close(model.emb.adapters["default"].magnitude, model.emb.base.weight.norm(dim=0))
    torch.testing.assert_close(model.conv.adapters["default"].magnitude, model.conv.base.weight.flatten(1).norm(dim=1))
    assert report.params_added == lorakit.summary(model, print_fn=lambda s: None).trainable
    assert report.params_added == (2 * 20 + 8 * 2 + 8) + (2 * 8 + 6 * 2 + 6) + (2 * 27 + 4 * 2 + 4)  # A, B, m


@pytest.mark.parametrize("kind", ["lin", "emb", "conv"])
def test_dora_layer_equals_the_dense_formula(kind):
    torch.manual_seed(0)
    model, ids, img = Kinds(), torch.randint(0, 20, (2, 5)), torch.randn(2, 3, 6, 6)
    x = {"lin": torch.randn(3, 4, 8), "emb": ids, "conv": img}[kind]
    lorakit.inject(model, [kind], r=3, alpha=5, dora=True)
    randomize(model, std=0.3)
    vary_magnitudes(model)
    layer = model.get_submodule(kind)
    adapter = layer.adapters["default"]
    w = dense(layer.base.weight, adapter.delta_weight(), adapter.magnitude, int(kind == "emb"))  # Embedding stores (num, dim)
    with torch.no_grad():
        ours, base = layer(x), layer.base(x)
        expected = {"lin": lambda: F.linear(x, w, layer.base.bias), "emb": lambda: F.embedding(x, w),
                    "conv": lambda: F.conv2d(x, w, layer.base.bias, padding=1)}[kind]()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-2


def test_dora_with_dropout_follows_peft_definition(monkeypatch):
    """Training with dropout d: h = y + (f − 1) ⊙ W0·d(x) + f ⊙ s·B·A·d(x), with one mask for both."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    model = nn.Sequential(layer)
    lorakit.inject(model, ["0"], r=2, alpha=4, dropout=0.5, dora=True)
    randomize(model, std=0.3)
    vary_magnitudes(model)
    model.train()
    x = torch.randn(5, 8)
    mask = (torch.rand(5, 8) > 0.5).float() * 2
    monkeypatch.setattr(lorakit.dora.F, "dropout", lambda t, p, training: t * mask)
    adapter = model[0].adapters["default"]
    f = adapter.magnitude / (layer.weight + adapter.delta_weight()).norm(dim=1)
    xd = x * mask
    expected = layer(x) + (f - 1) * (xd @ layer.weight.T) + f * (adapter.scale * xd @ adapter.lora_a.T @ adapter.lora_b.T)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


# Parity with PEFT (outputs and the gradients of A, B and m, every layer kind) is in test_parity_peft.py.


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("kind", ["lin", "emb", "conv"])
def test_dora_merged_equals_unmerged_and_unmerge_restores_w0(kind):
    torch.manual_seed(0)
    model, ids, img = Kinds(), torch.randint(0, 20, (2, 5)), torch.randn(2, 3, 6, 6)
    w0 = model.get_submodule(kind).weight.detach().clone()
    lorakit.inject(model, [kind], r=2, alpha=4, dora=True)
    randomize(model, std=0.3)
    vary_magnitudes(model)
    with torch.no_grad():
        base = model.get_submodule(kind).base
        unmerged = model(ids, img)
        lorakit.merge(model)
        assert (base.weight - w0).abs().max() > 1e-2
        merged = model(ids, img)
        lorakit.unmerge(model)
        again = model(ids, img)
    for u, m, a in zip(unmerged, merged, again):
        torch.testing.assert_close(m, u, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)
    plain = copy.deepcopy(model)
    lorakit.merge_and_unload(plain)
    assert type(plain.get_submodule(kind)) is type(base)
    with torch.no_grad():
        for u, m in zip(unmerged, plain(ids, img)):
            torch.testing.assert_close(m, u, atol=1e-5, rtol=1e-5)


def test_dora_merge_on_top_of_another_merged_adapter_is_refused():
    torch.manual_seed(0)
    model = Kinds()
    lorakit.inject(model, ["lin"], r=2, adapter="plain")
    lorakit.inject(model, ["lin"], r=2, adapter="d", dora=True)
    randomize(model)
    lorakit.merge(model, "plain")
    w = model.lin.base.weight.detach().clone()
    with pytest.raises(ValueError, match="cannot merge DoRA adapter 'd' on top of \\['plain'\\]"):
        lorakit.merge(model, "d")
    assert torch.equal(model.lin.base.weight, w)


# ---------------------------------------------------------------- refusals


def test_dora_refuses_output_slices_and_combining(tiny_gpt2):
    with pytest.raises(TypeError, match="DoRA adapts whole layers"):
        lorakit.inject(tiny_gpt2, {"c_attn": ("q", "v")}, r=4, dora=True)
    assert not lorakit.lora_layers(tiny_gpt2)
    lorakit.inject(tiny_gpt2, ["c_fc"], r=4, adapter="a", dora=True)
    lorakit.inject(tiny_gpt2, ["c_fc"], r=4, adapter="b")
    with pytest.raises(ValueError, match="cannot combine DoRA adapter\\(s\\) 'a'"):
        lorakit.combine_adapters(tiny_gpt2, {"a": 1.0, "b": 1.0}, "ab")


# ---------------------------------------------------------------- files


def dora_llama(tiny_llama, targets=("q_proj", "v_proj", "down_proj", "embed_tokens")):
    lorakit.inject(tiny_llama, list(targets), r=4, alpha=8, dora=True)
    randomize(tiny_llama)
    vary_magnitudes(tiny_llama)
    return tiny_llama


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_dora_file_round_trips_in_both_formats(tiny_llama, tmp_path):
    from conftest import make_tiny_llama

    ids = torch.randint(0, 120, (2, 9))
    base_logits = logits(make_tiny_llama(), ids)
    model = dora_llama(tiny_llama)
    want = logits(model, ids)
    assert (want - base_logits).abs().max() > 1e-2
    for fmt in ("lorakit", "peft"):
        lorakit.save_adapter(model, tmp_path / fmt, format=fmt, print_fn=lambda s: None)
        fresh = make_tiny_llama()
        lorakit.load_adapter(fresh, tmp_path / fmt)
        assert fresh.model.layers[0].self_attn.q_proj.adapters["default"].config.dora
        torch.testing.assert_close(logits(fresh, ids), want, atol=1e-6, rtol=0)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(theirs, ids), want, atol=1e-5, rtol=0)


def test_peft_dora_file_loads_in_lorakit(tiny_llama, convnet, tmp_path):
    """PEFT's save_pretrained (lora_magnitude_vector, Conv2d's m shaped (1, out, 1, 1)) → lorakit.load_adapter."""
    from conftest import make_tiny_llama

    ids = torch.randint(0, 120, (2, 9))
    twin = peft.get_peft_model(tiny_llama, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                           target_modules=["q_proj", "v_proj", "embed_tokens"]))
    with torch.no_grad():
        for k, v in twin.state_dict().items():
            if "lora_magnitude_vector" in k:
                v.mul_(1 + 0.2 * torch.randn(v.shape))
            elif "lora_B" in k or "lora_embedding_A" in k:
                v.normal_(0, 0.1)
    want = logits(twin, ids)
    twin.save_pretrained(tmp_path / "llama")
    ours = make_tiny_llama()
    base_logits = logits(ours, ids)
    with pytest.warns(lorakit.files.UnverifiedBase):
        lorakit.load_adapter(ours, tmp_path / "llama")
    torch.testing.assert_close(logits(ours, ids), want, atol=1e-5, rtol=0)
    assert (want - base_logits).abs().max() > 1e-2
    other = make_tiny_llama()  # PEFT saved the embedding's own weight (save_embedding_layers): it must match
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(2)
    with pytest.raises(AdapterFileError, match="embed_tokens: the file carries the base weight it was trained with"):
        lorakit.load_adapter(other, tmp_path / "llama")

    x = torch.randn(2, 3, 32, 32)
    base = copy.deepcopy(convnet)
    conv_twin = peft.get_peft_model(convnet, peft.LoraConfig(r=3, use_dora=True, target_modules=["conv1", "fc1"]))
    with torch.no_grad():
        for k, v in conv_twin.state_dict().items():
            if "lora_" in k:
                v.copy_(v * (1 + 0.2 * torch.randn(v.shape)) + 0.05 * torch.randn(v.shape))
        conv_want = conv_twin(x)
    conv_twin.save_pretrained(tmp_path / "conv")
    with pytest.warns(lorakit.files.UnverifiedBase):
        lorakit.load_adapter(base, tmp_path / "conv")
    with torch.no_grad():
        torch.testing.assert_close(base(x), conv_want, atol=1e-5, rtol=0)


def test_dora_file_without_its_magnitudes_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from conftest import make_tiny_llama

    lorakit.save_adapter(dora_llama(tiny_llama), tmp_path / "p", format="peft", print_fn=lambda s: None)
    weights = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, weights)
    with pytest.raises(AdapterFileError, match="lacks lora_magnitude_vector, which use_dora = true needs"):
        lorakit.load_adapter(make_tiny_llama(), tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    save_file(tensors, weights)
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(AdapterFileError, match="has a lora_magnitude_vector but its config has use_dora = false"):
        lorakit.load_adapter(make_tiny_llama(), tmp_path / "p")


def test_native_dora_file_whose_dora_flag_was_edited_is_refused(tiny_llama, tmp_path):
    from conftest import make_tiny_llama

    lorakit.save_adapter(dora_llama(tiny_llama), tmp_path / "n", print_fn=lambda s: None)
    path = tmp_path / "n" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora"]["dora"] = False
    path.write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="does not describe|does not match the settings"):
        lorakit.load_adapter(make_tiny_llama(), tmp_path / "n")


# ---------------------------------------------------------------- mixed batches


def test_dora_mixed_batch_equals_each_row_alone(tiny_llama):
    """Eight adapters, four of them DoRA, plus rows with no adapter: every path of the bank (all slots at once,
    gathered rows, a single adapter) in float64."""
    tiny_llama.double()
    targets = ["q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"]
    for i in range(8):
        lorakit.inject(tiny_llama, targets, r=2 + i % 3, alpha=4, adapter=f"user{i}", dora=i % 2 == 0)
    randomize(tiny_llama, std=0.2)
    vary_magnitudes(tiny_llama)
    ids = torch.randint(0, 120, (10, 7), generator=torch.Generator().manual_seed(1))
    assert_mixed_equals_rowwise(tiny_llama, ids, [f"user{i}" for i in range(8)] + [None, "user2"])
    assert_mixed_equals_rowwise(tiny_llama, ids[:3], ["user4", "user1", None])
    assert_mixed_equals_rowwise(tiny_llama, ids[:2], ["user6", "user6"])
    with torch.no_grad():  # a magnitude changed in place reaches the bank
        tiny_llama.model.layers[0].self_attn.q_proj.adapters["user0"].magnitude.mul_(1.5)
    assert_mixed_equals_rowwise(tiny_llama, ids[:3], ["user0", "user1", None])


def test_dora_mixed_batch_in_bf16_matches_rows_alone(tiny_llama):
    """A served bf16 model: every path of the bank with half the adapters DoRA, against each row alone."""
    for i in range(8):
        lorakit.inject(tiny_llama, ["q_proj", "v_proj", "o_proj", "embed_tokens"], r=2 + i % 3, alpha=4,
                       adapter=f"user{i}", dora=i % 2 == 0)
    randomize(tiny_llama, std=0.3)
    vary_magnitudes(tiny_llama)
    tiny_llama.to(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    for names in (["user4", None, "user6"], [f"user{i % 8}" for i in range(17)] + [None], ["user2"] * 2):
        check_bf16_rows(tiny_llama, torch.randint(0, 120, (len(names), 6), generator=g), names)


# ---------------------------------------------------------------- the recipe


def test_train_with_dora_from_the_cli_saves_magnitudes_and_inspect_shows_it(reviews, tmp_path, capsys):
    from safetensors.torch import load_file
    from test_cli import run_cli, tiny_args

    run = tmp_path / "run"
    code, out, err = run_cli(tiny_args(reviews, run, "--lora.dora", "true", "--train.epochs", "1"), capsys)
    assert code == 0, err
    assert "dora=True" in out
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    magnitudes = [k for k in tensors if k.endswith(".magnitude")]
    assert len(magnitudes) == 12 and json.loads((run / "config.json").read_text())["lora"]["dora"] is True
    page = tmp_path / "run.html"
    code, out, _ = run_cli(["inspect", str(run), "--html", str(page)], capsys)
    data = json.loads(page.read_text().split('type="application/json">')[1].split("</script>")[0])
    assert code == 0 and [r["after"] for r in data["surgery"]].count("DoRA r=4 α=16") == 12
    code, out, err = run_cli(tiny_args(reviews, tmp_path / "bad", "--lora.dora", "maybe"), capsys)
    assert code == 2 and err.count("\n") == 1 and "lora.dora" in err

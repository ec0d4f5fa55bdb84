"""lorakit against Hugging Face PEFT with identical weights: same logits, same LoRA gradients (DoRA's magnitudes
included)."""

import copy
import json
import re

import pytest
import torch

import lorakit

peft = pytest.importorskip("peft")

from conftest import randomize  # noqa: E402


def pairs(layer, theirs):
    """(lorakit's tensor, PEFT's) for A, B and, with DoRA, the magnitude, on one layer."""
    ours = layer.adapters["default"]
    if layer.geometry.kind == "embedding":
        out = [(ours.lora_a, theirs.lora_embedding_A["default"]), (ours.lora_b, theirs.lora_embedding_B["default"])]
    else:
        out = [(ours.lora_a, theirs.lora_A["default"].weight), (ours.lora_b, theirs.lora_B["default"].weight)]
    if ours.magnitude is not None:
        out.append((ours.magnitude, theirs.lora_magnitude_vector["default"].weight))
    return out


def peft_twin(model, lora_model, **peft_kwargs):
    """A PEFT model over a copy of `model`, its A, B (and DoRA magnitudes) copied from lorakit's `lora_model`."""
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**peft_kwargs))
    inner = twin.base_model.model
    for name, layer in lorakit.lora_layers(lora_model):
        for ours, theirs in pairs(layer, inner.get_submodule(name)):
            with torch.no_grad():
                theirs.copy_(ours.view_as(theirs))
    return twin


def vary_magnitudes(model, seed=5):
    """Move every DoRA magnitude away from its initial ‖W0‖, so m matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lorakit.LoraAdapter) and m.magnitude is not None:
                m.magnitude.mul_(1 + 0.2 * torch.randn(m.magnitude.shape, generator=g))


def assert_same_grads(lora_model, twin):
    inner = twin.base_model.model
    compared = 0
    for name, layer in lorakit.lora_layers(lora_model):
        for ours, theirs in pairs(layer, inner.get_submodule(name)):
            torch.testing.assert_close(ours.grad, theirs.grad.view_as(ours), atol=1e-5, rtol=1e-4)
            assert ours.grad.abs().max() > 0
            compared += 1
    assert compared > 0


def assert_same_as_twin(lora_model, twin, ours, theirs, base_logits, effect):
    """The two models' outputs (logits and loss): equal logits that differ from the base's by more than `effect`,
    and after each loss's backward, equal adapter gradients."""
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert (ours.logits - base_logits).abs().max() > effect
    ours.loss.backward()
    theirs.loss.backward()
    assert_same_grads(lora_model, twin)


@pytest.mark.parametrize("rslora, dora", [(False, False), (True, False), (False, True)])
def test_minilm_query_value_matches_peft(minilm, rslora, dora):
    """BERT's Linear layers, with biases (DoRA takes them out of the part it rescales)."""
    tokens = {"input_ids": torch.randint(1000, 5000, (3, 16)), "attention_mask": torch.ones(3, 16, dtype=torch.long)}
    labels = torch.tensor([0, 1, 1])
    base_logits = minilm(**tokens).logits
    base = copy.deepcopy(minilm)

    report = lorakit.inject(minilm, ["query", "value"], r=8, alpha=16, rslora=rslora, dora=dora)
    assert len(report.replaced) == 12
    randomize(minilm, std=0.05)
    vary_magnitudes(minilm)
    twin = peft_twin(base, minilm, r=8, lora_alpha=16, use_rslora=rslora, target_modules=["query", "value"],
                     lora_dropout=0.0, use_dora=dora)

    ours = minilm(**tokens, labels=labels)
    theirs = twin(**tokens, labels=labels)
    assert_same_as_twin(minilm, twin, ours, theirs, base_logits, 1e-3)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("target, extra", [("c_attn", {"fan_in_fan_out": True}), ("wte", {})])
def test_gpt2_matches_peft(tiny_gpt2, target, extra, dora):
    """GPT-2's fused Conv1D c_attn (stored transposed, with a bias) and its token embedding."""
    ids = torch.randint(0, 100, (2, 20))
    base_logits = tiny_gpt2(ids).logits
    base = copy.deepcopy(tiny_gpt2)
    lorakit.inject(tiny_gpt2, [target], r=4, alpha=8, dora=dora)
    randomize(tiny_gpt2)
    vary_magnitudes(tiny_gpt2)
    twin = peft_twin(base, tiny_gpt2, r=4, lora_alpha=8, target_modules=[target], use_dora=dora, **extra)

    ours, theirs = tiny_gpt2(ids, labels=ids), twin(input_ids=ids, labels=ids)
    assert_same_as_twin(tiny_gpt2, twin, ours, theirs, base_logits, 1e-2)


@pytest.mark.parametrize("dora", [False, True])
def test_convnet_conv2d_and_linear_match_peft(convnet, dora):
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    base_out = convnet(x)
    base = copy.deepcopy(convnet)
    lorakit.inject(convnet, ["conv1", "conv2", "fc1", "fc2"], r=3, alpha=6, dora=dora)
    randomize(convnet)
    vary_magnitudes(convnet)
    twin = peft_twin(base, convnet, r=3, lora_alpha=6, target_modules=["conv1", "conv2", "fc1", "fc2"], use_dora=dora)
    ours, theirs = convnet(x), twin(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - base_out).abs().max() > 1e-2
    torch.nn.functional.cross_entropy(ours, y).backward()
    torch.nn.functional.cross_entropy(theirs, y).backward()
    assert_same_grads(convnet, twin)


@pytest.mark.parametrize("dora, added", [(False, 73_728), (True, 73_728 + 12 * 384)])
def test_trainable_counts_match_peft(minilm, dora, added):
    base = copy.deepcopy(minilm)
    lorakit.inject(minilm, ["query", "value"], r=8, dora=dora)
    ours = lorakit.summary(minilm, print_fn=lambda s: None)
    twin = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["query", "value"], use_dora=dora))
    trainable, total = twin.get_nb_trainable_parameters()
    assert (ours.trainable, ours.total) == (trainable, total) == (added, ours.total)


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


# ---------------------------------------------------------------- per-layer rank and alpha


def peft_lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns_match_peft(tiny_llama, rslora):
    """The same patterns in lorakit and in PEFT give every layer the same rank and alpha: same logits, same
    gradients. Keys by suffix and by regex, one layer's rank and alpha each set by another key."""
    patterns = {"rank_pattern": {r"layers\.1\.self_attn\.q_proj": 8, "up_proj": 2},
                "alpha_pattern": {"v_proj": 3, "q_proj": 16}}
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    base_logits = tiny_llama(ids).logits
    base = copy.deepcopy(tiny_llama)
    lorakit.inject(tiny_llama, ["q_proj", "v_proj", "up_proj"], r=4, alpha=8, rslora=rslora, **patterns)
    assert {layer.adapters["default"].config.r for _, layer in lorakit.lora_layers(tiny_llama)} == {2, 4, 8}
    randomize(tiny_llama)
    twin = peft_twin(base, tiny_llama, r=4, lora_alpha=8, use_rslora=rslora,
                     target_modules=["q_proj", "v_proj", "up_proj"], **patterns)
    ours, theirs = tiny_llama(ids, labels=ids), twin(input_ids=ids, labels=ids)
    assert_same_as_twin(tiny_llama, twin, ours, theirs, base_logits, 1e-2)


def test_minilm_rank_and_alpha_patterns_match_peft(minilm):
    patterns = {"rank_pattern": {"layer.0.attention.self.query": 16, r"layer\.[45]\.attention\.self\.value": 4},
                "alpha_pattern": {"value": 4, r"layer\.3\..*query": 32}}
    tokens = {"input_ids": torch.randint(1000, 5000, (3, 16)), "attention_mask": torch.ones(3, 16, dtype=torch.long)}
    labels = torch.tensor([0, 1, 1])
    base_logits = minilm(**tokens).logits
    base = copy.deepcopy(minilm)
    lorakit.inject(minilm, ["query", "value"], r=8, alpha=16, **patterns)
    randomize(minilm, std=0.05)
    twin = peft_twin(base, minilm, r=8, lora_alpha=16, target_modules=["query", "value"], **patterns)
    assert twin.base_model.model.bert.encoder.layer[0].attention.self.query.r["default"] == 16
    ours, theirs = minilm(**tokens, labels=labels), twin(**tokens, labels=labels)
    assert_same_as_twin(minilm, twin, ours, theirs, base_logits, 1e-3)


def test_per_layer_ranks_saved_for_peft_load_in_peft_even_where_a_loose_key_would_name_another_layer(tmp_path):
    """"fc" is also the end of "block.fc", and "a.b" as a regex matches "a_b": the PEFT file names each layer
    whose rank or alpha differ by its escaped, anchored full name, so PEFT gives each layer its own."""
    from conftest import Nested

    model, base = Nested().eval(), Nested().eval()
    lorakit.inject(model, ["fc", "a.b", "a_b", re.compile(r"layers\.\d+")], r=2, alpha=2,
                   rank_pattern={"^fc": 4, r"a\.b": 3, r"layers\.1$": 5}, alpha_pattern={r"^a\.b": 6, "layers.11": 1})
    randomize(model)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    assert (expected - base(x)).abs().max() > 1e-2
    lorakit.save_adapter(model, tmp_path, format="peft", print_fn=lambda s: None)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 2)
    assert config["rank_pattern"] == {"^fc": 4, r"^a\.b": 3, r"^layers\.1": 5}
    assert config["alpha_pattern"] == {r"^a\.b": 6, r"^layers\.11": 1}
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(theirs(x), expected, atol=1e-6, rtol=0)


def test_peft_patterns_both_ways(tiny_llama, tmp_path):
    """PEFT's save with rank_pattern and alpha_pattern (two alpha keys name one layer: the first in the file wins)
    loads into lorakit with the ranks, alphas and logits PEFT loads from that file; lorakit's PEFT save of
    per-layer ranks loads into PEFT. (PEFT before 0.22 writes the pattern keys sorted, so its own reload of
    such a file can differ from the model it saved; the file is what both libraries read.)"""
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(2))
    base_logits = tiny_llama(ids).logits
    alpha_pattern = {"q_proj": 16, r"layers\.1\.self_attn\.q_proj": 1, "v_proj": 2}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                             rank_pattern={"up_proj": 2, r"layers\.0\.self_attn\.v_proj": 6},
                             alpha_pattern=alpha_pattern)
    theirs = peft.get_peft_model(copy.deepcopy(tiny_llama), config)
    with torch.no_grad():
        for p in peft_lora_params(theirs):
            p.normal_(std=0.1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "peft").eval()
    expected = reloaded(input_ids=ids).logits
    saved_order = list(json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["alpha_pattern"])
    if saved_order == list(alpha_pattern):  # the file keeps the order: it is the model that was saved
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    ours = copy.deepcopy(tiny_llama)
    with pytest.warns(lorakit.files.UnverifiedBase):
        lorakit.load_adapter(ours, tmp_path / "peft")
    got = {name.removeprefix("model.layers."): (layer.adapters["default"].config.r,
                                                layer.adapters["default"].config.alpha)
           for name, layer in lorakit.lora_layers(ours)}
    first = next(k for k in saved_order if k in ("q_proj", r"layers\.1\.self_attn\.q_proj"))
    assert got == {"0.self_attn.q_proj": (4, 16), "0.self_attn.v_proj": (6, 2), "0.mlp.up_proj": (2, 8),
                   "1.self_attn.q_proj": (4, alpha_pattern[first]), "1.self_attn.v_proj": (4, 2),
                   "1.mlp.up_proj": (2, 8)}
    peft_layers = {name.removeprefix("base_model.model.model.layers."): (m.r["default"], m.lora_alpha["default"])
                   for name, m in reloaded.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert got == peft_layers
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)
    assert (expected - base_logits).abs().max() > 1e-2

    lorakit.save_adapter(ours, tmp_path / "ours", format="peft", print_fn=lambda s: None)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "ours").eval()
    torch.testing.assert_close(back(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_a_peft_config_without_lora_alpha_takes_peft_default(tiny_llama, tmp_path):
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    config = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj"])
    model = peft.get_peft_model(copy.deepcopy(tiny_llama), config)
    with torch.no_grad():
        for p in peft_lora_params(model):
            p.normal_(std=0.1)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["lora_alpha"]
    path.write_text(json.dumps(config))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path).eval()
    ours = copy.deepcopy(tiny_llama)
    with pytest.warns(lorakit.files.UnverifiedBase):
        lorakit.load_adapter(ours, tmp_path)
    assert {layer.adapters["default"].config.alpha for _, layer in lorakit.lora_layers(ours)} == {8}
    torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_peft_file_adapts_exactly_the_saved_layers_when_a_name_is_also_a_suffix(tmp_path):
    """PEFT reads a target_modules list as dotted suffixes: "fc" would also adapt "block.fc"."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential()
            self.block.fc = nn.Linear(6, 6)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(self.block.fc(x))

    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 6)
    lorakit.inject(net, "fc", r=2)  # a bare string is a regex over whole names: the top-level fc only
    randomize(net)
    with torch.no_grad():
        want = net(x)
    lorakit.save_adapter(net, tmp_path / "p", format="peft", print_fn=lambda s: None)
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path / "p")
    adapted = [n for n, m in theirs.named_modules() if hasattr(m, "lora_A")]
    assert adapted == ["base_model.model.fc"]
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), want, atol=1e-6, rtol=0)

"""Surgery: target matching, freezing, the report, strictness, summary."""

import json
import re

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraAdapter, LoraLayer

from conftest import Nested, assert_untouched, make_tiny_llama, plain_state, randomize


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_convnet_walkthrough_counts_and_b_moves(convnet):
    """fc1..fc3 with r=4, α=4: r·(in+out) per layer, 3,272 in all; training moves every B."""
    report = lorakit.inject(convnet, ["fc1", "fc2", "fc3"], r=4, alpha=4)
    per_layer = {r.name: r.params for r in report.replaced}
    assert per_layer == {"fc1": 4 * (400 + 120), "fc2": 4 * (120 + 84), "fc3": 4 * (84 + 10)}
    assert report.params_added == 3272
    counts = lorakit.summary(convnet, print_fn=lambda s: None)
    assert counts.trainable == 3272
    assert counts.total == 3272 + sum(p.numel() for n, p in convnet.named_parameters() if "adapters" not in n)

    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.AdamW([p for p in convnet.parameters() if p.requires_grad], lr=1e-2)
    frozen_before = convnet.fc1.base.weight.clone()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(convnet(x), y).backward()
        opt.step()
    for m in convnet.modules():
        if isinstance(m, LoraAdapter):
            assert m.lora_b.abs().max() > 0
    assert torch.equal(convnet.fc1.base.weight, frozen_before)


def test_targets_by_suffix_type_regex_and_all_linear(convnet):
    names = lambda t: [r.name for r in lorakit.inject(convnet, t, r=2, dry_run=True).replaced]  # noqa: E731
    assert names(["fc1", "conv2"]) == ["conv2", "fc1"]
    assert names([nn.Conv2d]) == ["conv1", "conv2", "conv3"]
    assert names(re.compile(r"fc[12]")) == ["fc1", "fc2"]
    assert names(r"conv\d") == ["conv1", "conv2", "conv3"]
    assert names("all-linear") == ["fc1", "fc2"]  # fc3 is the output head


def test_suffix_matches_whole_name_components():
    model = nn.ModuleDict({"query": nn.Linear(4, 4), "subquery": nn.Linear(4, 4)})
    report = lorakit.inject(model, ["query"], r=2, dry_run=True)
    assert [r.name for r in report.replaced] == ["query"]


def test_all_linear_skips_the_hf_output_head(tiny_gpt2):
    report = lorakit.inject(tiny_gpt2, "all-linear", r=2, dry_run=True)
    names = [r.name for r in report.replaced]
    assert "lm_head" not in names
    assert sum(n.endswith("c_attn") for n in names) == 2 and len(names) == 8  # c_attn, c_proj, c_fc, mlp.c_proj


def test_fused_slices_report_and_freeze(tiny_gpt2):
    report = lorakit.inject(tiny_gpt2, {"c_attn": ("q", "v")}, r=4)
    assert [r.slices for r in report.replaced] == [((0, 32), (64, 96))] * 2
    # per layer: A (2·4, 32) + B (2·32, 4)
    assert report.params_added == 2 * (8 * 32 + 64 * 4)
    assert trainable_names(tiny_gpt2) == {
        f"transformer.h.{i}.attn.c_attn.adapters.default.lora_{ab}" for i in (0, 1) for ab in "ab"}
    assert "0:32,64:96" in str(report)


def test_dry_run_changes_nothing(convnet):
    before = {n: p.clone() for n, p in convnet.state_dict().items()}
    grads = {n: p.requires_grad for n, p in convnet.named_parameters()}
    report = lorakit.inject(convnet, ["fc1"], r=4, dry_run=True)
    assert report.dry_run and len(report.replaced) == 1 and "would replace" in str(report)
    assert not any(isinstance(m, LoraLayer) for m in convnet.modules())
    assert {n: p.requires_grad for n, p in convnet.named_parameters()} == grads
    after = convnet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_freezes_everything_else_and_keeps_modules_to_save(convnet):
    lorakit.inject(convnet, ["fc1"], r=4, modules_to_save=["fc3"])
    assert trainable_names(convnet) == {
        "fc1.adapters.default.lora_a", "fc1.adapters.default.lora_b",
        "fc3.adapters.default.weight", "fc3.adapters.default.bias"}
    assert not convnet.fc3.original.weight.requires_grad


@pytest.mark.parametrize("bias, expected", [
    ("none", set()),
    ("lora_only", {"fc1.base.bias"}),
    ("all", {"conv1.bias", "conv2.bias", "conv3.bias", "fc1.base.bias", "fc2.bias", "fc3.bias"}),
])
def test_bias_modes(convnet, bias, expected):
    lorakit.inject(convnet, ["fc1"], r=2, bias=bias)
    assert trainable_names(convnet) - {"fc1.adapters.default.lora_a", "fc1.adapters.default.lora_b"} == expected


def test_misspelled_target_names_closest(convnet):
    with pytest.raises(ValueError, match=r"target 'fc_1' matches no module in ConvNet; closest module names: fc1"):
        lorakit.inject(convnet, ["fc_1"], r=2)
    assert not any(isinstance(m, LoraLayer) for m in convnet.modules())


def test_plain_string_is_regex_and_says_so(tiny_gpt2):
    with pytest.raises(ValueError, match=r"for a name suffix pass a list: \['c_fc'\]"):
        lorakit.inject(tiny_gpt2, "c_fc", r=2)
    assert len(lorakit.inject(tiny_gpt2, r".*\.c_fc", r=2, dry_run=True).replaced) == 2


def test_type_target_without_match(convnet):
    with pytest.raises(ValueError, match="target type Embedding matches no module; adaptable types in the model: Conv2d, Linear"):
        lorakit.inject(convnet, [nn.Embedding], r=2)


def test_unsupported_match_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match=r"'1' of type LayerNorm, which LoRA cannot adapt"):
        lorakit.inject(model, ["1"], r=2)


def test_already_lora_is_refused(convnet):
    lorakit.inject(convnet, ["fc1"], r=2)
    with pytest.raises(ValueError, match=r"module 'fc1' is already a LoRA layer"):
        lorakit.inject(convnet, ["fc1"], r=2)
    with pytest.raises(ValueError, match="already a LoRA layer"):
        lorakit.inject(convnet, [nn.Linear], r=2)


def test_bad_settings_change_nothing(convnet):
    with pytest.raises(ValueError, match=r"r=100 exceeds min\(in, out\)=84"):
        lorakit.inject(convnet, ["fc1", "fc2"], r=100)
    with pytest.raises(ValueError, match="dropout must be in"):
        lorakit.inject(convnet, ["fc1"], r=2, dropout=-0.5)
    with pytest.raises(ValueError, match="bias must be one of"):
        lorakit.inject(convnet, ["fc1"], r=2, bias="bogus")
    assert not any(isinstance(m, LoraLayer) for m in convnet.modules())
    assert all(p.requires_grad for p in convnet.parameters())


@pytest.mark.parametrize("spec, message", [
    (("q", "x"), "unknown slice name 'x'"),
    (((0, 40), (30, 96)), "bad output slice"),
    (((0, 200),), "bad output slice"),
    ((), "non-empty tuple"),
])
def test_bad_slice_specs(tiny_gpt2, spec, message):
    with pytest.raises(ValueError, match=message):
        lorakit.inject(tiny_gpt2, {"c_attn": spec}, r=2)


def test_target_and_modules_to_save_conflict(convnet):
    with pytest.raises(ValueError, match="fc3 is both a LoRA target and in modules_to_save"):
        lorakit.inject(convnet, ["fc3"], r=2, modules_to_save=["fc3"])


@pytest.mark.parametrize("targets, saved, message", [
    (["query"], ["attention"], r"modules_to_save 'bert.encoder.layer.0.attention' contains the LoRA target "
                               r"'bert.encoder.layer.0.attention.self.query'"),
    (["query"], ["layer.0"], r"modules_to_save 'bert.encoder.layer.0' contains the LoRA target"),
    (["value"], ["attention", "self"], r"modules_to_save 'bert.encoder.layer.0.attention' contains the "),
])
def test_overlapping_targets_and_modules_to_save_are_refused_naming_both(minilm, targets, saved, message):
    """A module trained in full that holds (or sits in) a LoRA target would share tensors with it: such an
    adapter could never be saved. Refused before anything changes."""
    state = plain_state(minilm)
    with pytest.raises((ValueError, TypeError), match=message):
        lorakit.inject(minilm, targets, r=2, modules_to_save=saved)
    assert_untouched(minilm, state)


def test_all_linear_leaves_the_insides_of_modules_to_save_alone(minilm, tmp_path):
    report = lorakit.inject(minilm, "all-linear", r=2, modules_to_save=["pooler"])
    assert report.replaced and not any(r.name.startswith("bert.pooler.") for r in report.replaced)
    lorakit.save_adapter(minilm, tmp_path / "a", print_fn=lambda s: None)  # saveable: no shared tensors
    assert "bert.pooler" in json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"]


def test_modules_to_save_as_a_string_is_refused(convnet):
    with pytest.raises(TypeError, match="modules_to_save must be a list of module-name suffixes, got the string 'fc3'"):
        lorakit.inject(convnet, ["fc1"], r=2, modules_to_save="fc3")


def test_zero_init_model_equals_base_exactly(tiny_gpt2):
    ids = torch.randint(0, 100, (2, 10))
    y0 = tiny_gpt2(ids).logits
    lorakit.inject(tiny_gpt2, ["c_fc", "wte", {"c_attn": ("q", "v")}], r=4, alpha=8)
    assert torch.equal(tiny_gpt2(ids).logits, y0)
    randomize(tiny_gpt2)
    assert (tiny_gpt2(ids).logits - y0).abs().max() > 1e-2


def test_summary_table_and_totals_line(convnet):
    lorakit.inject(convnet, ["fc1", "fc2", "fc3"], r=4, alpha=4)
    out = []
    counts = lorakit.summary(convnet, print_fn=out.append)
    text = out[0]
    assert "fc1.adapters.default.lora_a  (4, 400)" in text and "trainable" in text
    assert "fc1.base.weight" in text and "frozen" in text
    total = counts.total
    assert text.splitlines()[-1] == f"trainable params: 3,272 || all params: {total:,} || trainable%: {100 * 3272 / total:.4f}"


def test_real_minilm_dry_run_lists_twelve_and_changes_nothing(minilm):
    state = {k: v.clone() for k, v in minilm.state_dict().items()}
    report = lorakit.inject(minilm, ["query", "value"], r=8, dry_run=True)
    assert len(report.replaced) == 12
    assert {r.name.rsplit(".", 1)[-1] for r in report.replaced} == {"query", "value"}
    assert all((r.in_features, r.out_features, r.params) == (384, 384, 8 * 768) for r in report.replaced)
    assert not any(isinstance(m, LoraLayer) for m in minilm.modules())
    assert all(p.requires_grad for p in minilm.parameters())
    assert all(torch.equal(v, state[k]) for k, v in minilm.state_dict().items())


def test_real_minilm_misspelled_target_names_query(minilm):
    with pytest.raises(ValueError, match=r"target 'qeury' matches no module in BertForSequenceClassification; "
                                         r"closest module names: query"):
        lorakit.inject(minilm, ["qeury", "value"], r=8)
    assert not any(isinstance(m, LoraLayer) for m in minilm.modules())


@pytest.mark.parametrize("name", ["", "a.b", 3])
def test_adapter_names_that_cannot_key_a_module_are_refused(convnet, tmp_path, name):
    state = plain_state(convnet)
    with pytest.raises(ValueError, match="adapter name must be a non-empty string without dots"):
        lorakit.inject(convnet, ["fc1"], r=2, adapter=name)
    assert_untouched(convnet, state)
    with pytest.raises(ValueError, match="adapter name must be a non-empty string without dots"):
        lorakit.load_adapter(convnet, tmp_path, name=name)


# ---------------------------------------------------------------- per-layer rank and alpha


NAMES = ["fc", "block.fc", "a.b", "a_b", "layers.1", "layers.11", "model.layers.1.self_attn.q_proj"]
KEYS = ["fc", "^fc", r"^a\.b", "a.b", "layers.1", "1", r"layers\.1\d", "q_proj", "self_attn.q_proj", "(", "^(a|fc)$"]


def test_pattern_key_is_peft_get_pattern_key():
    """Every key against every name, alone and in pairs (which one wins): the same answer as PEFT's own function,
    where it has one (PEFT returns the name itself when no key matches)."""
    from lorakit.targets import pattern_key

    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key
    valid = [k for k in KEYS if k != "("]
    for name in NAMES:
        for keys in [[k] for k in valid] + [[a, b] for a in valid for b in valid if a != b]:
            ours, theirs = pattern_key(keys, name), get_pattern_key(keys, name)
            assert (ours if ours is not None else name) == theirs, (keys, name)
    assert pattern_key(["layers.1"], "layers.11") is None and pattern_key(["layers.1"], "x.layers.1") == "layers.1"
    assert pattern_key(["fc", "block.fc"], "block.fc") == "fc"  # the first key that names a layer wins
    assert pattern_key(["^fc"], "block.fc") is None and pattern_key(["a.b"], "a_b") == "a.b"


def test_patterns_give_the_layers_they_name_their_own_rank_and_alpha(tiny_llama):
    report = lorakit.inject(tiny_llama, ["q_proj", "v_proj", "up_proj"], r=4, alpha=8,
                            rank_pattern={r"layers\.1\.self_attn\.q_proj": 8, "up_proj": 2},
                            alpha_pattern={"v_proj": 2.5, "q_proj": 16})
    got = {name: (layer.adapters["default"].config.r, layer.adapters["default"].config.alpha,
                  tuple(layer.adapters["default"].lora_a.shape)) for name, layer in lorakit.lora_layers(tiny_llama)}
    for i in range(2):
        assert got[f"model.layers.{i}.self_attn.q_proj"] == ((8, 16, (8, 32)) if i else (4, 16, (4, 32)))
        assert got[f"model.layers.{i}.self_attn.v_proj"] == (4, 2.5, (4, 32))
        assert got[f"model.layers.{i}.mlp.up_proj"] == (2, 8, (2, 32))
    assert tiny_llama.model.layers[1].self_attn.q_proj.adapters["default"].scale == 2.0
    assert {r.name: (r.config.r, r.params) for r in report.replaced}["model.layers.1.self_attn.q_proj"] == (8, 8 * 64)
    lines = str(report).splitlines()
    assert re.search(r"module\s+kind\s+in\s+out\s+params\s+r\s+alpha\s+slices", lines[1])
    row = next(line for line in lines if "layers.1.self_attn.q_proj" in line)
    assert row.split()[-3:] == ["8", "16", "-"]
    plain = str(lorakit.inject(make_tiny_llama(), ["q_proj"], r=4, dry_run=True)).splitlines()[1]
    assert " r " not in plain and "alpha" not in plain  # no per-layer columns when no layer differs


def test_a_key_names_full_names_and_dotted_suffixes_and_caret_anchors_it():
    model = Nested()
    lorakit.inject(model, ["fc", "a.b", "a_b", re.compile(r"layers\.\d+")], r=2,
                   rank_pattern={"^fc": 4, "a.b": 3, r"layers\.1": 5})
    ranks = {name: layer.adapters["default"].config.r for name, layer in lorakit.lora_layers(model)}
    assert {k: ranks[k] for k in ("fc", "block.fc", "a.b", "a_b", "layers.1", "layers.11")} == \
        {"fc": 4, "block.fc": 2, "a.b": 3, "a_b": 3, "layers.1": 5, "layers.11": 2}


def test_a_rank_pattern_with_alpha_none_keeps_alpha_equal_to_each_layers_rank(tiny_llama):
    lorakit.inject(tiny_llama, ["q_proj"], r=4, rank_pattern={"layers.0.self_attn.q_proj": 8})
    assert [layer.adapters["default"].scale for _, layer in lorakit.lora_layers(tiny_llama)] == [1.0, 1.0]


@pytest.mark.parametrize("patterns, message", [
    ({"rank_pattern": {"qproj": 8}},
     r"rank_pattern key 'qproj' names none of the 4 targeted layers; closest layer names: q_proj"),
    ({"alpha_pattern": {"layers.5.q_proj": 8}}, r"alpha_pattern key 'layers.5.q_proj' names none of the 4"),
    ({"rank_pattern": {"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 8}},
     r"rank_pattern key 'layers\\\\.0\\\\.self_attn\\\\.q_proj' sets no layer: 'model.layers.0.self_attn.q_proj' "
     r"and any other layer it names are set by the earlier key 'q_proj' \(the first key that names a layer wins, "
     r"as in PEFT\)"),
    ({"rank_pattern": {"(q": 8}}, r"rank_pattern key '\(q' is not a valid regex \(missing \)"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]: r must be an integer >= 1, got 0"),
    ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\]: r must be an integer >= 1, got 2.5"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, r"alpha_pattern\['q_proj'\]: alpha must be a finite number > 0"),
    ({"alpha_pattern": {"q_proj": None}}, r"alpha_pattern\['q_proj'\] must be a number, got None"),
    ({"alpha_pattern": {"q_proj": True}}, r"alpha_pattern\['q_proj'\]: alpha must be a finite number > 0"),
    ({"rank_pattern": {3: 8}}, r"rank_pattern keys must be strings \(regexes over module names\), got 3"),
    ({"rank_pattern": [("q_proj", 8)]}, r"rank_pattern must be a dict of regex → r"),
    ({"rank_pattern": {"q_proj": 64}}, r"r=64 exceeds min\(in, out\)=32"),
])
def test_a_pattern_that_cannot_apply_is_refused_before_the_model_changes(tiny_llama, patterns, message):
    state = plain_state(tiny_llama)
    with pytest.raises(ValueError, match=message):
        lorakit.inject(tiny_llama, ["q_proj", "v_proj"], r=4, **patterns)
    assert_untouched(tiny_llama, state)


def test_patterns_apply_to_each_slice_of_a_fused_projection(tiny_gpt2):
    lorakit.inject(tiny_gpt2, {"c_attn": ("q", "v")}, r=2, alpha=4, rank_pattern={r"h\.1\.attn\.c_attn": 3})
    shapes = [tuple(layer.adapters["default"].lora_a.shape) for _, layer in lorakit.lora_layers(tiny_gpt2)]
    assert shapes == [(4, 32), (6, 32)]  # two slices of rank 2, then two of rank 3

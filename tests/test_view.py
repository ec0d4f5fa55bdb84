"""The traced graph of an adapted model: shapes equal a plain forward's, LoRA and its slices are where surgery
put them, repeated blocks collapse, the page is self-contained, the text view collapses and shows shapes."""

import json
import re

import pytest
import torch
from torch import nn

import lorakit
from lorakit.view import graph, page, show, trace
from lorakit.view.text import tree_lines

from conftest import bert_example, hook_shapes


@pytest.fixture
def adapted_minilm(minilm):
    lorakit.inject(minilm, ["query", "value"], r=4, modules_to_save=["classifier"])
    return minilm


def view_of(t, name: str) -> int:
    return next(n.id for n in t.nodes if n.kind == "module" and n.name == name)


def test_every_module_shape_equals_a_plain_forward(adapted_minilm, tiny_gpt2, tiny_llama, convnet):
    lorakit.inject(tiny_gpt2, {"c_attn": ("q", "v")}, r=2)
    lorakit.inject(tiny_llama, ["q_proj", "v_proj"], r=2)
    lorakit.inject(convnet, ["fc1", "fc2", "fc3"], r=4)
    for model, example in [(adapted_minilm, bert_example()), (tiny_gpt2, {"input_ids": torch.arange(20).view(2, 10)}),
                           (tiny_llama, {"input_ids": torch.arange(16).view(2, 8), "use_cache": False}),
                           (convnet, torch.randn(2, 3, 32, 32))]:
        expected = hook_shapes(model, example)
        t = trace(model, example)
        modules = [n for n in t.nodes if n.kind == "module"]
        assert {n.name for n in modules} == set(expected)
        for n in modules:
            ins, outs = expected[n.name][[m.id for m in modules if m.name == n.name].index(n.id)]
            assert {t.vars[v].shape for v in n.outputs} == outs, n.name
            assert {t.vars[v].shape for v in t.inputs_of(n.id)} <= ins, n.name  # what flows in was passed in


def test_the_lora_view_is_the_walkthroughs_surgery(adapted_minilm):
    """[2×10×384] → reshape [20×384] → A → [20×4] → B, added to the base's [20×384] → [2×10×384]."""
    t = trace(adapted_minilm, bert_example())
    g = graph.build(t)
    query = view_of(t, "bert.encoder.layer.0.attention.self.query")
    data = g.data()
    by_block = {b: data["nodes"][b] for b in g.blocks[query]}
    base = [b for b, n in by_block.items() if n["kind"] == "module"]
    assert [by_block[b]["op"] for b in base] == ["Linear"] and not by_block[base[0]].get("added")
    assert all(n.get("added") for b, n in by_block.items() if b not in base)
    shapes = {(s, d): t.vars[v].shape for s, d, v in g.views[query]}
    assert shapes[("in", base[0])] == (2, 10, 384)
    matmul = next(b for b, n in by_block.items() if n["op"] == "Tensor.matmul")
    add = next(b for b, n in by_block.items() if n["op"] == "Tensor.addmm_")
    assert [t.vars[v].shape for s, d, v in g.views[query] if s == matmul] == [(20, 4)]
    assert sorted(t.vars[v].shape for s, d, v in g.views[query] if d == add) == [(20, 4), (20, 384)]
    assert [t.vars[v].shape for s, d, v in g.views[query] if d == "out"] == [(2, 10, 384)]
    reads = {t.vars[v].name for b in (matmul, add) for v in t.nodes[int(b)].statics}
    assert reads == {"t(lora_a)", "t(lora_b)"}
    assert data["nodes"][str(query)]["lora"]["params"] == 2 * 4 * 384 and data["nodes"][str(query)]["before"] == int(base[0])


def test_identical_layers_collapse_into_one_group_that_opens_into_the_first(adapted_minilm):
    t = trace(adapted_minilm, bert_example())
    g = graph.build(t)
    encoder = view_of(t, "bert.encoder")
    assert len(g.blocks[encoder]) == 1 and g.blocks[encoder][0] in g.groups
    members = g.groups[g.blocks[encoder][0]]
    assert [t.nodes[m].name for m in members] == [f"bert.encoder.layer.{i}" for i in range(6)]
    node = g.data()["nodes"][g.blocks[encoder][0]]
    assert node["op"] == "BertLayer × 6" and node["name"] == "layer.0–5" and node["loraInside"] == 12
    # the hidden state and the mask go in, the last layer's output comes out
    assert sorted(t.vars[v].shape for s, d, v in g.views[encoder] if s == "in") == [(2, 1, 10, 10), (2, 10, 384)]


def test_layers_that_differ_do_not_collapse(minilm):
    lorakit.inject(minilm, [re.compile(r".*layer\.[0-2]\.attention\.self\.query")], r=4)
    t = trace(minilm, bert_example())
    g = graph.build(t)
    blocks = g.blocks[view_of(t, "bert.encoder")]
    assert [len(g.groups.get(b, [b])) for b in blocks] == [3, 3]  # layers 0-2 have LoRA, 3-5 do not


def test_fused_qkv_slices_are_named_and_drawn(tiny_gpt2):
    lorakit.inject(tiny_gpt2, {"c_attn": ("q", "v")}, r=2)
    t = trace(tiny_gpt2, {"input_ids": torch.arange(20).view(2, 10)})
    data = graph.build(t).data()
    c_attn = data["nodes"][str(view_of(t, "transformer.h.0.attn.c_attn"))]
    assert c_attn["lora"]["slices"] == [[0, 32, "q"], [64, 96, "v"]] and c_attn["lora"]["kind"] == "conv1d"
    row = next(r for r in data["surgery"] if r["path"] == "transformer.h.0.attn.c_attn")
    assert row["before"] == "Conv1D(32→96)" and row["slices"] == [[0, 32, "q"], [64, 96, "v"]]


def test_a_module_that_returns_its_input_still_carries_the_flow(tiny_gpt2):
    """Dropout in eval returns its input: the graph goes through it, not around it."""
    t = trace(tiny_gpt2, {"input_ids": torch.arange(20).view(2, 10)})
    g = graph.build(t)
    drop = view_of(t, "transformer.h.0.attn.resid_dropout")
    assert [t.nodes[int(b)].op for b in g.blocks[drop]] == ["returned as is"]
    attn = view_of(t, "transformer.h.0.attn")
    assert any(d == str(drop) for _, d, _ in g.views[attn]) and any(s == str(drop) for s, _, _ in g.views[attn])


def test_any_model_with_control_flow_shared_modules_and_keyword_inputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)
            self.gate = nn.Linear(6, 1)

        def forward(self, x, scale=None, *, twice=True):
            h = self.proj(x)
            if twice:
                h = self.proj(torch.relu(h))  # the same module, called again
            if scale is not None:
                h = h * scale
            return {"out": h, "gate": torch.sigmoid(self.gate(h))}

    torch.manual_seed(0)
    net = Net().train()
    lorakit.inject(net, ["proj"], r=2)
    before = net(torch.ones(1, 6))["out"]
    t = trace(net, {"x": torch.randn(3, 6), "scale": torch.full((3, 1), 2.0)})
    assert [n.name for n in t.nodes if n.kind == "module" and n.name] == ["proj", "proj.base", "proj", "proj.base", "gate"]
    g = graph.build(t)
    root = g.views[0]
    assert {t.vars[v].name for s, _, v in root if s == "in"} == {"x", "scale"}
    assert sorted(t.vars[v].shape for _, d, v in root if d == "out") == [(3, 1), (3, 6)]
    assert net.training and all(m.training for m in net.modules())  # modes restored
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())  # hooks removed
    torch.testing.assert_close(net(torch.ones(1, 6))["out"], before)


def test_bad_inputs_are_refused_with_the_reason(convnet):
    with pytest.raises(TypeError, match="nn.Module"):
        trace(lambda x: x, torch.ones(1))
    with pytest.raises(ValueError, match="holds no tensor"):
        trace(convnet, {"x": 3})
    with pytest.raises(RuntimeError, match="mat1 and mat2|shape"):
        trace(convnet, torch.ones(2, 3, 40, 40))  # the model's own error
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in convnet.modules())


def test_the_page_is_self_contained_and_safe_with_any_module_name(convnet, tmp_path):
    lorakit.inject(convnet, ["fc1"], r=2)
    convnet.add_module("</script><script>alert(1)</script>", nn.Identity())
    path = show(convnet, torch.randn(2, 3, 32, 32), tmp_path / "out" / "net.html", title="<b>net</b>")
    text = path.read_text()
    assert text.count("<script") == 3 and "alert(1)</script>" not in text  # data, dagre, viewer; nothing injected
    assert "&lt;b&gt;net&lt;/b&gt;" in text and not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    data = json.loads(text.split('<script id="lorakit-data" type="application/json">')[1].split("</script>")[0])
    assert data["surgery"][0]["path"] == "fc1" and data["views"]["0"]["blocks"]
    with pytest.raises(IsADirectoryError):
        page.write(graph.build(trace(convnet, torch.randn(1, 3, 32, 32))), tmp_path)


def test_the_minilm_page_is_small(adapted_minilm, tmp_path):
    path = show(adapted_minilm, bert_example(length=16), tmp_path / "minilm.html")
    assert path.stat().st_size < 2_000_000


def test_text_tree_collapses_identical_layers_and_adds_shapes(adapted_minilm):
    t = trace(adapted_minilm, bert_example())
    marks = {f"bert.encoder.layer.{i}.attention.self.query": "◆" for i in range(6)}
    lines = tree_lines(adapted_minilm, marks, {}, t.module_shapes())
    text = "\n".join(lines)
    assert "0–5 (BertLayer) × 6, identical: 0 shown" in text and "layer.3" not in text
    assert sum("query (LoraLayer)" in line for line in lines) == 1 and text.count("◆") == 1
    query = next(line for line in lines if "query (LoraLayer)" in line)
    assert query.endswith("[2×10×384] → [2×10×384]")
    # a mark on one layer only: that layer no longer collapses with the others
    lines = tree_lines(adapted_minilm, {"bert.encoder.layer.4.attention.self.query": "◆"})
    assert any("0–3 (BertLayer) × 4" in line for line in lines) and any(" 4 (BertLayer)" in line for line in lines)


def test_conv2d_and_embedding_lora_and_a_merged_layer(convnet, tiny_gpt2):
    lorakit.inject(convnet, ["conv1", "fc1"], r=2)
    lorakit.inject(tiny_gpt2, ["wte"], r=2)
    for model, example, name in [(convnet, torch.randn(2, 3, 32, 32), "conv1"),
                                 (tiny_gpt2, {"input_ids": torch.arange(20).view(2, 10)}, "transformer.wte")]:
        expected = hook_shapes(model, example)
        t = trace(model, example)
        layer = view_of(t, name)
        assert {t.vars[v].shape for v in t.nodes[layer].outputs} == expected[name][0][1]
        inside = [t.nodes[c] for c in t.nodes[layer].children]
        assert [n.op for n in inside if n.kind == "module"] == [type(model.get_submodule(name).base).__name__,
                                                                 "LoraAdapter"]
    lorakit.merge(convnet)
    data = graph.build(trace(convnet, torch.randn(2, 3, 32, 32))).data()
    fc1 = next(n for n in data["nodes"].values() if n["path"] == "fc1")
    assert fc1["lora"]["merged"] and fc1["loraInside"] == 1

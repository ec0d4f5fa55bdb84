"""The model page in a real headless Chromium: blocks and LoRA nodes in the DOM, a click opens a block, every
shape on screen equals what forward hooks saw, the page makes no request, and MiniLM's opens in under 2 s."""

import time

import pytest
import torch

import lorakit
from lorakit.view import show
from lorakit.view.browser import browser, missing, requests

from conftest import bert_example, hook_shapes

pytestmark = pytest.mark.skipif(missing() is not None, reason=f"no browser: {missing()}")

BLOCKS = """return Array.from(document.querySelectorAll('#graph g.block, #graph g.port')).map(g => ({
  id: g.dataset.id, name: g.dataset.name || '', op: g.dataset.op || '', path: g.dataset.path || '',
  cls: g.getAttribute('class')}))"""
EDGES = """return Array.from(document.querySelectorAll('#graph g.edge')).map(g => ({
  from: g.dataset.from, to: g.dataset.to, v: g.dataset.var, shape: g.querySelector('text.shape').textContent,
  dtype: g.querySelector('text.shape').dataset.dtype}))"""
ROWS = """return Array.from(document.querySelectorAll('#vars tbody tr')).map(r => ({v: r.dataset.var,
  name: r.querySelector('.name').textContent, shape: r.querySelector('.shape').textContent}))"""


@pytest.fixture(scope="module")
def chromium():
    with browser() as b:
        yield b


@pytest.fixture(autouse=True)
def no_script_errors(chromium):
    chromium.get_log("browser")
    yield
    assert [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"] == []


def open_page(b, path, fragment=""):
    b.get_log("performance")  # drop what earlier pages logged
    start = time.perf_counter()
    b.get(path.resolve().as_uri() + fragment)
    for _ in range(200):
        if b.execute_script("return document.documentElement.dataset.ready"):
            break
        time.sleep(0.01)
    return time.perf_counter() - start


def blocks(b):
    return {d["id"]: d for d in b.execute_script(BLOCKS)}


def by_name(b, name):
    found = [d for d in blocks(b).values() if d["name"] == name]
    assert len(found) == 1, (name, sorted(d["name"] for d in blocks(b).values()))
    return found[0]


def click(b, block):
    view = b.execute_script("return document.documentElement.dataset.view")
    b.find_element("css selector", f'#graph g.block[data-id="{block["id"]}"]').click()
    assert b.execute_script("return document.documentElement.dataset.view") != view, "the click opened nothing"


def current_path(b):
    return b.execute_script("return document.querySelector('#crumbs a.here').getAttribute('href')")


def shape_tuple(text):
    return () if text == "scalar" else tuple(int(s) for s in text.split("×"))


def check_shapes(b, expected, view_path):
    """Every edge leaving a module block carries one of the shapes that module returned under forward hooks;
    every edge entering it one it was given; the view's own inputs are among its module's inputs; the
    table lists each tensor on screen with the shape on its edge."""
    shown, edges = blocks(b), b.execute_script(EDGES)
    assert edges
    calls = lambda path: expected[path]  # noqa: E731
    for e in edges:
        shape = shape_tuple(e["shape"])
        for end, side in ((e["from"], 1), (e["to"], 0)):
            block = shown[end]
            if block["id"] in ("in", "out"):
                if view_path is not None:
                    assert any(shape in call[0 if end == "in" else 1] for call in calls(view_path)), (view_path, e)
            elif "module" in block["cls"] or "group" in block["cls"]:
                assert any(shape in call[side] for call in calls(block["path"])), (block["path"], side, e)
    rows = {r["v"]: r for r in b.execute_script(ROWS)}
    for e in edges:
        assert rows[e["v"]]["shape"] == f"[{e['shape']}]"


@pytest.fixture(scope="module")
def minilm_page(tmp_path_factory, minilm_dir):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    lorakit.inject(model, ["query", "value"], r=8, modules_to_save=["classifier"])
    example = bert_example()
    path = show(model, example, tmp_path_factory.mktemp("pages") / "minilm.html")
    return path, {name: calls for name, calls in hook_shapes(model, example).items()}


def test_minilm_opens_fast_without_a_request_and_unboxes_down_to_lora(chromium, minilm_page):
    b, (path, expected) = chromium, minilm_page
    assert path.stat().st_size < 2_000_000
    seconds = open_page(b, path)
    assert seconds < 2.0 and int(b.execute_script("return document.documentElement.dataset.ready")) < 2000
    assert requests(b) == [path.resolve().as_uri()]

    assert {"bert", "dropout", "classifier"} <= {d["name"] for d in blocks(b).values()}
    assert "saved" in by_name(b, "classifier")["cls"]
    check_shapes(b, expected, "")
    click(b, by_name(b, "bert"))
    assert "has-lora" in by_name(b, "encoder")["cls"]
    check_shapes(b, expected, "bert")
    click(b, by_name(b, "encoder"))
    group = by_name(b, "layer.0–5")
    assert group["op"] == "BertLayer × 6" and "has-lora" in group["cls"] and len(blocks(b)) == 3  # group, in, out
    check_shapes(b, expected, "bert.encoder")
    click(b, group)
    assert current_path(b) == "#bert.encoder.layer.0"
    assert b.find_element("css selector", "#crumbs .count").text == "1 of 6"
    b.find_element("css selector", "#crumbs button.next").click()
    assert current_path(b) == "#bert.encoder.layer.1"
    b.find_element("css selector", "#crumbs button.prev").click()
    check_shapes(b, expected, "bert.encoder.layer.0")
    click(b, by_name(b, "attention"))
    click(b, by_name(b, "self"))
    assert current_path(b) == "#bert.encoder.layer.0.attention.self"
    crumbs = [a.text for a in b.find_elements("css selector", "#crumbs a")]
    assert crumbs == ["BertForSequenceClassification", "bert", "encoder", "layer.0", "attention", "self"]
    assert "lora" in by_name(b, "query")["cls"].split() and "lora" in by_name(b, "value")["cls"].split()
    assert "lora" not in by_name(b, "key")["cls"].split()
    assert by_name(b, "query")["op"] == "LoraLayer"
    check_shapes(b, expected, "bert.encoder.layer.0.attention.self")

    click(b, by_name(b, "query"))
    shown = blocks(b)
    base = by_name(b, "base")
    assert base["op"] == "Linear" and "added" not in base["cls"]
    added = [d for d in shown.values() if "added" in d["cls"]]
    assert {d["op"] for d in added} >= {"Tensor.matmul", "Tensor.addmm_"}
    shapes = {e["shape"] for e in b.execute_script(EDGES)}
    assert {"2×10×384", "20×384", "20×8"} <= shapes
    check_shapes(b, expected, "bert.encoder.layer.0.attention.self.query")
    assert requests(b) == []


def test_before_surgery_shows_the_layers_that_were_replaced(chromium, minilm_page):
    b, (path, expected) = chromium, minilm_page
    open_page(b, path, "#bert.encoder.layer.0.attention.self")
    after = sorted(e["shape"] for e in b.execute_script(EDGES))
    b.find_element("css selector", "#mode option[value=before]").click()
    shown = blocks(b).values()
    assert not [d for d in shown if "lora" in d["cls"].split()]
    was = [d for d in shown if "was" in d["cls"].split()]
    assert sorted(d["path"] for d in was) == ["bert.encoder.layer.0.attention.self.query.base",
                                             "bert.encoder.layer.0.attention.self.value.base"]
    assert all(d["op"] == "Linear" for d in was) and sorted(d["name"] for d in was) == ["query", "value"]
    assert sorted(e["shape"] for e in b.execute_script(EDGES)) == after  # the surgery changed no shape
    b.find_element("css selector", "#mode option[value=after]").click()
    assert "lora" in by_name(b, "query")["cls"].split()
    rows = b.find_elements("css selector", "#surgery tbody tr")
    assert len(rows) == 13 and "Linear(384→384)" in rows[0].text and "6,144" in rows[0].text


def test_gpt2_fused_qkv_slices(chromium, tiny_gpt2, tmp_path):
    lorakit.inject(tiny_gpt2, {"c_attn": ("q", "v")}, r=2)
    example = {"input_ids": torch.arange(20).view(2, 10)}
    expected = hook_shapes(tiny_gpt2, example)
    path = show(tiny_gpt2, example, tmp_path / "gpt2.html")
    open_page(chromium, path, "#transformer.h.0.attn")
    c_attn = by_name(chromium, "c_attn")
    assert "lora" in c_attn["cls"].split()
    slices = chromium.execute_script("""return Array.from(document.querySelectorAll(
        '#graph g.block[data-id="%s"] rect.slice')).map(r => [r.dataset.slice, r.dataset.label])""" % c_attn["id"])
    assert slices == [["0:32", "q"], ["64:96", "v"]]
    out = [e["shape"] for e in chromium.execute_script(EDGES) if e["from"] == c_attn["id"]]
    assert out == ["2×10×96"]
    check_shapes(chromium, expected, "transformer.h.0.attn")
    click(chromium, c_attn)
    check_shapes(chromium, expected, "transformer.h.0.attn.c_attn")
    assert requests(chromium) == [path.resolve().as_uri()]


def test_convnet_with_lora_on_fc1_to_fc3(chromium, convnet, tmp_path):
    lorakit.inject(convnet, ["fc1", "fc2", "fc3"], r=4)
    example = torch.randn(2, 3, 32, 32)
    expected = hook_shapes(convnet, example)
    path = show(convnet, example, tmp_path / "convnet.html")
    open_page(chromium, path)
    lora = sorted(d["name"] for d in blocks(chromium).values() if "lora" in d["cls"].split())
    assert lora == ["fc1", "fc2", "fc3"] and "lora" not in by_name(chromium, "conv1")["cls"].split()
    check_shapes(chromium, expected, "")
    click(chromium, by_name(chromium, "fc1"))
    assert {"2×400", "2×4", "2×120"} <= {e["shape"] for e in chromium.execute_script(EDGES)}
    check_shapes(chromium, expected, "fc1")
    assert requests(chromium) == [path.resolve().as_uri()]


def test_llama_layers_collapse_and_lora_sits_on_q_and_v(chromium, tiny_llama, tmp_path):
    lorakit.inject(tiny_llama, ["q_proj", "v_proj"], r=2)
    example = {"input_ids": torch.arange(16).view(2, 8), "use_cache": False}
    expected = hook_shapes(tiny_llama, example)
    path = show(tiny_llama, example, tmp_path / "llama.html")
    open_page(chromium, path, "#model")
    group = by_name(chromium, "layers.0–1")
    assert group["op"] == "LlamaDecoderLayer × 2" and "has-lora" in group["cls"]
    check_shapes(chromium, expected, "model")
    click(chromium, group)
    click(chromium, by_name(chromium, "self_attn"))
    lora = sorted(d["name"] for d in blocks(chromium).values() if "lora" in d["cls"].split())
    assert lora == ["q_proj", "v_proj"]
    check_shapes(chromium, expected, "model.layers.0.self_attn")
    assert requests(chromium) == [path.resolve().as_uri()]

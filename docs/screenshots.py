"""The README's pictures of the model page, taken by the headless Chromium the page's tests use.

    python docs/screenshots.py      # writes runs/graphs/*.html (the pages) and docs/images/*.png

MiniLM is the packaged model as `lorakit inspect --html` draws it for the default sentiment job (LoRA r=8
on query and value, the classifier trained in full), traced on two reviews. GPT-2 is the walkthrough's shape
(768 wide, 12 heads) with random weights and 2 layers, LoRA r=4 on the q and v slices of its fused c_attn.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import lorakit
from lorakit.models import ConvNet
from lorakit.train.config import build_config
from lorakit.train.recipe import inspect
from lorakit.view.browser import browser

DOCS = Path(__file__).resolve().parent


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=768, n_head=12, n_layer=2, vocab_size=1000, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    lorakit.inject(model, {"c_attn": ("q", "v")}, r=4)
    return model


def shoot(b, page: Path, fragment: str, png: Path, width: int = 1400) -> None:
    """The page opened at `fragment`, from the top to the end of the graph."""
    b.set_window_size(width, 900)
    b.get("about:blank")  # a page that is open already would only change its #
    start = time.perf_counter()
    b.get(page.as_uri() + fragment)
    while not (ready := b.execute_script("return document.documentElement.dataset.ready")):
        time.sleep(0.01)
    print(f"{page.name}{fragment}: {page.stat().st_size / 1e6:.2f} MB, drawn {int(ready)} ms after navigation "
          f"began ({time.perf_counter() - start:.2f} s from the request to open it)")
    bottom = b.execute_script("return document.getElementById('canvas').getBoundingClientRect().bottom")
    b.set_window_size(width, int(bottom) + 140)  # the window's frame takes part of its height
    b.execute_script("window.dispatchEvent(new Event('hashchange'))")
    b.save_screenshot(str(png))
    print(f"wrote {png.relative_to(DOCS.parent)}")


def main() -> None:
    graphs, images = DOCS.parent / "runs" / "graphs", DOCS / "images"
    images.mkdir(exist_ok=True)
    print(inspect(build_config({}), html=graphs / "minilm.html").splitlines()[-1])
    example = {"input_ids": torch.arange(20).view(2, 10), "use_cache": False}
    print(f"wrote {lorakit.show(gpt2(), example, graphs / 'gpt2.html')}")
    net = ConvNet()
    lorakit.inject(net, ["fc1", "fc2", "fc3"], r=4)
    print(f"wrote {lorakit.show(net, torch.randn(2, 3, 32, 32), graphs / 'convnet.html')}")
    with browser() as b:
        shoot(b, graphs / "minilm.html", "#bert.encoder.layer.0.attention.self", images / "minilm-self-attention.png")
        shoot(b, graphs / "minilm.html", "#bert.encoder.layer.0.attention.self.query", images / "minilm-lora-query.png")
        shoot(b, graphs / "gpt2.html", "#transformer.h.0.attn", images / "gpt2-fused-qkv.png")
        shoot(b, graphs / "convnet.html", "", images / "convnet.png")


if __name__ == "__main__":
    main()

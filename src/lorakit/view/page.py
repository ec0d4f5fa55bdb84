"""One self-contained HTML page of a traced model: the graph's JSON, dagre (MIT, shipped in assets/) and
the viewer, inline. It works offline and makes no request."""

from __future__ import annotations

import html
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..atomic import write_file
from .graph import Graph

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} — lorakit</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>{css}</style></head>
<body>
<header><h1>{title}</h1><div class="summary">{summary}</div></header>
<div id="toolbar"><label>Surgery <select id="mode"><option value="after">after: with LoRA</option>
<option value="before">before: the model as it was</option></select></label>
<span class="legend"><span><i class="float"></i>float32</span><span><i class="half"></i>bf16 / fp16</span>
<span><i class="int"></i>integer</span><span><i class="bool"></i>bool</span>
<span>· dots on an edge: its number of dimensions</span>
<span><i class="lora"></i>LoRA (◆ n: LoRA layers inside; ⊞ click to open)</span></span></div>
<nav id="crumbs"></nav>
<div id="canvas"><svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg></div>
<section><h2>Variables on screen</h2><table id="vars"><thead><tr><th>name</th><th>shape</th><th>dtype</th>
<th>op</th></tr></thead><tbody></tbody></table></section>
<section><h2>Surgery</h2><table id="surgery"><thead><tr><th>module</th><th>before</th><th>after</th>
<th>parameters added</th><th>slices</th></tr></thead><tbody></tbody></table></section>
<script id="lorakit-data" type="application/json">{data}</script>
<script>{dagre}</script>
<script>{viewer}</script>
</body></html>
"""


def _asset(name: str) -> str:
    return files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def _embed(data: dict[str, Any]) -> str:
    """JSON that cannot end its <script> element early."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def render(graph: Graph, summary: str = "") -> str:
    """The page's HTML."""
    return PAGE.format(title=html.escape(graph.title), summary=html.escape(summary), css=_asset("viewer.css"),
                       data=_embed(graph.data()), dagre=_asset("dagre.min.js"), viewer=_asset("viewer.js"))


def write(graph: Graph, path: str | Path, summary: str = "") -> Path:
    """Write the page to path atomically (a reader sees the old file or the whole new one)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the HTML file's path, e.g. {path / 'model.html'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path, render(graph, summary))

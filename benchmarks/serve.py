"""`python -m benchmarks.serve`: lorakit's server against what a team serving many fine-tunes would pick
instead, on SmolLM2-135M, in one run. It only ever talks to 127.0.0.1 and stops by itself.

Workload: 64 requests from 16 concurrent clients, prompts of 64–256 tokens cut from Hamlet, 64 generated
tokens each (end-of-text ignored, so every side generates the same count), greedy, adapters of r=16 on all
seven linear kinds. Every side runs in the same precision: bf16 where the machine computes it natively.

    (a) lorakit, every request on one adapter          (e) `transformers serve --continuous-batching`, the base
    (b) lorakit, requests spread over 8 adapters       (f) a PEFT server: PeftModel with 8 adapters, requests one
    (c) lorakit, over 64 adapters, --max-loaded 16         at a time, set_adapter + generate
    (d) lorakit serving the bare base                  (g) the same with adapter_names= batches of 16 through generate

Reported: generated tokens/s, requests/s, time to first token and inter-token latency (p50, p95; the PEFT
servers answer whole, so their "first token" is the whole answer), the server's peak memory, and the cold
load of an adapter while 8 streams run: its time (p50 of 5) and how long those streams stalled meanwhile.

    python -m benchmarks.serve             # ~10 min on 2 CPU cores; rewrites its section of benchmarks/results.md
    python -m benchmarks.serve --quick     # a tiny random model, a few requests: checks that it runs (temp dir)
    python -m benchmarks.serve --ray       # the same workload on Ray Serve, 1 vs 2 replicas (benchmarks/serve_ray.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

import lorakit
from lorakit import hub

from .common import RESULTS, job_environment, pick, replace_section

TITLE = "## Serving: lorakit's server against vLLM-style alternatives on one CPU"
SCENARIOS = ("a", "b", "c", "d", "e", "f", "g")
LABELS = {"a": "lorakit, 1 adapter", "b": "lorakit, 8 adapters", "c": "lorakit, 64 adapters (16 resident)",
          "d": "lorakit, bare base", "e": "transformers serve --continuous-batching, bare base",
          "f": "PEFT set_adapter + generate, one at a time (8 adapters)",
          "g": "PEFT adapter_names= batches of 16 (8 adapters)"}
GOALS = [("b vs d", "b", "d", 0.90), ("c vs d", "c", "d", 0.80), ("b vs f", "b", "f", 5.0), ("b vs g", "b", "g", 1.5),
         ("d vs e", "d", "e", 1.3)]
PYTHON = sys.executable


# ---------------------------------------------------------------- inputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """n prompts of lo..hi tokens, consecutive stretches of Hamlet."""
    ids = tokenizer(hub.hamlet_path().read_text(encoding="utf-8"))["input_ids"]
    rng, out, at = random.Random(seed), [], 0
    for _ in range(n):
        length = rng.randint(lo, hi)
        if at + length > len(ids):
            at = 0
        out.append(tokenizer.decode(ids[at:at + length]))
        at += length
    return out


def make_adapters(model_dir: Path, out: Path, count: int, r: int) -> list[str]:
    """`count` adapters of rank r on every linear kind, each with its own random B (small: sane outputs), in
    lorakit's format under `out` and in PEFT's under `out`-peft (for the PEFT servers)."""
    from transformers import AutoModelForCausalLM

    names = [f"c{i}" for i in range(count)]
    peft = out.with_name(out.name + "-peft")
    if all((d / n / "adapter_config.json").is_file() for n in names for d in (out, peft)):
        return names
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.inject(model, "all-linear", r=r, alpha=2 * r)
    adapters = [m for m in model.modules() if isinstance(m, lorakit.LoraAdapter)]
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for a in adapters:
                a.lora_b.copy_(torch.randn(a.lora_b.shape, generator=g) * 0.002)
        lorakit.save_adapter(model, out / name, overwrite=True, print_fn=lambda *a: None)
        lorakit.save_adapter(model, peft / name, format="peft", overwrite=True, print_fn=lambda *a: None)
    return names


def tiny_model(out: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (--quick)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
                     ).save_pretrained(out)
    AutoTokenizer.from_pretrained(hub.smollm2_dir()).save_pretrained(out)
    return out


# ---------------------------------------------------------------- servers


class Server:
    """A server process on 127.0.0.1 (its own process group), its peak memory read before it stops."""

    def __init__(self, argv: list[str], port: int, health: str = "/health", env: dict | None = None,
                 ready: set[int] | None = None) -> None:
        """Started once `health` answers: with a status in `ready`, or with any below 500 if None."""
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                                              **(env or {})))
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                status = httpx.get(self.url + health, timeout=2).status_code
                if (status in ready) if ready is not None else (status < 500):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{argv[:4]} did not start")

    def peak_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


def lorakit_server(model_dir: Path, adapters: Path, max_loaded: int) -> Server:
    port = free_port()
    return Server([PYTHON, "-m", "lorakit", "serve", "--model.path", str(model_dir), "--adapter-dir", str(adapters),
                   "--max-loaded", str(max_loaded), "--max-batch", "16", "--max-queue", "256", "--port", str(port)],
                  port)


def transformers_server(model_dir: Path, bf16: bool) -> Server:
    port = free_port()
    exe = Path(PYTHON).parent / "transformers"
    return Server([str(exe), "serve", "--continuous-batching", "--device", "cpu", "--dtype",
                   "bfloat16" if bf16 else "float32", "--host", "127.0.0.1", "--port", str(port), "--log-level",
                   "warning", str(model_dir)], port)


def peft_server(model_dir: Path, adapters: Path, names: list[str], mode: str, bf16: bool) -> Server:
    port = free_port()
    return Server([PYTHON, "-m", "benchmarks.serve", "--peft-server", mode, "--port", str(port), "--model-dir",
                   str(model_dir), "--adapters", str(adapters), "--names", ",".join(names),
                   "--bf16", "true" if bf16 else "false"], port, env={"PYTHONPATH": str(Path(__file__).parent.parent)})


def run_peft_server(args) -> None:
    """The server a PEFT user would write: FastAPI, a PeftModel holding the adapters; `serial` answers one
    request at a time (set_adapter + generate), `batched` gathers up to 16 and runs generate(adapter_names=).
    As in lorakit's server, generation runs on the main thread (which loaded the model: on a CPU torch runs
    fastest there) and uvicorn on another."""
    import queue
    import threading

    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = args.names.split(",")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if args.bf16 == "true" else None)
    model = PeftModel.from_pretrained(base, Path(args.adapters) / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(Path(args.adapters) / name, adapter_name=name)
    model.eval()
    jobs: queue.Queue = queue.Queue()  # (prompt, adapter, max_tokens, answer: [text], done: Event)
    app = FastAPI()

    def generate(batch: list[tuple], **kw) -> list[str]:
        enc = tokenizer([job[0] for job in batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=batch[0][2], min_new_tokens=batch[0][2], do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, **kw)
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: dict) -> dict:
        answer, done = [], threading.Event()
        jobs.put((body["prompt"], body["model"], body["max_tokens"], answer, done))
        done.wait()
        return {"choices": [{"text": answer[0]}], "usage": {"completion_tokens": body["max_tokens"]}}

    threading.Thread(target=uvicorn.run, args=(app,), kwargs={"host": "127.0.0.1", "port": args.port,
                     "log_level": "warning"}, daemon=True).start()
    while True:
        batch = [jobs.get()]
        if args.peft_server == "serial":
            model.set_adapter(batch[0][1])
            texts = generate(batch)
        else:
            time.sleep(0.05)  # let a batch gather
            while len(batch) < 16 and not jobs.empty():
                batch.append(jobs.get())
            texts = generate(batch, adapter_names=[job[1] for job in batch])
        for job, text in zip(batch, texts):
            job[3].append(text)
            job[4].set()


# ---------------------------------------------------------------- load


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int, stream: bool,
              ignore_eos: bool = True) -> dict:
    """One completion; with ignore_eos (a server that takes it) exactly `tokens` tokens are generated, else the
    count is the server's own (usage)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": stream,
            **({"ignore_eos": True} if ignore_eos else {}), **({"stream_options": {"include_usage": True}} if stream else {})}
    start, marks, count = time.perf_counter(), [], 0
    if stream:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    chunk = json.loads(line[5:])
                    if chunk["choices"] and chunk["choices"][0].get("text"):
                        marks.append(time.perf_counter())
                    if chunk.get("usage"):
                        count = chunk["usage"]["completion_tokens"]
    else:
        r = await client.post(url + "/v1/completions", json=body)
        if r.status_code != 200:
            return {"error": f"{r.status_code} {r.text[:200]}"}
        marks.append(time.perf_counter())
        count = r.json()["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"start": start, "end": end, "ttft": marks[0] - start if marks else end - start,
            "gaps": [b - a for a, b in zip(marks, marks[1:])], "tokens": count or (len(marks) if stream else tokens)}


async def drive(url: str, jobs: list[tuple[str, str]], tokens: int, concurrency: int, stream: bool,
                ignore_eos: bool = True) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=1800) as client:
        async def guarded(model, prompt):
            async with gate:
                return await one(client, url, model, prompt, tokens, stream, ignore_eos)
        return await asyncio.gather(*(guarded(m, p) for m, p in jobs))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(results: list[dict], peak_mb: float, streamed: bool) -> dict[str, Any]:
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    if not ok:
        raise SystemExit(f"every request failed, e.g. {errors[0]}")
    wall = max(r["end"] for r in ok) - min(r["start"] for r in ok)
    gaps = [g for r in ok for g in r["gaps"]]
    ttft = [r["ttft"] for r in ok]
    return {"requests": len(ok), "errors": errors[:3], "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "requests_per_s": len(ok) / wall,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
            "itl_p50": percentile(gaps, 0.5) if streamed else None, "itl_p95": percentile(gaps, 0.95) if streamed else None,
            "itl_max": max(gaps) if gaps else None, "peak_mb": peak_mb, "streamed": streamed}


def metric(url: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def cold_load(model_dir: Path, adapters: Path, names: list[str], prompt: str, tokens: int, log) -> dict[str, Any]:
    """8 streams on resident adapters; meanwhile one request on a resident adapter (warm), then one on a cold
    adapter, 5 times (each cold one evicted again by the next): the cold load time, and the longest gap of
    the running streams during each request against their median gap. A warm request's gap holds the
    step of its own prompt's prefill; what a cold one adds beyond it is the stall its load caused."""
    server = lorakit_server(model_dir, adapters, max_loaded=9)
    try:
        async def go():
            async with httpx.AsyncClient(timeout=1800) as client:
                for n in names[:8]:  # resident first
                    await one(client, server.url, n, "warm", 1, False)
                loads, rounds = [], []
                for i in range(5):
                    streams = [asyncio.create_task(one(client, server.url, names[k], prompt, tokens, True))
                               for k in range(8)]
                    while (await client.get(server.url + "/health")).json()["running"] < 8:
                        await asyncio.sleep(0.01)  # until all 8 decode
                    spans = []
                    for name in (names[i], names[8 + i]):  # warm, then cold
                        before = metric(server.url, "lorakit_adapter_load_seconds_sum", f'adapter="{name}"')
                        t0 = time.perf_counter()
                        await one(client, server.url, name, "cold", 1, False)
                        spans.append((t0, time.perf_counter()))
                        await asyncio.sleep(0.3)
                    loads.append(metric(server.url, "lorakit_adapter_load_seconds_sum", f'adapter="{names[8 + i]}"')
                                 - before)
                    done = await asyncio.gather(*streams)
                    marks = sorted(t for r in done for t in accumulate(r))

                    def longest(t0: float, t1: float) -> float:
                        return max([b - a for a, b in zip(marks, marks[1:]) if a < t1 and b > t0], default=0.0)

                    rounds.append((longest(*spans[0]), longest(*spans[1]),
                                   statistics.median(g for r in done for g in r["gaps"])))
                    log(f"cold load {i}: {loads[-1] * 1000:.0f} ms; longest gap during a warm request "
                        f"{rounds[-1][0] * 1000:.0f} ms, during the cold one {rounds[-1][1] * 1000:.0f} ms, "
                        f"median gap {rounds[-1][2] * 1000:.0f} ms")
                return loads, rounds
        loads, rounds = asyncio.run(go())
    finally:
        server.stop()
    return {"load_ms_p50": 1000 * statistics.median(loads), "loads_ms": [1000 * x for x in loads],
            "warm_gaps_ms": [1000 * w for w, _, _ in rounds], "cold_gaps_ms": [1000 * c for _, c, _ in rounds],
            "stall_ms_max": 1000 * max(c - w for w, c, _ in rounds),
            "step_ms_median": 1000 * statistics.median(m for _, _, m in rounds)}


def accumulate(r: dict) -> list[float]:
    """The arrival times of a stream's tokens, rebuilt from its start, first-token time and gaps."""
    t, out = r["start"] + r["ttft"], []
    out.append(t)
    for g in r["gaps"]:
        t += g
        out.append(t)
    return out


# ---------------------------------------------------------------- the report


def section(raw: dict[str, Any]) -> str:
    env, res = raw["environment"], raw["results"]
    lines = [TITLE, "", "<!-- written by `python -m benchmarks.serve`; rerun it rather than editing the numbers -->", "",
             f"{raw['requests']} requests from {raw['concurrency']} concurrent clients, prompts of "
             f"{raw['prompt_tokens'][0]}–{raw['prompt_tokens'][1]} tokens from Hamlet, {raw['tokens']} generated "
             f"tokens each (end of text ignored where the server allows it; `transformers serve` refuses "
             f"`ignore_eos`, so its own token count is used), greedy, on {raw['model']} in {raw['precision']}; adapters of "
             f"r={raw['rank']} on all seven linear kinds. Every server ran alone on the machine, driven from "
             f"127.0.0.1.", "",
             f"- date: {env['date']}", f"- machine: {env['cpu']}, {env['cores']} cores",
             f"- versions: torch {env['torch']}, transformers {env.get('transformers')}, peft {env.get('peft')}, "
             f"lorakit {env['lorakit']} (git {env['git']})", f"- command: `{raw['command']}`", "",
             "| server | tokens/s | requests/s | TTFT p50 / p95 s | inter-token p50 / p95 ms | peak MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for key in SCENARIOS:
        r = res.get(key)
        if r is None:
            continue
        itl = "—" if r["itl_p50"] is None else f"{r['itl_p50'] * 1000:.0f} / {r['itl_p95'] * 1000:.0f}"
        ttft = f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f}" + ("" if r["streamed"] else " (whole answer)")
        lines.append(f"| ({key}) {LABELS[key]} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {ttft} | "
                     f"{itl} | {r['peak_mb']:,.0f} |")
    lines += ["", "| goal | measured | met? |", "|---|---:|---|"]
    for what, x, y, goal in GOALS:
        if x in res and y in res:
            ratio = res[x]["tokens_per_s"] / res[y]["tokens_per_s"]
            lines.append(f"| ({x}) ≥ {goal:g}× ({y}) tokens/s | {ratio:.2f}× | {'yes' if ratio >= goal else '**no**'} |")
    cold = raw.get("cold")
    if cold:
        lines.append(f"| cold load ≤ 100 ms (p50 of 5, while 8 streams run) | {cold['load_ms_p50']:.0f} ms | "
                     f"{'yes' if cold['load_ms_p50'] <= 100 else '**no**'} |")
        lines.append(f"| streams stalled ≤ one step by the load (longest gap during a cold request less that during a "
                     f"warm one, worst of 5, vs the median gap) | {cold['stall_ms_max']:.0f} ms vs "
                     f"{cold['step_ms_median']:.0f} ms | {'yes' if cold['stall_ms_max'] <= cold['step_ms_median'] else '**no**'} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random model and a few requests (temp dir)")
    parser.add_argument("--ray", action="store_true", help="scenario (b) on `lorakit serve --ray`: the single server, "
                                                           "1 replica and 2 replicas (needs lorakit[ray])")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"from: {', '.join(SCENARIOS)}")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None,
                        help="where the model and adapters are made (default: a temp folder kept between runs; "
                             "--quick: a new one)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: benchmarks/results.md)")
    parser.add_argument("--peft-server", choices=("serial", "batched"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", help=argparse.SUPPRESS)
    parser.add_argument("--names", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peft_server:
        run_peft_server(args)
        return 0
    chosen = pick(parser, args.scenarios, SCENARIOS, "scenario")
    from transformers import AutoTokenizer

    from lorakit.train.tasks import native_bf16

    def log(*parts: Any) -> None:
        print("[serve]", *parts, flush=True)

    quick = args.quick
    work = args.work or (Path(tempfile.mkdtemp(prefix="lorakit-serve-quick-")) if quick else
                         Path(tempfile.gettempdir()) / "lorakit-serve-bench")
    work.mkdir(parents=True, exist_ok=True)
    model_dir = tiny_model(work / "tiny") if quick else hub.smollm2_dir()
    n, tokens, lo, hi = (args.requests or (8 if quick else 64)), (8 if quick else 64), (16 if quick else 64), \
        (48 if quick else 256)
    rank, count = (4 if quick else 16), (16 if quick else 64)
    bf16 = native_bf16(torch.device("cpu"))
    log(f"model {model_dir.name}, {n} requests × {tokens} tokens, bf16 {bf16}; making {count} adapters")
    names = make_adapters(model_dir, work / "adapters", count, rank)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = prompts(tokenizer, n, lo, hi)
    out = args.out or (work / "results.md" if quick else RESULTS)
    if args.ray:
        from . import serve_ray

        serve_ray.run(model_dir, work / "adapters", names, texts, {"tokens": tokens, "prompt_tokens": [lo, hi],
                      "rank": rank}, bf16, "python -m benchmarks.serve --ray" + (" --quick" if quick else ""), out, log)
        return 0
    spread = {"a": [names[0]] * n, "b": [names[i % 8] for i in range(n)],
              "c": random.Random(1).sample([names[i % 64 % count] for i in range(n)], n),
              "d": ["BASE"] * n, "e": ["BASE"] * n, "f": [names[i % 8] for i in range(n)],
              "g": [names[i % 8] for i in range(n)]}
    results: dict[str, Any] = {}
    for key in chosen:
        log(f"({key}) {LABELS[key]}")
        if key in "abcd":
            server = lorakit_server(model_dir, work / "adapters", 16 if key == "c" else 64)
            base = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        elif key == "e":
            server, base = transformers_server(model_dir, bf16), str(model_dir)
        else:
            server, base = peft_server(model_dir, work / "adapters-peft", names[:8], "serial" if key == "f" else
                                       "batched", bf16), None
        try:
            jobs = [(base if m == "BASE" else m, p) for m, p in zip(spread[key], texts)]
            answers = asyncio.run(drive(server.url, jobs, tokens, 16, stream=key not in "fg", ignore_eos=key != "e"))
            results[key] = summarize(answers, server.peak_mb(), key not in "fg")
            if key == "c":
                results[key]["loads"] = metric(server.url, "lorakit_adapter_loads_total")
                results[key]["evictions"] = metric(server.url, "lorakit_adapter_evictions_total")
        finally:
            server.stop()
        r = results[key]
        log(f"({key}) {r['tokens_per_s']:.1f} tokens/s, TTFT p50 {r['ttft_p50']:.2f} s, errors {len(r['errors'])}")
    raw = {"environment": job_environment(), "results": results, "requests": n, "concurrency": 16, "tokens": tokens,
           "prompt_tokens": [lo, hi], "rank": rank, "model": model_dir.name, "precision": "bf16" if bf16 else "fp32",
           "command": "python -m benchmarks.serve" + (" --quick" if quick else "")}
    if any(k in chosen for k in "abc"):
        raw["cold"] = cold_load(model_dir, work / "adapters", names, texts[0], 40 if quick else 96, log)
    (out.parent / "serve.json").write_text(json.dumps(raw, indent=1))
    replace_section(out, TITLE, section(raw))
    log(f"wrote {out} and {out.parent / 'serve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

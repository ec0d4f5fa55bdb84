"""`python -m benchmarks.serve --ray`: `lorakit serve --ray` with 1 and with 2 engine replicas against the
single server, on the single-server benchmark's workload (its scenario b: 64 requests from 16 concurrent
clients, prompts of 64–256 tokens from Hamlet, 64 tokens each, 8 adapters of r=16), in one run on this
machine. The one replica gets every core; two replicas get half each. Everything binds 127.0.0.1.

Reported for each: tokens/s, requests/s, TTFT and inter-token latency, adapter loads by replica, and the peak
memory of each engine replica (and of Ray's other processes together), from which the README's sizing note
for N nodes is worked out.

    python -m benchmarks.serve --ray            # ~12 min on 2 CPU cores; rewrites its section of results.md
    python -m benchmarks.serve --ray --quick    # a tiny random model, a few requests (temp dir)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx

from .common import RESULTS, job_environment, replace_section
from .serve import PYTHON, Server, drive, free_port, lorakit_server, summarize

TITLE = "## Serving on Ray: 1 vs 2 engine replicas on one machine"
SIDES = ("single", "ray1", "ray2")
LABELS = {"single": "`lorakit serve` (no Ray)", "ray1": "`--ray --replicas 1`, all cores",
          "ray2": "`--ray --replicas 2`, half the cores each"}
REPLICA = "ServeReplica:lorakit:LorakitEngine"


class RayServer(Server):
    """`lorakit serve --ray`: stopped by SIGTERM to the server alone, which shuts Serve and its Ray instance down
    (a SIGTERM to every Ray process at once leaves Serve's controller waiting 30 s); whatever is left of its
    process group is then killed."""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)


def ray_server(model_dir: Path, adapters: Path, max_loaded: int, replicas: int, cpus: int) -> Server:
    port = free_port()
    return RayServer([PYTHON, "-m", "lorakit", "serve", "--model.path", str(model_dir), "--adapter-dir", str(adapters),
                   "--max-loaded", str(max_loaded), "--max-batch", "16", "--max-queue", "256", "--port", str(port),
                   "--ray", "--replicas", str(replicas), "--ray-cpus", str(cpus)], port, ready={200},
                  env={"RAY_USAGE_STATS_ENABLED": "0"})


def session_memory(server: Server) -> dict[str, Any]:
    """Peak memory (VmHWM, MB) of each engine replica, and the summed resident memory of the session's other
    processes (Ray's GCS, raylet, workers, proxy, the driver): everything the server started."""
    sid = os.getsid(server.proc.pid)
    replicas, others = [], 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != sid:
                continue
            status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if REPLICA in title:
            replicas.append(int(status["VmHWM"].split()[0]) / 1024)
        elif "VmRSS" in status:
            others += int(status["VmRSS"].split()[0]) / 1024
    return {"replica_peak_mb": sorted(replicas), "ray_other_mb": others}


def loads_by_replica(url: str) -> dict[str, float]:
    """lorakit_adapter_loads_total summed per replica (a single server counts as one replica, "-")."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("lorakit_adapter_loads_total{"):
            replica = re.search(r'replica="([^"]+)"', line)
            key = replica.group(1)[:8] if replica else "-"
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def adapter_mb(adapters: Path, name: str) -> float:
    return sum(f.stat().st_size for f in (adapters / name).iterdir() if f.suffix == ".safetensors") / 2**20


def section(raw: dict[str, Any]) -> str:
    env, res = raw["environment"], raw["results"]
    lines = [TITLE, "", "<!-- written by `python -m benchmarks.serve --ray`; rerun it rather than editing the numbers -->",
             "", f"The single-server benchmark's scenario (b): {raw['requests']} requests from {raw['concurrency']} "
             f"concurrent clients, prompts of {raw['prompt_tokens'][0]}–{raw['prompt_tokens'][1]} tokens from Hamlet, "
             f"{raw['tokens']} generated tokens each, greedy, spread over 8 adapters of r={raw['rank']} on all seven "
             f"linear kinds, on {raw['model']} in {raw['precision']}, streamed through each server's HTTP front (Ray's "
             f"proxy and the ingress for Ray). Each ran alone on the machine, driven from 127.0.0.1.", "",
             f"- date: {env['date']}", f"- machine: {env['cpu']}, {env['cores']} cores",
             f"- versions: torch {env['torch']}, ray {raw['ray']}, lorakit {env['lorakit']} (git {env['git']})",
             f"- command: `{raw['command']}`", "",
             "The workload runs twice on each server: first with every adapter cold, as the single-server benchmark "
             "does, then again with the adapters where the first pass left them (warm).", "",
             "| server | tokens/s | requests/s | TTFT p50 / p95 s | inter-token p50 / p95 ms | loads by replica | "
             "warm: tokens/s, loads | peak MB per replica |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for key in SIDES:
        r = res.get(key)
        if r is None:
            continue
        loads = ", ".join(f"{v:.0f}" for _, v in sorted(r["loads"].items())) or "—"
        peaks = " + ".join(f"{m:,.0f}" for m in r["replica_peak_mb"])
        lines.append(f"| {LABELS[key]} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                     f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {r['itl_p50'] * 1000:.0f} / {r['itl_p95'] * 1000:.0f} | "
                     f"{loads} | {r['warm']['tokens_per_s']:.1f}, {r['warm']['loads']:.0f} | {peaks} |")
    lines.append("")
    def ratio(x: str, y: str) -> str:
        return (f"{res[x]['tokens_per_s'] / res[y]['tokens_per_s']:.2f}× cold, "
                f"{res[x]['warm']['tokens_per_s'] / res[y]['warm']['tokens_per_s']:.2f}× warm")

    if "single" in res and "ray1" in res:
        lines.append(f"- Ray's cost on one replica: {ratio('ray1', 'single')} the single server's tokens/s.")
    if "ray1" in res and "ray2" in res:
        lines.append(f"- 2 replicas against 1 on the same {env['cores']} cores: {ratio('ray2', 'ray1')} the tokens/s.")
    if any("ray_other_mb" in r for r in res.values()):
        other = max(r.get("ray_other_mb", 0.0) for r in res.values())
        lines.append(f"- Ray's own processes (GCS, raylet, proxy, ingress, driver) held {other:,.0f} MB together "
                     f"beside the replicas.")
    lines.append(f"- One adapter's file: {raw['adapter_mb']:.1f} MB; the base's weights: {raw['base_mb']:.0f} MB.")
    lines.append("")
    return "\n".join(lines)


def base_mb(model_dir: Path, bf16: bool) -> float:
    """The base's weights in the precision the server holds them (bf16 or fp32), MB."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total * (2 if bf16 else 4) / 2**20


def run(model_dir: Path, adapters: Path, names: list[str], texts: list[str], shape: dict[str, Any], bf16: bool,
        command: str, out: Path, log) -> None:
    """Drive the three servers with `texts` spread over names[:8]; write serve-ray.json beside `out` and the
    section into `out`. `shape` holds the workload's tokens, prompt_tokens and rank, as the report states them."""
    import ray

    cores = os.cpu_count() or 1
    jobs = [(names[i % 8], p) for i, p in enumerate(texts)]
    results: dict[str, Any] = {}
    for key in SIDES:
        log(f"[{key}] {LABELS[key]}")
        if key == "single":
            server = lorakit_server(model_dir, adapters, 64)
        else:
            replicas = 1 if key == "ray1" else 2
            server = ray_server(model_dir, adapters, 64, replicas, max(1, cores // replicas))
        try:
            done = asyncio.run(drive(server.url, jobs, shape["tokens"], 16, stream=True))
            results[key] = summarize(done, server.peak_mb(), True)
            results[key]["loads"] = loads_by_replica(server.url)
            again = summarize(asyncio.run(drive(server.url, jobs, shape["tokens"], 16, stream=True)), 0.0, True)
            results[key]["warm"] = {k: again[k] for k in ("tokens_per_s", "ttft_p50", "ttft_p95", "itl_p50", "errors")}
            results[key]["warm"]["loads"] = sum(loads_by_replica(server.url).values()) - sum(results[key]["loads"].values())
            if key == "single":
                results[key]["replica_peak_mb"] = [server.peak_mb()]
            else:
                results[key].update(session_memory(server))
        finally:
            server.stop()
        r = results[key]
        log(f"[{key}] {r['tokens_per_s']:.1f} tokens/s, TTFT p50 {r['ttft_p50']:.2f} s, errors {len(r['errors'])}, "
            f"loads {r['loads']}, replica peaks {[round(m) for m in r['replica_peak_mb']]} MB")
    raw = {"environment": job_environment(), "ray": ray.__version__, "results": results, "requests": len(texts),
           "concurrency": 16, **shape, "model": model_dir.name, "precision": "bf16" if bf16 else "fp32",
           "adapter_mb": adapter_mb(adapters, names[0]), "base_mb": base_mb(model_dir, bf16), "command": command}
    (out.parent / "serve-ray.json").write_text(json.dumps(raw, indent=1))
    replace_section(out, TITLE, section(raw))
    log(f"wrote {out} and {out.parent / 'serve-ray.json'}")

"""`lorakit serve --ray` for real: a local Ray instance on 127.0.0.1 with 2 engine replicas of a tiny Llama and 8
adapters, each replica holding at most 4, driven through Ray's HTTP proxy by the `openai` client and plain
HTTP. Every Ray process listens on the loopback address only; a second pass over the adapters loads none
(requests go to the replica that has theirs); the answers equal the single server's; a hot adapter spills onto
the other replica; loads and unloads reach every replica; a replica killed under load ends its streams with an
error event and Ray replaces it; Ray's own metrics are where the server says."""

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_serve import KEYS, Running, free_port, make_adapters, start, stop
from test_cli import save_tiny_llama

pytestmark = [pytest.mark.ray, pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                                  reason="Ray is not installed (pip install 'lorakit[ray]')")]
NAMES = [f"a{i}" for i in range(8)]


def off_loopback(sockets: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """Those of `listeners()` bound to an address other than the loopback one."""
    return [(a, p) for a, p in sockets if not a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:"))]


def listeners() -> set[tuple[str, str]]:
    """(local address, process) of every listening TCP socket, from `ss`."""
    out = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split()
        process = re.search(r'users:\(\("([^"]+)"', line)
        found.add((parts[3], process.group(1) if process else "?"))
    return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("serve-ray")
    model_dir = save_tiny_llama(tmp / "model", smollm2_dir, 32)
    make_adapters(model_dir, tmp / "adapters", NAMES)
    (tmp / "keys.toml").write_text(KEYS)
    return tmp, model_dir, tmp / "adapters"


@contextlib.contextmanager
def ray_server(argv: list[str], port: int, stop: signal.Signals, cwd: Path | None = None, **env: str):
    """A Ray server started by `argv` in a session of its own, once its /health answers 200: its Running, with
    what it prints in `.output`. Afterwards `stop` goes to it alone, it must exit 0 with every process it
    started gone (killed if not)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0", **env)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=cwd)
    running = Running(proc, port)
    running.output = []  # read as it comes
    threading.Thread(target=lambda: running.output.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{running.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"{argv[:3]} did not start:\n{''.join(running.output)[-4000:]}")
            time.sleep(1)
        yield running
        proc.send_signal(stop)
        assert proc.wait(120) == 0
        deadline = time.time() + 30
        while session(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert session(proc.pid) == []  # no Ray process outlives it
    finally:
        if session(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(setup):
    """The Ray server, and the sockets that were listening before it started."""
    tmp, model_dir, adapters = setup
    before = listeners()
    port = free_port()
    argv = [sys.executable, "-m", "lorakit", "serve", "--model.path", str(model_dir), "--adapter-dir", str(adapters),
            "--api-keys", str(tmp / "keys.toml"), "--port", str(port), "--bf16", "false", "--ray", "--replicas", "2",
            "--max-loaded", "4", "--ray-cpus", "1"]
    with ray_server(argv, port, signal.SIGTERM) as running:  # it shuts Serve and its Ray instance down
        yield running, before


def session(sid: int) -> list[int]:
    """The processes still alive in session `sid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid and "Z" not in open(f"/proc/{entry}/stat").read().split(")")[-1][:3]:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def test_every_ray_process_listens_on_the_loopback_address_only(cluster):
    running, before = cluster
    new = listeners() - before
    assert any("raylet" in p for _, p in new) and any(p.startswith("ray::ServeRepli") for _, p in new)
    assert off_loopback(new) == []


def loads(running: Running) -> dict[tuple[str, str], float]:
    """lorakit_adapter_loads_total by (adapter, replica), from the ingress's /metrics."""
    text = httpx.get(f"{running.url}/metrics", timeout=30).text
    found = {}
    for m in re.finditer(r'lorakit_adapter_loads_total\{adapter="([^"]+)",replica="([^"]+)"\} (\S+)', text):
        found[m.group(1), m.group(2)] = float(m.group(3))
    return found


def resident(running: Running) -> dict[str, float]:
    text = httpx.get(f"{running.url}/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'lorakit_resident_adapters\{replica="([^"]+)"\} (\S+)', text)}


def answers(running: Running, pause: float = 0.0) -> dict[str, str]:
    client = running.client()
    out = {}
    for name in [*NAMES, "model"]:
        out[name] = client.completions.create(model=name, prompt="The quick brown fox", max_tokens=6,
                                              temperature=0).choices[0].text
        time.sleep(pause)
    return out


def test_a_second_pass_loads_nothing_and_answers_equal_the_single_servers(cluster, setup):
    """The warm-up pauses between adapters: Ray's router learns where each adapter went from the replicas'
    reports, every 0.1 s."""
    running, _ = cluster
    first = answers(running, pause=0.3)
    time.sleep(1)
    warm = loads(running)
    assert sorted(a for a, _ in warm) == NAMES and set(warm.values()) == {1.0}
    assert len(resident(running)) == 2 and all(n <= 4 for n in resident(running).values())
    second = answers(running)
    time.sleep(1)
    assert loads(running) == warm and second == first

    tmp, model_dir, adapters = setup
    single = start(tmp, model_dir, adapters, "--max-loaded", "8")
    try:
        base = single.client().models.list().data[0].id
        assert base == "model"
        assert answers(single) == first
    finally:
        stop(single)


def test_streams_generate_and_errors_pass_through_the_proxy(cluster):
    running, _ = cluster
    stream = running.client().chat.completions.create(model="a3", messages=[{"role": "user", "content": "Hi"}],
                                                      max_tokens=5, temperature=0, stream=True)
    assert len([c for c in stream]) >= 2
    r = running.post("/generate", {"inputs": "Hello", "parameters": {"adapter_id": "a5", "max_new_tokens": 4}})
    assert r.status_code == 200 and "generated_text" in r.json()
    r = running.post("/v1/completions", {"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = running.post("/v1/completions", {"model": "a1", "prompt": "x"}, key="sk-wrong")
    assert r.status_code == 401
    r = running.post("/v1/completions", None, raw=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_the_ingress_reads_the_adapter_each_api_names():
    from lorakit.serve.ray import adapter_of

    assert adapter_of("/v1/completions", b'{"model": "a1", "prompt": "x"}') == "a1"
    assert adapter_of("/v1/chat/completions", b'{"model": "a2", "messages": []}') == "a2"
    assert adapter_of("/generate", b'{"inputs": "x", "parameters": {"adapter_id": "a3"}}') == "a3"
    assert adapter_of("/", b'{"inputs": "x", "parameters": {"adapter_id": "a4"}}') == "a4"
    assert adapter_of("/generate", b'{"inputs": "x", "model": "a1"}') is None  # TGI names it in parameters
    assert adapter_of("/v1/load_lora_adapter", b'{"lora_name": "b0", "lora_path": "/p"}') == "b0"
    assert adapter_of("/v1/unload_lora_adapter", b'{"lora_name": "b0"}') == "b0"
    for path, body in [("/v1/completions", b"{not json"), ("/v1/completions", b"[1]"), ("/v1/models", b""),
                       ("/v1/completions", b'{"model": 3}')]:
        assert adapter_of(path, body) is None  # the replica answers with the server's own error


def test_rays_own_metrics_are_served_where_the_server_says(cluster):
    running, _ = cluster
    deadline = time.time() + 60
    while True:  # Ray's metrics agent exports once it has gathered a first round
        said = [line for line in running.output if "Ray's own metrics: " in line]
        text = ""
        if said:
            url = said[0].split("Ray's own metrics: ")[1].strip()
            assert url.startswith("http://127.0.0.1:")
            try:
                text = httpx.get(url, timeout=10).text
            except httpx.HTTPError:
                pass
        if re.search(r"^ray_\w+", text, re.M):
            break
        assert time.time() < deadline, (said, text[:500])
        time.sleep(2)


def test_replica_metrics_merge_into_one_exposition_labelled_by_replica():
    from prometheus_client.parser import text_string_to_metric_families

    from lorakit.serve.metrics import Metrics
    from lorakit.serve.ray import merge_metrics

    a, b = Metrics(), Metrics()
    a.event("load", "x", 0.1)
    b.event("load", "x", 0.2)
    b.event("load", "y", 0.3)
    merged = merge_metrics({"r1": a.render().decode(), "r2": b.render().decode()}).decode()
    loads = {(s.labels["adapter"], s.labels["replica"]): s.value for f in text_string_to_metric_families(merged)
             for s in f.samples if s.name == "lorakit_adapter_loads_total"}
    assert loads == {("x", "r1"): 1.0, ("x", "r2"): 1.0, ("y", "r2"): 1.0}
    assert len(re.findall(r"^# TYPE lorakit_adapter_loads(_total)? counter$", merged, re.M)) == 1


def test_serve_run_arguments_and_cli_refusals(capsys):
    from lorakit import cli
    from lorakit.serve.ray import app

    application = app({"adapter_dir": "adapters", "replicas": "2", "max_loaded": "4", "pins": "a,b"})
    assert type(application).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown argument 'replica'"):
        app({"replica": "2"})
    with pytest.raises(ValueError, match="MIN:MAX"):
        app({"autoscale": "3:1"})
    for args, message in [(["--replicas", "2"], "--replicas needs --ray"),
                          (["--autoscale", "1:2"], "--autoscale needs --ray"),
                          (["--ray", "--replicas", "2", "--autoscale", "1:2"], "not both"),
                          (["--ray-cpus", "2"], "--ray-cpus needs --ray"),
                          (["--ray", "--ray-cpus", "0"], "must be a number > 0, got '0'"),
                          (["--ray", "--autoscale", "2"], "MIN:MAX")]:
        assert cli.main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_loading_and_unloading_through_the_ingress_reaches_every_replica(cluster, setup):
    """An adapter loaded (or unloaded) through one replica is listed (or not) by every replica after it."""
    running, _ = cluster
    tmp, model_dir, _ = setup
    make_adapters(model_dir, tmp / "more", ["b0"], seed=20)

    def listed(times: int = 12) -> set[bool]:  # requests without an adapter go to either replica
        return {"b0" in {m.id for m in running.client().models.list().data} for _ in range(times)}

    assert listed() == {False}
    r = running.post("/v1/load_lora_adapter", {"lora_name": "b0", "lora_path": str(tmp / "more" / "b0")}, key="sk-alice")
    assert r.status_code == 403 or r.status_code == 401
    r = running.post("/v1/load_lora_adapter", {"lora_name": "b0", "lora_path": str(tmp / "more" / "b0")})
    assert r.status_code == 200, r.text
    assert listed() == {True}
    text = running.client().completions.create(model="b0", prompt="Hi", max_tokens=3, temperature=0).choices[0].text
    assert isinstance(text, str)
    r = running.post("/v1/unload_lora_adapter", {"lora_name": "b0"})
    assert r.status_code == 200, r.text
    assert listed() == {False}
    r = running.post("/v1/completions", {"model": "b0", "prompt": "x"})
    assert r.status_code == 404


def engine_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ServeReplica:lorakit:LorakitEngine" in line]


def test_a_hot_adapter_spills_onto_another_replica_once_its_replica_is_full(cluster):
    """30 streams at once for one adapter, more than one replica takes (a batch of 16 and a few more): Ray sends
    the rest to the other replica, which loads the adapter too; every stream is served in full."""
    running, _ = cluster
    before = {r for (a, r), n in loads(running).items() if a == "a5" and n > 0}
    body = {"model": "a5", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    counts, together = [], threading.Barrier(30)

    def stream() -> None:
        together.wait(30)  # all 30 ask at once, so more than one replica takes are in flight together
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=120,
                          headers={"Authorization": "Bearer sk-admin"}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        counts.append(json.loads(events[-2][6:])["usage"]["completion_tokens"] if r.status_code == 200 else r.status_code)

    threads = [threading.Thread(target=stream) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert counts == [200] * 30
    deadline = time.monotonic() + 15  # the replicas' metrics reach the ingress's /metrics within a few seconds
    while True:
        after = {r for (a, r), n in loads(running).items() if a == "a5" and n > 0}
        if len(after) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(after) == 2 and after >= before  # a5 resident on both replicas now


def test_killing_a_replica_mid_stream_ends_its_streams_cleanly_and_serving_goes_on(cluster):
    """16 clients stream back to back over the 8 adapters (both replicas busy throughout); one replica is
    killed partway. Every stream ends with [DONE] after all its tokens or with an error event (a request that
    had not started: an error answer), none hangs; new requests are served while Ray starts a replacement."""
    running, _ = cluster
    pids = engine_pids()
    assert len(pids) == 2
    answers(running, pause=0.3)  # each adapter resident on one replica
    results: list[tuple[str, str]] = []
    stop_at = time.time() + 8
    tokens = 120

    def stream(name: str) -> tuple[str, str]:
        body = {"model": name, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=120,
                              headers={"Authorization": "Bearer sk-admin"}) as r:
                if r.status_code != 200:  # failed before its first token: an error answer
                    r.read()
                    return ("error" if "error" in r.json() else "cut", f"{r.status_code} {r.text}")
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
        except httpx.HTTPError as e:
            return ("exception", repr(e))
        last = events[-1] if events else ""
        if last == "data: [DONE]":
            usage = json.loads(events[-2][6:])["usage"]
            return ("done" if usage["completion_tokens"] == tokens else "short", str(events[-4:]))
        return ("error" if '"error"' in last else "cut", last)

    def client(k: int) -> None:
        while time.time() < stop_at:
            results.append(stream(NAMES[k % len(NAMES)]))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    time.sleep(3)
    os.kill(pids[0], signal.SIGKILL)
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads)  # nothing hangs
    kinds = [kind for kind, _ in results]
    assert set(kinds) <= {"done", "error"}, "\n".join(r[1] for r in results if r[0] not in ("done", "error"))
    print(f"{len(kinds)} streams: {kinds.count('done')} done, {kinds.count('error')} ended by an error")
    assert "error" in kinds  # the killed replica's streams said so
    assert kinds.count("done") > 16  # and the rest were served, before and after the kill

    client = running.client()
    for name in NAMES:  # every adapter is served again, by the live replica or the new one
        deadline = time.time() + 60
        while True:
            try:
                client.completions.create(model=name, prompt="Hello", max_tokens=2, temperature=0)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
    deadline = time.time() + 180
    while not (len(engine_pids()) == 2 and pids[0] not in engine_pids()):
        assert time.time() < deadline, "Ray did not replace the killed replica"
        time.sleep(1)


def test_an_in_process_asgi_call_passes_the_response_on_joining_chunks_that_queued():
    import asyncio

    from lorakit.serve.ray import run_asgi

    async def app(scope, receive, send):
        assert (await receive())["body"] == b"in"
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
        for chunk in (b"a", b"b", b"c"):  # sent before the reader runs: passed on as one
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"d", "more_body": True})
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def call():
        return [part async for part in run_asgi(app, "POST", "/x", b"", [], b"in")]

    assert asyncio.run(call()) == [(201, [("content-type", "text/plain")]), b"abc", b"d"]

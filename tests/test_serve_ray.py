"""`lorakit serve --ray` for real: a local Ray instance on 127.0.0.1 with 2 engine replicas of a tiny Llama and 8
adapters, each replica holding at most 4, driven through Ray's HTTP proxy by the `openai` client and plain
HTTP. Every Ray process listens on the loopback address only; a second pass over the adapters loads none
(requests go to the replica that has theirs); the answers equal the single server's."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from test_serve import KEYS, Running, free_port, make_adapters, start, stop
from test_cli import save_tiny_llama

pytestmark = [pytest.mark.ray, pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                                  reason="Ray is not installed (pip install 'lorakit[ray]')")]
NAMES = [f"a{i}" for i in range(8)]


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


@pytest.fixture(scope="module")
def cluster(setup):
    """The Ray server, and the sockets that were listening before it started."""
    tmp, model_dir, adapters = setup
    before = listeners()
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model.path", str(model_dir),
                             "--adapter-dir", str(adapters), "--api-keys", str(tmp / "keys.toml"), "--port", str(port),
                             "--bf16", "false", "--ray", "--replicas", "2", "--max-loaded", "4", "--ray-cpus", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    running = Running(proc, port)
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{running.url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the Ray server did not start:\n{proc.stdout.read()[-4000:]}")
        time.sleep(1)
    yield running, before
    os.killpg(proc.pid, signal.SIGTERM)  # the server shuts Serve and its Ray instance down, and exits 0
    try:
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_every_ray_process_listens_on_the_loopback_address_only(cluster):
    running, before = cluster
    new = listeners() - before
    assert any("raylet" in p for _, p in new) and any(p.startswith("ray::ServeRepli") for _, p in new)
    outside = [(a, p) for a, p in new if not a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:"))]
    assert outside == []


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


def test_killing_a_replica_mid_stream_ends_its_streams_cleanly_and_serving_goes_on(cluster):
    """Every stream in flight ends with [DONE] or an error event, none hangs; new requests are served while Ray
    starts a replacement replica."""
    running, _ = cluster
    pids = engine_pids()
    assert len(pids) == 2
    results: dict[tuple[str, int], tuple[str, str]] = {}

    def stream(name: str, i: int) -> None:
        body = {"model": name, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        try:
            with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=120,
                              headers={"Authorization": "Bearer sk-admin"}) as r:
                if r.status_code != 200:  # failed before its first token: an error answer
                    r.read()
                    results[name, i] = ("error" if "error" in r.json() else "cut", f"{r.status_code} {r.text}")
                    return
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        if len(events) == 1:
                            started.release()  # its first token: this stream is in flight
            last = events[-1] if events else ""
            results[name, i] = ("done" if last == "data: [DONE]" else "error" if '"error"' in last else "cut", last)
        except httpx.HTTPError as e:
            results[name, i] = ("exception", repr(e))

    started = threading.Semaphore(0)
    threads = [threading.Thread(target=stream, args=(n, i)) for n in NAMES for i in range(2)]
    for t in threads:
        t.start()
    for _ in threads:  # every stream has its first token, so both replicas have streams in flight
        assert started.acquire(timeout=120)
    os.kill(pids[0], signal.SIGKILL)
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads)  # nothing hangs
    assert len(results) == 16 and all(kind in ("done", "error") for kind, _ in results.values()), results
    assert any(kind == "error" for kind, _ in results.values())  # the killed replica's streams said so

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

"""`lorakit serve` for real: the server started on 127.0.0.1 (a free port) over a tiny random Llama with a few
adapters, driven by the official `openai` client, `lorax-client` and plain HTTP — completions, chat and
streams, TGI's generate, keys, adapter loading, metrics, every kind of bad request, a client that leaves
mid-stream, a full queue, and SIGTERM's drain."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import lorakit
from test_cli import save_tiny_llama

KEYS = """
[keys."sk-admin"]
adapters = "*"
admin = true
[keys."sk-alice"]
adapters = ["a0", "a1"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(model_dir: Path, out: Path, names: list[str], fmt: str = "lorakit", seed: int = 0,
                  dora: bool = False) -> None:
    from transformers import AutoModelForCausalLM

    for i, name in enumerate(names):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        lorakit.inject(model, ["q_proj", "v_proj"] if i % 2 else "all-linear", r=4, alpha=16, dora=dora)
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, lorakit.LoraAdapter):
                    m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.5)
                    if m.magnitude is not None:
                        m.magnitude.mul_(1 + 0.5 * torch.randn(m.magnitude.shape, generator=g))
        lorakit.save_adapter(model, out / name, format=fmt, print_fn=lambda *a: None)


class Running:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port, self.url = proc, port, f"http://127.0.0.1:{port}"

    def client(self, key: str = "sk-admin"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, body=None, key: str | None = "sk-admin", raw: bytes | None = None, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if raw is not None:
            headers["Content-Type"] = "application/json"
            return httpx.post(self.url + path, content=raw, headers=headers, timeout=60, **kw)
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kw)


def start(tmp: Path, model_dir: Path, adapters: Path, *extra: str) -> Running:
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model.path", str(model_dir),
                             "--adapter-dir", str(adapters), "--api-keys", str(tmp / "keys.toml"), "--port",
                             str(port), "--bf16", "false", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return Running(proc, port)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start")


def stop(server: Running) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_llama(tmp / "model", smollm2_dir, 32)
    adapters = tmp / "adapters"
    make_adapters(model_dir, adapters, ["a0", "a1"])
    make_adapters(model_dir, adapters, ["a2"], seed=2, dora=True)
    make_adapters(model_dir, adapters, ["p3"], fmt="peft", seed=10)
    other = save_tiny_llama(tmp / "other", smollm2_dir, 48)
    make_adapters(other, tmp / "foreign", ["f0"])
    (tmp / "keys.toml").write_text(KEYS)
    return tmp, model_dir, adapters


@pytest.fixture(scope="module")
def server(setup):
    tmp, model_dir, adapters = setup
    running = start(tmp, model_dir, adapters, "--max-loaded", "2", "--max-batch", "4", "--max-queue", "3")
    yield running
    stop(running)


def test_models_list_the_base_and_the_adapters_each_key_may_use(server, setup):
    admin = [m.id for m in server.client().models.list().data]
    assert admin[0] == "model" and set(admin[1:]) == {"a0", "a1", "a2", "p3"}
    listed = server.client("sk-alice").models.list().data
    assert [m.id for m in listed] == ["model", "a0", "a1"] and listed[1].parent == "model"


def test_completions_and_chat_plain_and_streamed(server):
    client = server.client()
    out = client.completions.create(model="a0", prompt="To be, or not to be", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1
    again = client.completions.create(model="a0", prompt="To be, or not to be", max_tokens=8, temperature=0)
    assert again.choices[0].text == out.choices[0].text  # greedy repeats
    base = client.completions.create(model="model", prompt="To be, or not to be", max_tokens=8, temperature=0)
    assert base.choices[0].text != out.choices[0].text  # the adapter makes a difference
    pieces = list(client.completions.create(model="a0", prompt="To be, or not to be", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in pieces) == out.choices[0].text
    assert pieces[-1].choices[0].finish_reason == out.choices[0].finish_reason
    chat = client.chat.completions.create(model="p3", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                          temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    streamed = list(client.chat.completions.create(model="p3", messages=[{"role": "user", "content": "Hello"}],
                                                   max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    raw = server.post("/v1/completions", {"model": "a1", "prompt": "x", "max_tokens": 3, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_a_dora_adapter_is_served(server):
    """a2 is DoRA: it answers, greedily the same alone and beside other adapters' streams, unlike the base."""
    client = server.client()
    alone = client.completions.create(model="a2", prompt="To be, or not to be", max_tokens=8, temperature=0)
    base = client.completions.create(model="model", prompt="To be, or not to be", max_tokens=8, temperature=0)
    assert alone.usage.completion_tokens >= 1 and alone.choices[0].text != base.choices[0].text
    results = {}

    def ask(name):
        results[name] = client.completions.create(model=name, prompt="To be, or not to be", max_tokens=8,
                                                  temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("a2", "a0", "model")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["a2"] == alone.choices[0].text and results["model"] == base.choices[0].text


def test_tgi_generate_and_the_lorax_client(server):
    r = server.post("/generate", {"inputs": "To be", "parameters": {"adapter_id": "a1", "max_new_tokens": 5}})
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 5
    stream = server.post("/generate_stream", {"inputs": "To be", "parameters": {"adapter_id": "a1",
                                                                             "max_new_tokens": 5}}).text
    events = [json.loads(line[5:]) for line in stream.splitlines() if line.startswith("data:")]
    assert "[DONE]" not in stream and events[-1]["generated_text"] == r.json()["generated_text"]
    from lorax import Client

    client = Client(server.url, headers={"Authorization": "Bearer sk-admin"})
    assert client.generate("To be", adapter_id="a1", max_new_tokens=5).generated_text == r.json()["generated_text"]
    text = "".join(e.token.text for e in client.generate_stream("To be", adapter_id="a1", max_new_tokens=5)
                   if not e.token.special)
    assert text == r.json()["generated_text"]


def test_keys_unknown_and_forbidden_adapters(server):
    import openai

    with pytest.raises(openai.AuthenticationError):
        server.client("sk-wrong").models.list()
    assert server.post("/v1/completions", {"model": "a0", "prompt": "x"}, key=None).status_code == 401
    hidden = server.post("/v1/completions", {"model": "a2", "prompt": "x"}, key="sk-alice")
    missing = server.post("/v1/completions", {"model": "zz", "prompt": "x"}, key="sk-alice")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"].replace("a2", "?") == missing.json()["error"]["message"].replace("zz", "?")
    r = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}, key="sk-alice")
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_load_and_unload_adapters(server, setup):
    tmp, _, adapters = setup
    r = server.post("/v1/load_lora_adapter", {"lora_name": "again", "lora_path": str(adapters / "a2")})
    assert r.status_code == 200
    assert server.post("/v1/completions", {"model": "again", "prompt": "x", "max_tokens": 2}).status_code == 200
    r = server.post("/v1/load_lora_adapter", {"lora_name": "alien", "lora_path": str(tmp / "foreign" / "f0")})
    assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"]
    r = server.post("/v1/load_lora_adapter", {"lora_name": "ghost", "lora_path": str(tmp / "nowhere")})
    assert r.status_code == 400 and "not an adapter folder" in r.json()["error"]["message"]
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "again"}).status_code == 200
    assert server.post("/v1/completions", {"model": "again", "prompt": "x"}).status_code == 404
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "again"}).status_code == 404


def test_an_adapter_folder_added_later_is_found_and_evicted_adapters_reload(server, setup):
    tmp, model_dir, adapters = setup
    make_adapters(model_dir, adapters, ["late"], seed=20)
    client = server.client()
    first = client.completions.create(model="late", prompt="Hi", max_tokens=4, temperature=0).choices[0].text
    for name in ("a0", "a1", "a2"):  # --max-loaded 2: "late" is evicted on the way
        client.completions.create(model=name, prompt="Hi", max_tokens=2, temperature=0)
    assert client.completions.create(model="late", prompt="Hi", max_tokens=4, temperature=0).choices[0].text == first
    metrics = httpx.get(server.url + "/metrics").text
    assert 'lorakit_adapter_evictions_total{adapter="late"}' in metrics
    assert 'lorakit_adapter_loads_total{adapter="late"} 2.0' in metrics


def test_metrics_per_adapter(server):
    server.client().completions.create(model="a1", prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for line in ('lorakit_requests_total{adapter="a1",endpoint="completions",status="200"}',
                 'lorakit_generated_tokens_total{adapter="a1"}', 'lorakit_prompt_tokens_total{adapter="a1"}',
                 'lorakit_time_to_first_token_seconds_bucket{adapter="a1"', 'lorakit_inter_token_latency_seconds_count',
                 "lorakit_queue_depth", "lorakit_running_sequences", "lorakit_resident_adapters ",
                 "lorakit_resident_adapter_bytes"):
        assert line in text, line


BAD = [
    ("malformed JSON", None, b'{"model": "a0", "prompt": ', 400),
    ("missing prompt", {"model": "a0"}, None, 400),
    ("wrong type", {"model": "a0", "prompt": "x", "max_tokens": "many"}, None, 400),
    ("max_tokens 0", {"model": "a0", "prompt": "x", "max_tokens": 0}, None, 400),
    ("max_tokens beyond the context", {"model": "a0", "prompt": "x", "max_tokens": 100000}, None, 400),
    ("prompt longer than the context", {"model": "a0", "prompt": "word " * 400, "max_tokens": 1}, None, 400),
    ("unknown model", {"model": "nope", "prompt": "x"}, None, 404),
    ("NaN temperature", None, b'{"model": "a0", "prompt": "x", "temperature": NaN}', 400),
    ("temperature out of range", {"model": "a0", "prompt": "x", "temperature": 7}, None, 400),
    ("top_p zero", {"model": "a0", "prompt": "x", "top_p": 0}, None, 400),
    ("n 2", {"model": "a0", "prompt": "x", "n": 2}, None, 400),
    ("empty stop", {"model": "a0", "prompt": "x", "stop": [""]}, None, 400),
]


@pytest.mark.parametrize("case", [c[0] for c in BAD])
def test_bad_requests_get_an_openai_error_and_the_server_serves_on(server, case):
    _, body, raw, status = next(c for c in BAD if c[0] == case)
    r = server.post("/v1/completions", body, raw=raw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_client_leaving_mid_stream_frees_its_sequence(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": "Bearer sk-admin"},
                      json={"model": "a0", "prompt": "x", "max_tokens": 150, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    deadline = time.time() + 30
    while time.time() < deadline and httpx.get(server.url + "/health").json()["running"]:
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["running"] == 0


def test_a_full_queue_answers_429_with_retry_after(server):
    results = []

    def one():
        results.append(server.post("/v1/completions", {"model": "model", "prompt": "x", "max_tokens": 60}))

    threads = [threading.Thread(target=one) for _ in range(12)]  # 4 running + 3 waiting at most
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(r.status_code for r in results)
    assert 429 in codes and 200 in codes, codes
    busy = next(r for r in results if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"


def test_sigterm_finishes_the_streams_in_flight_then_exits_0(setup):
    tmp, model_dir, adapters = setup
    running = start(tmp, model_dir, adapters)
    try:
        got, lines = [], []

        def stream():
            with httpx.stream("POST", running.url + "/v1/completions", headers={"Authorization": "Bearer sk-admin"},
                              json={"model": "a1", "prompt": "x", "max_tokens": 60, "stream": True,
                                    "temperature": 0}, timeout=120) as r:
                for line in r.iter_lines():
                    lines.append(line)
            got.append(True)

        t = threading.Thread(target=stream)
        t.start()
        while not any(line.startswith("data:") for line in lines):
            time.sleep(0.05)
        running.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert got and [line for line in lines if line][-1] == "data: [DONE]"  # the stream in flight ran to its end
        assert running.proc.wait(60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(running.url + "/health", timeout=2)
    finally:
        stop(running)


def test_a_classification_run_is_served_through_classify(reviews, tiny_bert, tmp_path, capsys):
    """A classification run's base, its adapter carrying its trained head: /v1/classify gives what
    `lorakit predict` gives."""
    from lorakit import cli
    from test_cli import tiny_args

    run = tmp_path / "sentiment"
    assert cli.main(tiny_args(reviews, run, "--model.path", str(tiny_bert), "--train.bf16", "false")) == 0
    texts = ["a wonderful moving film", "a dull tedious mess"]
    capsys.readouterr()
    assert cli.main(["predict", str(run), *texts]) == 0
    predicted = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    (tmp_path / "keys.toml").write_text(KEYS)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", str(run), "--port", str(port), "--bf16",
                             "false"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), start_new_session=True)
    running = Running(proc, port)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(running.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        r = running.post("/v1/classify", {"model": "sentiment", "input": texts}, key=None)
        assert r.status_code == 200, r.text
        for row, (label, p, _) in zip(r.json()["data"], predicted):
            assert row["label"] == label and row["probabilities"][label] == pytest.approx(float(p), abs=1e-3)
            assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert running.post("/v1/completions", {"model": "sentiment", "prompt": "x"}, key=None).status_code == 400
        assert running.post("/v1/classify", {"model": "sentiment", "input": []}, key=None).status_code == 400
    finally:
        stop(running)

"""`lorakit serve`: one frozen base, many adapters, one HTTP server.

    lorakit serve                                   # the packaged SmolLM2-135M-Instruct, no adapters yet
    lorakit serve runs/hamlet                       # a run's base, its adapter served as "hamlet"
    lorakit serve --adapter-dir adapters/ --max-loaded 16 --api-keys keys.toml

base.py: what is served; engine.py: continuous batching; registry.py: adapters on disk and resident;
auth.py: API keys; metrics.py: Prometheus; app.py: the HTTP API.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeOptions:
    """What `lorakit serve` was asked for (see the CLI's help)."""

    target: str | None = None  # a run folder or a model folder
    model_path: str | None = None
    task: str | None = None
    adapters: tuple[tuple[str, str], ...] = ()
    adapter_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_loaded: int = 16
    pins: tuple[str, ...] = ()
    api_keys: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    device: str = "auto"
    bf16: str = "auto"


def build(options: ServeOptions, print_fn=print, engine_thread: bool = True):
    """The server of `options`: base loaded, engine made, adapters registered (not yet resident). With
    engine_thread the engine runs on a thread of its own, which also loads the model (see `Engine.loop`: on a
    CPU, torch computes far faster on the thread that first used it); else the caller runs `engine.loop()`."""
    if engine_thread:
        made: Future = Future()

        def own() -> None:
            try:
                server = build(options, print_fn, engine_thread=False)
            except BaseException as e:  # noqa: BLE001 - the caller gets it
                made.set_exception(e)
                return
            server.engine.thread = threading.current_thread()
            made.set_result(server)
            server.engine.loop()

        threading.Thread(target=own, name="lorakit-engine", daemon=True).start()
        return made.result()
    from ..train.runs import run_config_data
    from ..train.tasks import native_bf16, resolve_device
    from .app import Server
    from .auth import Keys
    from .base import load_base, run_base
    from .engine import Engine
    from .metrics import Metrics
    from .registry import Registry

    device = resolve_device(options.device)
    bf16 = native_bf16(device) if options.bf16 == "auto" else options.bf16 == "true"
    keys = Keys.load(options.api_keys) if options.api_keys else Keys()
    path, task, labels, named = options.model_path, options.task, None, list(options.adapters)
    if options.target is not None:
        target = Path(options.target)
        if (target / "config.json").is_file() and "model" in run_config_data(target):
            run_path, task, labels = run_base(target)
            path = path or run_path
            named.insert(0, (target.resolve().name, str(target)))
        else:
            path = str(target)
    base = load_base(path, task, device, bf16, labels)
    metrics = Metrics()
    engine = Engine(base.model, base.tokenizer, options.max_batch, options.max_queue, thread=engine_thread)
    adapter_dir = Path(options.adapter_dir) if options.adapter_dir else None
    registry = Registry(engine, options.max_loaded, adapter_dir, events=metrics.event)
    for name, folder in named:
        try:
            registry.register(name, folder)
        except Exception as e:  # one bad adapter never takes the server down
            print_fn(f"lorakit: adapter {name!r} not registered: {e}", file=sys.stderr)
    server = Server(base, engine, registry, keys, metrics, pins=options.pins)
    precision = "bf16" if bf16 else str(next(base.model.parameters()).dtype).removeprefix("torch.")
    print_fn(f"lorakit: serving {base.name} ({base.task}, {precision}, {base.bytes / 2**20:,.0f} MiB on {device}) "
             f"with {len(registry.names())} adapter(s) registered, at most {options.max_loaded} resident")
    return server


def run(options: ServeOptions) -> int:
    """Serve until SIGTERM or Ctrl-C: then stop accepting, finish the requests in flight (30 s at most), exit 0.

    The engine runs on the main thread, which loaded the model (see `Engine.loop`); uvicorn on another."""
    import signal

    import uvicorn

    from .app import create_app

    server = build(options, engine_thread=False)
    http = uvicorn.Server(uvicorn.Config(create_app(server), host=options.host, port=options.port,
                                         log_level="warning", timeout_graceful_shutdown=30))
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: server.engine.stop(30.0))

    def serve_http() -> None:
        try:
            http.run()
        finally:
            server.engine.stop(0.0)  # uvicorn ended (or never started): so does the engine

    thread = threading.Thread(target=serve_http, name="lorakit-http", daemon=True)
    thread.start()
    print(f"lorakit: listening on http://{options.host}:{options.port}", flush=True)
    server.engine.loop()
    http.should_exit = True
    thread.join(40)
    return 0 if http.started else 1


__all__ = ["ServeOptions", "build", "run"]

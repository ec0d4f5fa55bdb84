"""`lorakit serve --ray`: the same server on Ray Serve, one lorakit engine per replica, routed by adapter.

    lorakit serve --ray --replicas 2 --adapter-dir adapters/ --max-loaded 16
    serve run lorakit.serve.ray:app adapter_dir=adapters/ replicas=2       # or a Serve config file

One light ingress reads each request's adapter (OpenAI's `model`, TGI's `parameters.adapter_id`) and passes
the request, unchanged, to an engine replica through a handle with the adapter as Ray's multiplexed model
id, so Ray sends it to a replica that has that adapter resident and loads it on another only when it must.
Each replica runs the single server's own FastAPI app in-process — the same routes, keys, errors and
streaming — with its own engine, resident-adapter cache and `--max-loaded`. `/metrics` is every replica's
lorakit metrics, labelled `replica` (each replica reports to a `MetricsHub` actor); Ray's own are on each node's
metrics export port, printed at start.

Every Ray process of a local instance binds 127.0.0.1 only (`local_ray`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from . import ServeOptions

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
HUB = "lorakit-metrics-{app}"  # the named actor that holds each replica's latest metrics, one per application
REPORT_S = (0.2, 5.0)  # a replica reports its metrics at most this often after requests, and at least this often
STALE_S = 15.0  # the metrics of a replica not heard from for this long (it died) are dropped
ADAPTER_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/generate", "/generate_stream", "/")
ADMIN_PATHS = {"/v1/load_lora_adapter": "load", "/v1/unload_lora_adapter": "unload"}
SPARE = 4  # requests a replica takes beyond a full batch: short ones (health, models) and the next prompts


def local_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address`, or start a local instance whose every process binds 127.0.0.1 only.
    (On Linux Ray takes the machine's outward address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set too.)"""
    if address is None:  # read by Ray when it is first imported
        if "ray" in sys.modules and os.environ.get(LOOPBACK_ENV) != "0":
            raise RuntimeError(f"Ray was imported before {LOOPBACK_ENV}=0 was set, so a local instance would not "
                               f"stay on 127.0.0.1; set it in the environment or call local_ray before importing ray")
        os.environ[LOOPBACK_ENV] = "0"
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, log_to_driver=False)
        return
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)


def keep_to_loopback() -> None:
    """In a replica on a node whose Ray address is 127.0.0.1 (a local instance): Ray Serve binds each replica's
    inter-deployment gRPC server to every interface ("[::]:0"); bind it to 127.0.0.1 instead, as the rest of Ray
    there is. (Called in the replica's constructor, which runs before Ray starts that server.)"""
    import ray

    if ray.util.get_node_ip_address() != "127.0.0.1":
        return
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "loopback", False):
        return

    def loopback(server, address: str):
        return original(server, address.replace("[::]", "127.0.0.1"))

    loopback.loopback = True
    replica.add_port_to_grpc_server = loopback


def adapter_of(path: str, body: bytes) -> str | None:
    """The adapter a request names: `model` (OpenAI, classify), `parameters.adapter_id` (TGI) or `lora_name`
    (loading and unloading); None if none."""
    if (path not in ADAPTER_PATHS and path not in ADMIN_PATHS) or not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None  # the replica answers it with the server's own error
    if not isinstance(data, dict):
        return None
    if path in ADMIN_PATHS:
        name = data.get("lora_name")
    elif path in ("/generate", "/generate_stream", "/"):
        params = data.get("parameters")
        name = params.get("adapter_id") if isinstance(params, dict) else None
    else:
        name = data.get("model")
    return name if isinstance(name, str) and name else None


async def run_asgi(app, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> AsyncIterator[Any]:
    """Call an ASGI app in-process: yields (status, headers) first, then the body's chunks as they are sent
    (those sent while the previous one was being passed on, joined: a stream falling behind catches up in fewer,
    larger pieces). Leaving early (the client went away) tells the app the client disconnected."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    task = asyncio.ensure_future(app(scope, receive, messages.put))
    try:
        while True:
            getter = asyncio.ensure_future(messages.get())
            await asyncio.wait([getter, task], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                task.result()  # the app ended without finishing its response: raise its error
                return
            message = getter.result()
            if message["type"] == "http.response.start":
                yield message["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            elif message["type"] == "http.response.body":
                body, more = message.get("body", b""), message.get("more_body", False)
                while more and not messages.empty():  # chunks already sent go on as one
                    message = messages.get_nowait()
                    body, more = body + message.get("body", b""), message.get("more_body", False)
                if body:
                    yield body
                if not more:
                    return
    finally:
        gone.set()
        if not task.done():
            await asyncio.wait([task], timeout=5)


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Prometheus text of several replicas as one, each sample labelled with its replica."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, _empty(family))
            merged.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]

    class Collected:
        def collect(self):
            return iter(families.values())

    registry = CollectorRegistry()
    registry.register(Collected())
    return generate_latest(registry)


def _empty(family):
    out = type(family)(family.name, family.documentation, family.type, family.unit)
    out.samples = []
    return out


class MetricsHub:
    """Each replica's latest metrics text (a Ray actor named HUB, made by the ingress and ending with it)."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def get(self) -> dict[str, str]:
        """The latest text of each replica heard from in the last STALE_S seconds."""
        now = time.monotonic()
        self.texts = {r: (t, text) for r, (t, text) in self.texts.items() if now - t < STALE_S}
        return {r: text for r, (_, text) in self.texts.items()}


def report_metrics(server, replica: str, hub: str, dirty: threading.Event, stop: threading.Event) -> None:
    """A replica's reporter thread: give `server`'s metrics to the hub soon after requests (`dirty`), at most
    every REPORT_S[0] seconds, and every REPORT_S[1] seconds regardless, until `stop`."""
    import ray

    while not stop.is_set():
        dirty.wait(REPORT_S[1])
        dirty.clear()
        try:
            ray.get_actor(hub).put.remote(replica, server.metrics.render().decode())
        except Exception:  # noqa: BLE001 - no hub yet, or it is being remade with the ingress: the next report
            pass
        stop.wait(REPORT_S[0])


def engine_class(max_loaded: int):
    """The replica: one lorakit server, whose adapters are Ray's multiplexed models (at most max_loaded)."""
    from ray import serve

    class LorakitEngine:
        def __init__(self, options: ServeOptions) -> None:
            from . import build
            from .app import create_app

            keep_to_loopback()
            self.server = build(options)
            self.app = create_app(self.server)
            context = serve.get_replica_context()
            self.pins = asyncio.Lock()
            self.pinned = False
            self.dirty, self.stop = threading.Event(), threading.Event()
            threading.Thread(target=report_metrics, daemon=True, name="lorakit-metrics",
                             args=(self.server, context.replica_id.unique_id, HUB.format(app=context.app_name),
                                   self.dirty, self.stop)).start()
            self.syncing = asyncio.Lock()
            self.applied = 0  # how many of the ingress's loads and unloads this replica has carried out

        def base_name(self) -> str:
            return self.server.base.name

        @serve.multiplexed(max_num_models_per_replica=max_loaded)
        async def resident(self, name: str) -> str:
            """Make the adapter resident here: Ray calls this for an adapter it routes to this replica."""
            await self.server.registry.acquire(name)
            self.server.registry.release(name)
            return name

        async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                         body: bytes, changes: list[tuple[str, str, str]] = ()) -> AsyncIterator[Any]:
            """One HTTP request through the server's own app: (status, headers), then the body's chunks.
            `changes` are the loads and unloads the ingress has passed on so far; this replica first carries out
            those it has not."""
            await self._pin()
            await self._sync(changes)
            name = serve.get_multiplexed_model_id()
            if name and path not in ADMIN_PATHS and self._may_load(name, headers):
                try:
                    await self.resident(name)
                except Exception:  # noqa: BLE001 - the app answers the request with the reason
                    pass
            try:
                status = None
                async for part in run_asgi(self.app, method, path, query, headers, body):
                    status = part[0] if status is None else status
                    yield part
                if path == "/v1/load_lora_adapter" and status == 200 and name:
                    await self.resident(name)  # resident here now: let Ray's router know
            finally:
                self.dirty.set()

        async def _sync(self, changes) -> None:
            """Carry out the loads and unloads made through other replicas (in order; an unload of an adapter
            requests here still hold waits for the next request)."""
            from .registry import AdapterBusy

            registry = self.server.registry
            async with self.syncing:
                for op, name, path in list(changes)[self.applied:]:
                    try:
                        if op == "load" and name not in registry.paths:
                            registry.register(name, path)
                        elif op == "unload":
                            await registry.unload(name)
                    except AdapterBusy:
                        return
                    except Exception:  # noqa: BLE001 - unknown here, or refused here: its requests say why
                        pass
                    self.applied += 1

        def _may_load(self, name: str, headers: list[tuple[bytes, bytes]]) -> bool:
            """Only a request whose key may use a known adapter makes it resident."""
            auth = next((v.decode("latin-1") for k, v in headers if k.lower() == b"authorization"), None)
            key = self.server.keys.find(auth)
            if key is None or not key.allows(name):
                return False
            try:
                self.server.registry.path(name)
            except LookupError:
                return False
            return True

        async def _pin(self) -> None:
            async with self.pins:
                if not self.pinned:
                    self.pinned = True
                    for name in self.server.pins:
                        await self.server.registry.pin(name)

        def check_health(self) -> None:
            engine = self.server.engine
            if engine.stopping or (engine.thread is not None and not engine.thread.is_alive()):
                raise RuntimeError("the engine has stopped")

        def __del__(self) -> None:
            if hasattr(self, "stop"):
                self.stop.set()
            server = getattr(self, "server", None)
            if server is not None:
                server.engine.close(True, 30.0)

    return LorakitEngine


HOP_BY_HOP = {"content-length", "transfer-encoding", "connection"}


def ingress_class():
    """The ingress: reads the adapter a request names and hands the request to a replica multiplexed by it."""
    from ray.serve.exceptions import BackPressureError
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse

    class LorakitIngress:
        def __init__(self, engine) -> None:
            import ray
            from ray import serve

            keep_to_loopback()
            self.engine = engine
            name = HUB.format(app=serve.get_replica_context().app_name)
            self.hub = ray.remote(num_cpus=0)(MetricsHub).options(name=name, get_if_exists=True).remote()
            self.base: str | None = None
            self.changes: list[tuple[str, str, str]] = []  # loads and unloads that succeeded, in order

        async def __call__(self, request: Request):
            if request.url.path == "/metrics":
                texts = await self.hub.get.remote()
                return Response(merge_metrics(texts), media_type="text/plain; version=0.0.4")
            body = await request.body()
            try:
                if self.base is None:
                    self.base = await self.engine.base_name.remote()
                name = adapter_of(request.url.path, body)
                handle = self.engine.options(stream=True)
                if name is not None and name != self.base:
                    handle = handle.options(multiplexed_model_id=name)
                parts = handle.handle.remote(request.method, request.url.path, request.url.query.encode(),
                                             list(request.headers.raw), body, list(self.changes))
                status, headers = await parts.__anext__()
                kept = {k: v for k, v in headers if k.lower() not in HOP_BY_HOP}
                if "text/event-stream" in kept.get("content-type", ""):
                    return StreamingResponse(ended_by_error(parts), status_code=status, headers=kept)
                content = b"".join([chunk async for chunk in parts])
                op = ADMIN_PATHS.get(request.url.path)
                if op is not None and status == 200 and name is not None:
                    self.changes.append((op, name, json.loads(body).get("lora_path", "")))
                return Response(content, status_code=status, headers=kept)
            except BackPressureError as e:
                return JSONResponse({"error": {"message": f"the server is busy: {e.args[0] if e.args else 'too many'} "
                                                          f"requests are waiting to start", "type": "rate_limit_error",
                                               "param": None, "code": None}}, status_code=429,
                                    headers={"Retry-After": "1"})
            except Exception as e:  # noqa: BLE001 - a replica that failed: a clean error, the ingress serves on
                return JSONResponse(failure(e), status_code=503, headers={"Retry-After": "1"})

    return LorakitIngress


def failure(e: BaseException) -> dict[str, Any]:
    """The error a client gets when the replica serving its request failed (it was killed, or crashed)."""
    return {"error": {"message": f"the replica serving this request failed: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}",
                      "type": "server_error", "param": None, "code": "replica_failed"}}


async def ended_by_error(parts: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream's chunks; if its replica fails mid-stream, a last event that says so instead of a silent end."""
    try:
        async for chunk in parts:
            yield chunk
    except Exception as e:  # noqa: BLE001
        yield f"data: {json.dumps(failure(e))}\n\n".encode()


def application(options: ServeOptions, replicas: int = 1, autoscale: tuple[int, int] | None = None,
                cpus: float = 1.0):
    """The Ray Serve application: the ingress and `replicas` engine replicas (or min..max, autoscaled), each
    given `cpus` CPUs. A replica takes a full batch and SPARE more requests; Ray sends the rest for an adapter
    to another replica (which loads it) or, when every replica is full, queues up to max_queue of them in the
    ingress, past which the ingress answers 429 as the single server does."""
    from ray import serve

    if autoscale is not None:
        scaling: dict[str, Any] = {"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                                          "target_ongoing_requests": options.max_batch}}
    else:
        scaling = {"num_replicas": replicas}
    engine = serve.deployment(engine_class(options.max_loaded), name="LorakitEngine",
                              max_ongoing_requests=options.max_batch + SPARE, max_queued_requests=options.max_queue,
                              ray_actor_options={"num_cpus": cpus}, health_check_period_s=5, **scaling)
    ingress = serve.deployment(ingress_class(), name="LorakitIngress", num_replicas=1,
                               max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine.bind(options))


def app(args: dict[str, Any]):
    """`serve run lorakit.serve.ray:app key=value ...`, or a Serve config's `args`: ServeOptions' fields by name
    (target, model_path, task, adapter_dir, max_loaded, api_keys, max_batch, max_queue, device, bf16; pins as a
    list or comma-separated; adapters as a NAME: PATH mapping, a list of NAME=PATH or comma-separated NAME=PATH),
    plus replicas, autoscale (MIN:MAX) and cpus (per replica)."""
    import dataclasses

    extra = ("replicas", "autoscale", "cpus")
    known = {f.name for f in dataclasses.fields(ServeOptions)} - {"host", "port"}  # Ray's proxy has those
    values: dict[str, Any] = {}
    for key, value in args.items():
        if key in extra:
            continue
        if key not in known:
            raise ValueError(f"unknown argument {key!r}; expected one of {', '.join([*sorted(known), *extra])}")
        if key == "pins":
            values[key] = tuple(_items(value))
        elif key == "adapters":
            pairs = value.items() if isinstance(value, dict) else (item.split("=", 1) for item in _items(value))
            values[key] = tuple((str(k), str(v)) for k, v in pairs)
        elif key in ("max_loaded", "max_batch", "max_queue"):
            values[key] = _count(key, value)
        else:
            values[key] = str(value)
    autoscale = parse_autoscale(args["autoscale"]) if "autoscale" in args else None
    cpus = args.get("cpus", 1)
    try:
        cpus = float(cpus)
    except (TypeError, ValueError):
        cpus = -1.0
    if cpus <= 0:
        raise ValueError(f"cpus takes a positive number of CPUs per replica, got {args['cpus']!r}")
    return application(ServeOptions(**values), _count("replicas", args.get("replicas", 1)), autoscale, cpus)


def _items(value: Any) -> list[str]:
    """A list given as a list or as comma-separated text."""
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"{key} takes a positive whole number, got {value!r}")
    return int(value)


def parse_autoscale(text: str) -> tuple[int, int]:
    low, sep, high = str(text).partition(":")
    if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise ValueError(f"autoscale takes MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return int(low), int(high)


def run(options: ServeOptions, replicas: int = 1, autoscale: tuple[int, int] | None = None,
        address: str | None = None, cpus: float = 1.0) -> int:
    """Start Ray (or join `address`), deploy the application behind Ray's HTTP proxy at options.host:port and
    serve until SIGTERM or Ctrl-C; then shut the application down and exit 0."""
    import signal
    import threading

    local_ray(address)
    import ray
    from ray import serve

    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(application(options, replicas, autoscale, cpus), name="lorakit", route_prefix="/")
        print(f"lorakit: listening on http://{options.host}:{options.port} (Ray Serve, "
              f"{f'{autoscale[0]}..{autoscale[1]}' if autoscale else replicas} replica(s))", flush=True)
        for node in ray.nodes():
            if node["Alive"]:
                print(f"lorakit: Ray's own metrics: http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
                      f"/metrics", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0

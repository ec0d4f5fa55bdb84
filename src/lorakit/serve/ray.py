"""`lorakit serve --ray`: the same server on Ray Serve, one lorakit engine per replica, routed by adapter.

    lorakit serve --ray --replicas 2 --adapter-dir adapters/ --max-loaded 16
    serve run lorakit.serve.ray:app adapter_dir=adapters/ replicas=2       # or a Serve config file

One light ingress reads each request's adapter (OpenAI's `model`, TGI's `parameters.adapter_id`) and passes
the request, unchanged, to an engine replica through a handle with the adapter as Ray's multiplexed model
id, so Ray sends it to a replica that has that adapter resident and loads it on another only when it must.
Each replica runs the single server's own FastAPI app in-process — the same routes, keys, errors and
streaming — with its own engine, resident-adapter cache and `--max-loaded`. `/metrics` is every replica's
lorakit metrics, labelled `replica`; Ray's own are on Ray's metrics port.

Every Ray process of a local instance binds 127.0.0.1 only (`local_ray`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from . import ServeOptions

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_FLAG = "LORAKIT_RAY_LOOPBACK"  # set for a local instance; its processes inherit it
HUB = "lorakit-metrics"  # the named actor that holds each replica's latest metrics
ADAPTER_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/generate", "/generate_stream", "/")
ADMIN_PATHS = {"/v1/load_lora_adapter": "load", "/v1/unload_lora_adapter": "unload"}


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
    os.environ[LOOPBACK_FLAG] = "1"
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)


def keep_to_loopback() -> None:
    """In a replica of a local instance: Ray Serve binds each replica's inter-deployment gRPC server to every
    interface ("[::]:0"); bind it to 127.0.0.1 instead. (Called in the replica's constructor, which runs before
    Ray starts that server.)"""
    if os.environ.get(LOOPBACK_FLAG) != "1":
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
    """Call an ASGI app in-process: yields (status, headers) first, then the body's chunks as they are sent.
    Leaving early (the client went away) tells the app the client disconnected."""
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
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
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


def _hub():
    """The metrics hub actor, made by the first replica that reports."""
    import ray

    return ray.remote(num_cpus=0)(MetricsHub).options(name=HUB, get_if_exists=True).remote()


class MetricsHub:
    """Each replica's latest metrics text (a Ray actor named HUB)."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = text

    def get(self) -> dict[str, str]:
        return dict(self.texts)


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
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.pins = asyncio.Lock()
            self.pinned = False
            self.hub = None
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
                self._report()

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

        def _report(self) -> None:
            """Give this replica's metrics, as they are after a request, to the hub."""
            self.hub = self.hub or _hub()
            self.hub.put.remote(self.replica, self.server.metrics.render().decode())

        def check_health(self) -> None:
            engine = self.server.engine
            if engine.stopping or (engine.thread is not None and not engine.thread.is_alive()):
                raise RuntimeError("the engine has stopped")

        def __del__(self) -> None:
            server = getattr(self, "server", None)
            if server is not None:
                server.engine.close(True, 30.0)

    return LorakitEngine


HOP_BY_HOP = {"content-length", "transfer-encoding", "connection"}


def ingress_class():
    """The ingress: reads the adapter a request names and hands the request to a replica multiplexed by it."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse

    class LorakitIngress:
        def __init__(self, engine) -> None:
            keep_to_loopback()
            self.engine = engine
            self.base: str | None = None
            self.changes: list[tuple[str, str, str]] = []  # loads and unloads that succeeded, in order

        async def __call__(self, request: Request):
            import ray

            if request.url.path == "/metrics":
                try:
                    texts = await ray.get_actor(HUB).get.remote()
                except ValueError:  # no replica has reported yet
                    texts = {}
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
    given `cpus` CPUs."""
    from ray import serve

    if autoscale is not None:
        scaling: dict[str, Any] = {"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                                          "target_ongoing_requests": options.max_batch}}
    else:
        scaling = {"num_replicas": replicas}
    engine = serve.deployment(engine_class(options.max_loaded), name="LorakitEngine",
                              max_ongoing_requests=options.max_batch + options.max_queue,
                              ray_actor_options={"num_cpus": cpus}, health_check_period_s=5, **scaling)
    ingress = serve.deployment(ingress_class(), name="LorakitIngress", num_replicas=1,
                               max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine.bind(options))


def app(args: dict[str, str]):
    """`serve run lorakit.serve.ray:app key=value ...`: ServeOptions' fields by name (target, model_path,
    adapter_dir, max_loaded, api_keys, max_batch, max_queue, device, bf16; pins and adapters comma-separated,
    adapters as NAME=PATH), plus replicas, autoscale (MIN:MAX) and cpus."""
    import dataclasses

    known = {f.name: f for f in dataclasses.fields(ServeOptions)}
    values: dict[str, Any] = {}
    for key, text in args.items():
        if key in ("replicas", "autoscale", "cpus"):
            continue
        if key not in known:
            raise ValueError(f"unknown argument {key!r}; expected one of {', '.join([*known, 'replicas', 'autoscale', 'cpus'])}")
        if key == "pins":
            values[key] = tuple(p for p in str(text).split(",") if p)
        elif key == "adapters":
            values[key] = tuple(tuple(item.split("=", 1)) for item in str(text).split(",") if item)
        elif key in ("port", "max_loaded", "max_batch", "max_queue"):
            values[key] = int(text)
        else:
            values[key] = text
    autoscale = parse_autoscale(args["autoscale"]) if "autoscale" in args else None
    return application(ServeOptions(**values), int(args.get("replicas", 1)), autoscale, float(args.get("cpus", 1)))


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
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0

"""The HTTP API: OpenAI's (completions, chat, models), vLLM's adapter loading, TGI / LoRAX's generate, a
classify endpoint for classification bases, health and Prometheus metrics.

A request's `model` (TGI: `parameters.adapter_id`) names an adapter, or the base model's name for none. An
adapter the caller's key may not use is answered exactly as one that does not exist (404). Every error is
`{"error": {"message", "type", "param", "code"}}` with its HTTP status (TGI routes add TGI's `error_type`);
the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..files import AdapterFileError
from .auth import Key, Keys
from .base import Base
from .engine import Engine, QueueFull, Sampling, Sequence, Stopping
from .metrics import Metrics
from .registry import AdapterBusy, Registry, UnknownAdapter

MAX_CLASSIFY = 256  # texts per classify request


@dataclass
class Server:
    """Everything one server holds. Only the engine's thread touches the model."""

    base: Base
    engine: Engine
    registry: Registry
    keys: Keys = field(default_factory=Keys)
    metrics: Metrics = field(default_factory=Metrics)
    pins: tuple[str, ...] = ()  # adapters made resident at startup and never evicted
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


# ---------------------------------------------------------------- request bodies (unknown fields are ignored)


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CompletionBody(Body):
    model: str
    prompt: str | list[str]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


class Message(Body):
    role: str
    content: str | list[dict[str, Any]]


class ChatBody(Body):
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False


class ClassifyBody(Body):
    model: str
    input: str | list[str]


class LoadBody(Body):
    lora_name: str
    lora_path: str


class UnloadBody(Body):
    lora_name: str


class TGIParameters(Body):
    adapter_id: str | None = None
    max_new_tokens: int | None = 20
    temperature: float | None = None
    top_p: float | None = None
    do_sample: bool = False
    seed: int | None = None
    stop: list[str] | None = None
    details: bool = True
    return_full_text: bool = False
    ignore_eos_token: bool = False


class TGIBody(Body):
    inputs: str
    parameters: TGIParameters | None = None
    stream: bool = False


# ---------------------------------------------------------------- the app


def create_app(server: Server) -> FastAPI:
    """The FastAPI application of `server`. Its shutdown drains the engine (see `lorakit serve`)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for name in server.pins:
            try:
                await server.registry.pin(name)
            except Exception as e:  # the server still serves the others
                print(f"lorakit: cannot pin adapter {name!r}: {e}", file=sys.stderr, flush=True)
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.engine.close, True, 30.0)

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.server = server
    m = server.metrics

    def on_step(engine: Engine) -> None:
        m.waiting.set(len(engine.waiting))
        m.running.set(len(engine.running))
        m.resident.set(len(server.registry.resident))
        m.resident_bytes.set(server.registry.resident_bytes())

    server.engine.on_step = on_step

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        body: dict[str, Any] = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
        if request.url.path in ("/", "/generate", "/generate_stream"):
            body["error_type"] = {400: "validation", 429: "overloaded"}.get(e.status, e.type)
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "the body is not valid JSON" if first.get("type") == "json_invalid" else \
            f"{where or 'body'}: {first.get('msg')}"
        return await api_error(request, APIError(400, message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return await api_error(request, APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        return await api_error(request, APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    def key_of(request: Request) -> Key:
        key = server.keys.find(request.headers.get("authorization"))
        if key is None:
            raise APIError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")
        return key

    def adapter_of(key: Key, model: str | None, param: str = "model") -> str | None:
        """The adapter a request names (None: the base), known and allowed for the key, else 404."""
        if model is None or model == server.base.name:
            return None
        if key.allows(model):
            try:
                server.registry.path(model)
                return model
            except UnknownAdapter:
                pass
        raise APIError(404, f"The model `{model}` does not exist", "not_found_error", param, "model_not_found")

    # ------------------------------------------------------------ listing, health, metrics

    @app.get("/v1/models")
    async def models(request: Request):
        key = key_of(request)
        base = {"id": server.base.name, "object": "model", "created": server.created, "owned_by": "lorakit",
                "root": server.base.name, "parent": None}
        adapters = [{"id": n, "object": "model", "created": server.created, "owned_by": "lorakit",
                     "root": server.base.name, "parent": server.base.name}
                    for n in server.registry.names() if key.allows(n)]
        return {"object": "list", "data": [base, *adapters]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.base.name, "task": server.base.task,
                "running": len(server.engine.running), "waiting": len(server.engine.waiting)}

    @app.get("/metrics")
    async def metrics():
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------ generation

    async def start(key: Key, model: str | None, prompt: list[int], sampling: Sampling, endpoint: str,
                    param: str = "model") -> tuple[Sequence, asyncio.Queue, str | None]:
        """Check, make the adapter resident, and hand the sequence to the engine; its events arrive on the queue."""
        if server.base.task != "causal-lm":
            raise APIError(400, f"{server.base.name} is a classification model; use /v1/classify")
        adapter = adapter_of(key, model, param)
        label = adapter or ""
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt) + sampling.max_tokens > server.base.context:
            where = "max_tokens" if len(prompt) < server.base.context else "prompt"
            raise APIError(400, f"the prompt ({len(prompt)} tokens) and max_tokens ({sampling.max_tokens}) exceed "
                                f"the model's context of {server.base.context} tokens", param=where,
                           code="context_length_exceeded")
        if adapter is not None:
            try:
                await server.registry.acquire(adapter)
            except (AdapterFileError, ValueError) as e:
                m.errors.labels(label, "adapter").inc()
                raise APIError(400, f"adapter {adapter!r} cannot be loaded: {e}", param=param) from None
            except AdapterBusy as e:
                raise APIError(503, str(e), "server_error", headers={"Retry-After": "1"}) from None
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        arrived, last = time.perf_counter(), [None]

        def on_token(text: str) -> None:
            now = time.perf_counter()
            (m.ttft if last[0] is None else m.itl).labels(label).observe(now - (last[0] or arrived))
            last[0] = now
            loop.call_soon_threadsafe(queue.put_nowait, ("token", text))

        def on_finish(reason: str, usage: dict) -> None:  # on the engine's thread, once, however it ended
            if adapter is not None:
                server.registry.release(adapter)
            m.prompt_tokens.labels(label).inc(usage["prompt_tokens"])
            m.generated_tokens.labels(label).inc(usage["completion_tokens"])
            if reason.startswith("error"):
                m.errors.labels(label, "engine").inc()
            loop.call_soon_threadsafe(queue.put_nowait, ("done", reason, usage))

        seq = Sequence(prompt, adapter, sampling, on_token, on_finish)
        try:
            server.engine.submit(seq)
        except QueueFull as e:
            if adapter is not None:
                server.registry.release(adapter)
            m.requests.labels(label, endpoint, "429").inc()
            raise APIError(429, f"the server is busy: {e}", "rate_limit_error", headers={"Retry-After": "1"}) from None
        except Stopping as e:
            if adapter is not None:
                server.registry.release(adapter)
            m.requests.labels(label, endpoint, "503").inc()
            raise APIError(503, str(e), "server_error") from None
        m.requests.labels(label, endpoint, "200").inc()
        return seq, queue, adapter

    async def events(seq: Sequence, queue: asyncio.Queue, adapter: str | None) -> AsyncIterator[tuple]:
        """The sequence's events until it finishes; leaving early (a client gone) cancels it. (The adapter
        is released when the engine finishes the sequence, whether or not anyone reads its events.)"""
        try:
            while True:
                event = await queue.get()
                yield event
                if event[0] == "done":
                    return
        finally:
            seq.cancelled.set()

    def sampling_of(max_tokens: int | None, temperature: float | None, top_p: float | None, seed: int | None,
                    stop: str | list[str] | None, prompt_len: int, ignore_eos: bool = False) -> Sampling:
        if max_tokens is None:
            max_tokens = max(1, server.base.context - prompt_len)
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        temperature = 1.0 if temperature is None else temperature
        if not (math.isfinite(temperature) and 0 <= temperature <= 2):
            raise APIError(400, f"temperature must be a number in [0, 2], got {temperature}", param="temperature")
        top_p = 1.0 if top_p is None else top_p
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise APIError(400, f"top_p must be a number in (0, 1], got {top_p}", param="top_p")
        if seed is not None and not 0 <= seed < 2**63:
            raise APIError(400, f"seed must be an integer in [0, 2**63), got {seed}", param="seed")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
        return Sampling(max_tokens, temperature, top_p, seed, tuple(stops), ignore_eos)

    def tokens(text: str) -> list[int]:
        return server.base.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sse(data: Any) -> str:
        return f"data: {json.dumps(data)}\n\n"

    def check_n(n: int) -> None:
        if n != 1:
            raise APIError(400, f"n must be 1, got {n}", param="n")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        key = key_of(request)
        check_n(body.n)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise APIError(400, "prompt must be one string (or a list of one)", param="prompt")
            body.prompt = body.prompt[0]
        prompt = tokens(body.prompt)
        sampling = sampling_of(body.max_tokens, body.temperature, body.top_p, body.seed, body.stop, len(prompt),
                               body.ignore_eos)
        seq, queue, adapter = await start(key, body.model, prompt, sampling, "completions")
        rid, made = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, reason: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": made, "model": body.model,
                    "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}

        if body.stream:
            async def stream():
                async for event in events(seq, queue, adapter):
                    if event[0] == "token":
                        yield sse(chunk(event[1], None))
                    else:
                        last = chunk("", finish_reason(event[1]))
                        if (body.stream_options or {}).get("include_usage"):
                            last["usage"] = event[2]
                        yield sse(last)
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream")
        text, reason, usage = await collect(seq, queue, adapter)
        return {**chunk(text, reason), "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        key = key_of(request)
        check_n(body.n)
        template = getattr(server.base.tokenizer, "chat_template", None)
        if not template:
            raise APIError(400, f"{server.base.name} has no chat template; use /v1/completions", param="messages")
        if not body.messages:
            raise APIError(400, "messages is empty", param="messages")
        messages = [{"role": msg.role, "content": msg.content if isinstance(msg.content, str) else
                     "".join(part.get("text", "") for part in msg.content if part.get("type") == "text")}
                    for msg in body.messages]
        text = server.base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokens(text)
        sampling = sampling_of(body.max_completion_tokens or body.max_tokens, body.temperature, body.top_p, body.seed,
                               body.stop, len(prompt), body.ignore_eos)
        seq, queue, adapter = await start(key, body.model, prompt, sampling, "chat")
        rid, made = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if body.stream:
            async def stream():
                first = True
                async for event in events(seq, queue, adapter):
                    delta = ({"role": "assistant"} if first else {}) | ({"content": event[1]} if event[0] == "token" else {})
                    first = False
                    reason = finish_reason(event[1]) if event[0] == "done" else None
                    data = {"id": rid, "object": "chat.completion.chunk", "created": made, "model": body.model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
                    if event[0] == "done" and (body.stream_options or {}).get("include_usage"):
                        data["usage"] = event[2]
                    yield sse(data)
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream")
        text, reason, usage = await collect(seq, queue, adapter)
        return {"id": rid, "object": "chat.completion", "created": made, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": usage}

    async def collect(seq: Sequence, queue: asyncio.Queue, adapter: str | None) -> tuple[str, str, dict]:
        parts, reason, usage = [], "stop", {}
        async for event in events(seq, queue, adapter):
            if event[0] == "token":
                parts.append(event[1])
            else:
                reason, usage = finish_reason(event[1]), event[2]
        if reason == "error":
            raise APIError(500, "generation failed in the engine", "server_error")
        return "".join(parts), reason, usage

    # ------------------------------------------------------------ TGI / LoRAX

    async def tgi(body: TGIBody, request: Request, stream: bool, listed: bool):
        key = key_of(request)
        p = body.parameters or TGIParameters()
        prompt = tokens(body.inputs)
        temperature = (p.temperature if p.temperature is not None else 1.0) if p.do_sample else 0.0
        sampling = sampling_of(p.max_new_tokens, temperature, p.top_p, p.seed, p.stop, len(prompt), p.ignore_eos_token)
        seq, queue, adapter = await start(key, p.adapter_id, prompt, sampling, "generate", "parameters.adapter_id")
        if stream:
            async def tokens_out():
                async for event in events(seq, queue, adapter):
                    if event[0] == "token":
                        yield sse({"token": {"id": seq.generated[-1], "text": event[1], "logprob": 0.0,
                                             "special": False}, "generated_text": None, "details": None})
                    else:
                        yield sse({"token": {"id": seq.generated[-1] if seq.generated else 0, "text": "",
                                             "logprob": 0.0, "special": True},
                                   "generated_text": seq.text, "details": {
                                       "finish_reason": tgi_reason(seq, event[1]), "prompt_tokens": len(prompt),
                                       "generated_tokens": event[2]["completion_tokens"], "seed": p.seed}})
            return StreamingResponse(tokens_out(), media_type="text/event-stream")
        text, reason, usage = await collect(seq, queue, adapter)
        out = {"generated_text": (body.inputs + text) if p.return_full_text else text,
               "details": {"finish_reason": tgi_reason(seq, reason), "prompt_tokens": len(prompt),
                           "generated_tokens": usage["completion_tokens"], "seed": p.seed, "prefill": [],
                           "tokens": []} if p.details else None}
        return [out] if listed else out

    @app.post("/generate")
    async def generate(body: TGIBody, request: Request):
        return await tgi(body, request, stream=False, listed=False)

    @app.post("/generate_stream")
    async def generate_stream(body: TGIBody, request: Request):
        return await tgi(body, request, stream=True, listed=False)

    @app.post("/")
    async def compat(body: TGIBody, request: Request):
        return await tgi(body, request, stream=body.stream, listed=True)

    # ------------------------------------------------------------ classification

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody, request: Request):
        key = key_of(request)
        if server.base.task != "classify":
            raise APIError(400, f"{server.base.name} is a language model; /v1/classify is for classification bases")
        adapter = adapter_of(key, body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > MAX_CLASSIFY or any(not t.strip() for t in texts):
            raise APIError(400, f"input must be 1 to {MAX_CLASSIFY} non-empty texts", param="input")
        label = adapter or ""
        if adapter is not None:
            try:
                await server.registry.acquire(adapter)
            except (AdapterFileError, ValueError) as e:
                raise APIError(400, f"adapter {adapter!r} cannot be loaded: {e}", param="model") from None
        try:
            probs = await asyncio.wrap_future(server.engine.call(lambda: score(server, texts, adapter)))
        finally:
            if adapter is not None:
                server.registry.release(adapter)
        m.requests.labels(label, "classify", "200").inc()
        labels = server.base.labels
        return {"object": "list", "model": body.model, "data": [
            {"index": i, "label": labels[int(p.argmax())], "probabilities": dict(zip(labels, map(float, p)))}
            for i, p in enumerate(probs)]}

    # ------------------------------------------------------------ adapters (admin keys)

    def admin(request: Request) -> Key:
        key = key_of(request)
        if not key.admin:
            raise APIError(403, "loading and unloading adapters needs an admin key", "permission_error")
        return key

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadBody, request: Request):
        admin(request)
        name = body.lora_name
        if not name or "/" in name or name == server.base.name:
            raise APIError(400, f"lora_name {name!r} cannot name an adapter", param="lora_name")
        if name in server.registry.paths:
            raise APIError(400, f"an adapter named {name!r} is already registered; unload it first", param="lora_name")
        try:
            server.registry.register(name, body.lora_path)
            await server.registry.acquire(name)
        except (AdapterFileError, ValueError, OSError) as e:
            server.registry.paths.pop(name, None)
            raise APIError(400, f"adapter {name!r} refused: {e}", param="lora_path") from None
        except AdapterBusy as e:
            server.registry.paths.pop(name, None)
            raise APIError(503, str(e), "server_error", headers={"Retry-After": "1"}) from None
        server.registry.release(name)
        return {"status": "ok", "lora_name": name}

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadBody, request: Request):
        admin(request)
        try:
            await server.registry.unload(body.lora_name)
        except UnknownAdapter:
            raise APIError(404, f"no adapter named {body.lora_name!r}", "not_found_error", "lora_name") from None
        except AdapterBusy as e:
            raise APIError(409, str(e), "conflict_error", "lora_name") from None
        return {"status": "ok", "lora_name": body.lora_name}

    return app


def finish_reason(reason: str) -> str:
    """The engine's reason in OpenAI's words: stop, length (a cancel or an error never reaches a client)."""
    return "length" if reason == "length" else "error" if reason.startswith("error") else "stop"


def tgi_reason(seq: Sequence, reason: str) -> str:
    """The engine's reason in TGI's words: length, stop_sequence or eos_token."""
    if reason == "length":
        return "length"
    return "stop_sequence" if seq.matched_stop else "eos_token"


def score(server: Server, texts: list[str], adapter: str | None) -> torch.Tensor:
    """On the engine's thread: label probabilities (N, labels) of texts under an adapter's head."""
    base = server.base
    enc = base.tokenizer(texts, padding=True, truncation=True, max_length=base.context, return_tensors="pt")
    device = next(base.model.parameters()).device
    with torch.no_grad(), server.engine.rows([adapter] * len(texts)):
        logits = base.model(**{k: v.to(device) for k, v in enc.items()}).logits
    return logits.float().softmax(-1).cpu()

"""Adapters by name: registered on disk (any number), resident on the model (at most `max_loaded`).

A request names an adapter; `acquire` makes it resident and holds it until `release`. A cold adapter's
files are read and verified (`read_adapter`) on a worker thread while the engine keeps stepping
(`Engine.aside`); between two steps the engine checks it against the base, builds and attaches it
(`prepare_adapter`, `attach_adapter`: a few tens of milliseconds); concurrent requests for it share one
load. When more than `max_loaded` would be resident, the least recently used adapter that no request holds
and that is not pinned is evicted; it reloads on its next request. A folder added under `adapter_dir` later
is found on the first request for it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import delete_adapter, holders
from ..files import AdapterFileError, AdapterSpec, CONFIG_NAME, attach_adapter, prepare_adapter, read_adapter
from .engine import Engine


class UnknownAdapter(LookupError):
    """No adapter of that name is registered (nor a folder of that name under the adapter directory)."""


class AdapterBusy(RuntimeError):
    """The adapter is held by requests in flight (unload), or every resident one is (load)."""


@dataclass
class Loaded:
    """A resident adapter: requests holding it, pinned (never evicted), its bytes on the model."""

    holds: int = 0
    pinned: bool = False
    bytes: int = 0


def adapter_folder(path: Path) -> Path:
    """The adapter folder of a path: the folder itself, or a run folder's adapter/."""
    return path / "adapter" if (path / "adapter" / CONFIG_NAME).is_file() else path


class Registry:
    """Names → adapter folders, and which of them are resident on `engine.model`."""

    def __init__(self, engine: Engine, max_loaded: int = 16, adapter_dir: Path | None = None,
                 events: Callable[[str, str, float], None] | None = None) -> None:
        self.engine, self.max_loaded, self.adapter_dir = engine, max_loaded, adapter_dir
        self.paths: dict[str, Path] = {}
        self.resident: OrderedDict[str, Loaded] = OrderedDict()  # least recently used first
        self.loading: dict[str, asyncio.Future] = {}
        self.lock = threading.Lock()
        # Readers run torch ops single-threaded: a second OpenMP team beside the engine's slows every later step.
        self.reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lorakit-read",
                                         initializer=torch.set_num_threads, initargs=(1,))
        self.events = events or (lambda kind, name, seconds: None)  # ("load" | "evict", name, seconds)

    # ------------------------------------------------------------ what is registered

    def register(self, name: str, path: str | Path) -> None:
        folder = adapter_folder(Path(path))
        if not (folder / CONFIG_NAME).is_file():
            raise AdapterFileError(f"{path} is not an adapter folder or a run folder with adapter/ "
                                   f"(no {CONFIG_NAME})")
        self.paths[name] = folder

    def names(self) -> list[str]:
        """Every adapter that can be served: registered, or a folder under the adapter directory."""
        found = set(self.paths)
        if self.adapter_dir is not None and self.adapter_dir.is_dir():
            found |= {p.name for p in self.adapter_dir.iterdir() if (adapter_folder(p) / CONFIG_NAME).is_file()}
        return sorted(found)

    def path(self, name: str) -> Path:
        if name not in self.paths and self.adapter_dir is not None and "/" not in name and not name.startswith("."):
            candidate = self.adapter_dir / name
            if (adapter_folder(candidate) / CONFIG_NAME).is_file():
                self.paths[name] = adapter_folder(candidate)
        if name not in self.paths:
            raise UnknownAdapter(name)
        return self.paths[name]

    def resident_bytes(self) -> int:
        return sum(r.bytes for r in self.resident.values())

    # ------------------------------------------------------------ making resident

    async def acquire(self, name: str) -> None:
        """Make `name` resident (loading it if needed) and hold it until `release(name)`."""
        while True:
            with self.lock:
                if name in self.resident:
                    self.resident[name].holds += 1
                    self.resident.move_to_end(name)
                    return
                pending = self.loading.get(name)
                if pending is None:
                    pending = self.loading[name] = asyncio.get_running_loop().create_future()
                    start = True
                else:
                    start = False
            if start:
                try:
                    await self._load(name)  # resident now, held once: this request's hold
                    pending.set_result(None)
                    return
                except BaseException as e:
                    pending.set_exception(e)
                    pending.exception()  # retrieved: requests waiting on it get it; none need be
                    raise
                finally:
                    with self.lock:
                        self.loading.pop(name, None)
            else:
                await asyncio.shield(pending)

    def release(self, name: str) -> None:
        with self.lock:
            if name in self.resident:
                self.resident[name].holds = max(0, self.resident[name].holds - 1)

    async def _load(self, name: str) -> None:
        start = time.perf_counter()
        folder = self.path(name)
        loop = asyncio.get_running_loop()
        with self.engine.aside():
            spec = await loop.run_in_executor(self.reader, read_adapter, folder)
        placed = self.engine.call(lambda: self._place(name, spec, folder))
        try:
            await asyncio.wrap_future(placed)
        except asyncio.CancelledError:  # the request went away: its hold goes once the adapter is placed
            placed.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or self.release(name))
            raise
        self.events("load", name, time.perf_counter() - start)

    def _place(self, name: str, spec: AdapterSpec, folder: Path) -> None:
        """On the engine's thread, between two steps: check the adapter against the model and build it, make
        room, attach it, and count it resident, held once (by the request that loads it) — in the same step,
        so the next load counts it."""
        model = self.engine.model
        prepared = prepare_adapter(model, spec, name, where=folder)
        with self.lock:  # victims leave `resident` at once, so no request takes one while it goes
            over = len(self.resident) + 1 - self.max_loaded
            victims = [n for n, r in self.resident.items() if r.holds == 0 and not r.pinned][:max(0, over)]
            if over > len(victims):
                raise AdapterBusy(f"all {len(self.resident)} resident adapters are in use or pinned "
                                  f"(--max-loaded {self.max_loaded}); try again shortly")
            for victim in victims:
                self.resident.pop(victim)
        for victim in victims:
            self._evict(victim)
        attach_adapter(model, prepared)
        for m in holders(model):  # the engine chooses adapters per row; none is "active"
            m.active = None
        self.engine.adapters_changed()
        size = sum(t.numel() * t.element_size() for m in prepared.built.values() for t in m.parameters())
        with self.lock:
            self.resident[name] = Loaded(holds=1, bytes=size)

    def _evict(self, name: str) -> None:
        delete_adapter(self.engine.model, name)
        self.engine.adapters_changed()
        with self.lock:
            self.resident.pop(name, None)
        self.events("evict", name, 0.0)

    async def pin(self, name: str) -> None:
        await self.acquire(name)
        with self.lock:
            self.resident[name].pinned = True
            self.resident[name].holds -= 1

    async def unload(self, name: str) -> None:
        """Forget `name`: evict it (refused while requests hold it) and drop its registration."""
        self.path(name)
        with self.lock:
            held = self.resident[name].holds if name in self.resident else 0
            if held:
                raise AdapterBusy(f"adapter {name!r} is in use by {held} request(s)")
            self.paths.pop(name, None)
            resident = self.resident.pop(name, None) is not None
        if resident:
            await asyncio.wrap_future(self.engine.call(lambda: self._evict(name)))


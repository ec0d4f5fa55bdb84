"""The engine's KV caches: per layer, keys and values in buffers with room at the end for the next positions.

transformers' DynamicCache concatenates each step's key and value onto the cache, copying all of it every
step (and again when a cache is built from saved tensors): for 16 rows of SmolLM2 over a few hundred
positions that is a quarter of a CPU decode step. Here a step writes its new positions into the room left
at the end of each buffer, and the attention reads a view of the filled part; the buffers are copied only
when the room runs out (then grown by half) and when rows join or leave the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOM = 128  # positions of room a new or rebuilt buffer gets


@dataclass
class KV:
    """Keys and values per layer, each (B, heads, capacity, dim), of which positions [0, length) hold data."""

    layers: list[tuple[Tensor, Tensor]]
    length: int

    def cache(self, config) -> DynamicCache:
        """A transformers cache over these buffers, new positions written in place."""
        out = DynamicCache(config=config)
        if len(out.layers) != len(self.layers) or any(type(layer) is not DynamicLayer for layer in out.layers):
            # sliding-window or other special layers: transformers' own cache, from the filled part
            return DynamicCache(ddp_cache_data=self.filled(), config=config)
        out.layers = [Buffered(k, v, self.length) for k, v in self.layers]
        return out

    def filled(self) -> list[tuple[Tensor, Tensor]]:
        return [(k[:, :, :self.length], v[:, :, :self.length]) for k, v in self.layers]

    @classmethod
    def of(cls, cache) -> KV:
        """The buffers a forward left in `cache` (from `cache` above, or any transformers cache)."""
        layers = cache.layers
        if all(isinstance(layer, Buffered) for layer in layers):
            return cls([layer.buffers for layer in layers], layers[0].length)
        return cls([(layer.keys, layer.values) for layer in layers], layers[0].keys.shape[2])

    def rows(self, index: Tensor, start: int) -> KV:
        """These rows, from position `start` on, in fresh buffers with room."""
        n = self.length - start
        return KV([(_fresh(k[index, :, start:self.length], n), _fresh(v[index, :, start:self.length], n))
                   for k, v in self.layers], n)

    def stack(self, other: KV) -> KV:
        """Self's rows and then other's, right-aligned to the longer length (the shorter left-padded)."""
        width = max(self.length, other.length)
        layers = []
        for (k, v), (k2, v2) in zip(self.layers, other.layers):
            pair = []
            for a, b in ((k, k2), (v, v2)):
                out = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], width + ROOM, a.shape[3])
                out[:a.shape[0], :, width - self.length:width] = a[:, :, :self.length]
                out[a.shape[0]:, :, width - other.length:width] = b[:, :, :other.length]
                pair.append(out)
            layers.append((pair[0], pair[1]))
        return KV(layers, width)


def _fresh(filled: Tensor, n: int, room: int = ROOM) -> Tensor:
    """A buffer holding `filled` (n positions) and then `room` empty ones."""
    out = filled.new_zeros(*filled.shape[:2], n + room, filled.shape[3])
    out[:, :, :n] = filled
    return out


class Buffered(DynamicLayer):
    """A full-attention cache layer over buffers with room: `update` writes the new positions in place."""

    def __init__(self, keys: Tensor, values: Tensor, length: int) -> None:
        super().__init__()
        self.buffers, self.length = (keys, values), length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.buffers[0].shape[2]:
            self.buffers = tuple(_fresh(t[:, :, :self.length], self.length, end - self.length + max(ROOM, end // 2))
                                 for t in self.buffers)
        keys, values = self.buffers
        keys[:, :, self.length:end] = key_states
        values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values

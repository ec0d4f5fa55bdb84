"""Mixed-adapter batches: row i of a batch uses adapter rows[i] (None: the base alone), in one forward.

Every adapter of a model has a slot, the same in every layer (`Slots`; slot 0 is no adapter). Each LoRA layer
keeps its adapters side by side in a `Bank`, slot-major: `a` (slots, in, R) holds each slot's Aᵀ, `up`
(slots, R, out) its (s·B)ᵀ, zero-padded to the layer's largest rank R (zero padding is exact) and all zero in
an empty slot. A batch then takes one of two paths, neither a Python loop over adapters:
- every row has the same adapter: its slot's `a` and `up`, two matmuls;
- else grouped: the batch's positions gathered by slot into (groups, m, in), m the most positions any slot
  has (padded with zeros), then two batched matmuls against the groups' A and B and each position's result
  picked back. The groups are every slot in use (a view of the bank), or only the slots the batch names
  (copied) when that moves fewer rows of weights and padding, as for a skewed batch or few of many slots
  (`Rows.groups`). Each position multiplies only its own adapter's
  r columns: a decode step over 16 rows and 8 adapters does 1/8 of the work of multiplying every row by every
  adapter.
What is the same for every layer of one batch — each row's slot and the grouping — is made once, in `Rows`.
The bank is kept in the adapters' own dtype and follows the layer's adapters: one added, changed in place
or deleted is written to (or cleared from) its slot when a batch next names it, and the others are not
copied again. A 16-bit model over many positions (> SMALL) uses a 16-bit copy of the bank, kept in step slot
by slot; over few positions (decoding) the bank's fp32, where a CPU runs thin matmuls faster.
A DoRA adapter's slot holds f ⊙ s·B (f = m / ‖W0 + s·B·A‖, see dora.py) in `up`, and f − 1 in the bank's
`factor`, so its rows get y + (f − 1) ⊙ (y − bias) + f ⊙ s·B·A·x: W0 rescaled per output as DoRA's W' does.
Inference only: no dropout.

`lorakit.mixed_batch` sets the rows; `LoraLayer` and `SavedModule` call these functions. Nothing here imports
the rest of lorakit but dora.py: a layer is anything with base, adapters, rows, geometry and merged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from . import dora

HALF = (torch.bfloat16, torch.float16)
SMALL = 32  # positions in a batch up to which a CPU computes a 16-bit model's updates in the bank's fp32


class Slots:
    """A model's adapter name → slot, shared by all its layers' banks. version changes when a slot does."""

    def __init__(self) -> None:
        self.of: dict[str, int] = {}
        self.version = 0

    def update(self, names: Iterable[str]) -> None:
        """Slots for exactly these names: a name keeps its slot, a gone one frees it, a new one takes the
        lowest free slot."""
        names = set(names)
        gone = [n for n in self.of if n not in names]
        new = sorted(names.difference(self.of))
        if not gone and not new:
            return
        for n in gone:
            del self.of[n]
        used = set(self.of.values())
        free = (s for s in range(1, len(names) + 2) if s not in used)
        for n in new:
            self.of[n] = next(free)
        self.version += 1

    @property
    def size(self) -> int:
        return max(self.of.values(), default=0) + 1


def slots_of(model: nn.Module, layers: Sequence[nn.Module]) -> Slots:
    """The model's `Slots` (kept on it), brought level with the adapters of its LoRA layers."""
    slots = model.__dict__.get("lorakit_slots")
    if slots is None:
        slots = model.__dict__["lorakit_slots"] = Slots()
    slots.update(n for m in layers for n in m.adapters.keys())
    return slots


class Rows(list):
    """A mixed batch's adapter name per row, with what all its layers share: the model's slots, the adapters
    named, and — made once per batch — each row's slot and the dense path's block mask."""

    def __init__(self, names: Iterable[str | None], slots: Slots, stamp: int | None = None) -> None:
        """stamp: an owner's word that no adapter was added, deleted or changed in place since it last gave
        this stamp (the serving engine, which makes every change itself); a layer's bank then skips checking
        adapters it has checked under that stamp. None: every batch checks them."""
        super().__init__(names)
        self.slots, self.stamp = slots, stamp
        self.named = sorted({n for n in self if n is not None})
        self.single = self.named[0] if len(self.named) == 1 and all(self) else None  # every row's adapter
        self.made: dict[tuple, Tensor] = {}

    def index(self, device: torch.device, only: frozenset[str] | None = None) -> Tensor:
        """(B,) each row's slot; with `only` (the adapters a layer holds, when it lacks some the batch names),
        slot 0, which holds nothing, for a row whose adapter is not among them."""
        key = ("index", device, only)
        if key not in self.made:
            self.made[key] = torch.tensor([self.slots.of.get(n, 0) if n and (only is None or n in only) else 0
                                           for n in self], device=device)
        return self.made[key]

    def groups(self, width: int, device: torch.device, only: frozenset[str] | None = None
               ) -> tuple[Tensor | None, Tensor, Tensor, int]:
        """How a layer with `width` slots groups the rows by slot: (the slots of the groups — None for the first
        `width` slots in order, else a (G,) index —, gather (G·m,): the row in each place of each group, len(self)
        where it is padding, back (B,): each row's place, m)."""
        key = ("groups", width, device, only)
        if key not in self.made:
            index = self.index(device, only).tolist()
            used = sorted(set(index))
            m = max(index.count(s) for s in used)
            # Every slot in use, padded to m rows each, as a view of the bank; or only the slots named, copied
            # out of it: whichever moves fewer rows of weights and padding (a copy costs about two matmuls).
            chosen = None if width * (m + 4) <= len(used) * (m + 12) else used
            place = {s: g for g, s in enumerate(range(width) if chosen is None else chosen)}
            gather, back, seen = [len(self)] * (len(place) * m), [0] * len(self), [0] * len(place)
            for row, s in enumerate(index):
                g = place[s]
                back[row] = g * m + seen[g]
                gather[back[row]] = row
                seen[g] += 1
            self.made[key] = (None if chosen is None else torch.tensor(chosen, device=device),
                              torch.tensor(gather, device=device), torch.tensor(back, device=device), m)
        return self.made[key]


class Bank:
    """A layer's adapters by slot: a (width, in, R) holds Aᵀ blocks, up (width, R, out) (s·B)ᵀ blocks."""

    def __init__(self, layer: nn.Module, width: int, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device, self.width, self.rank = dtype, device, width, rank
        self.rows_in, self.out = layer.geometry.in_features, layer.geometry.out_features
        self.a = torch.zeros(width, self.rows_in, rank, dtype=dtype, device=device)
        self.up = torch.zeros(width, rank, self.out, dtype=dtype, device=device)
        self.held: dict[str, list] = {}  # name → [slot, adapter, lora_a, lora_b, their versions, scale] as copied
        self.seen = (-1, ())  # the slots' version and the layer's adapter names at the last clean-up
        self.cast: tuple[torch.dtype, Tensor, Tensor] | None = None  # a and up in a 16-bit dtype, until a write
        self.factor: Tensor | None = None  # (width, out): DoRA's f − 1 per slot, 0 elsewhere; None until one comes
        self.dora: set[int] = set()  # the slots that hold a DoRA adapter
        self.checked: tuple[int | None, set[tuple[str, ...]]] = (None, set())  # (stamp, named sets synced under it)

    def weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """a and up in dtype (a copy in another dtype is kept until the bank next changes)."""
        if dtype == self.dtype:
            return self.a, self.up
        if self.cast is None or self.cast[0] != dtype:
            self.cast = (dtype, self.a.to(dtype), self.up.to(dtype))
        return self.cast[1], self.cast[2]

    def sync(self, layer: nn.Module, rows: Rows) -> None:
        """Clear the slots of adapters gone from the layer (or moved), then copy in each adapter the batch names
        that is new or changed since it was copied — growing the bank first when it is too narrow or R too small."""
        adapters = layer.adapters._modules
        seen = (rows.slots.version, tuple(adapters))
        if seen != self.seen:
            for name, held in list(self.held.items()):
                if adapters.get(name) is not held[1] or rows.slots.of.get(name) != held[0]:
                    self._clear(held[0])
                    del self.held[name]
            self.seen = seen
        for name in rows.named:
            adapter = adapters.get(name)
            if adapter is None:
                continue
            a, b = adapter._parameters["lora_a"], adapter._parameters["lora_b"]
            held = self.held.get(name)
            if (held is not None and held[2] is a and held[3] is b and held[4] == _versions(adapter)
                    and held[5] == adapter.scale):
                continue
            self.write(name, rows.slots.of[name], adapter, layer)

    @torch.no_grad()
    def write(self, name: str, slot: int, adapter: nn.Module, layer: nn.Module) -> None:
        r = adapter.lora_a.shape[0]
        if slot >= self.width or r > self.rank:
            self.grow(max(2 * self.width, slot + 1) if slot >= self.width else self.width, max(r, self.rank))
        self._clear(slot)
        up = adapter.up().detach() * adapter.scale  # (out, r)
        if adapter.magnitude is not None:
            f = dora.factor(layer, adapter).detach().to(self.dtype)
            up = up * f[:, None]
            if self.factor is None:
                self.factor = torch.zeros(self.width, self.out, dtype=self.dtype, device=self.device)
            self.factor[slot] = f - 1
            self.dora.add(slot)
        self.a[slot, :, :r] = adapter.lora_a.detach().flatten(1).t()
        self.up[slot, :r] = up.t()
        a, b = adapter._parameters["lora_a"], adapter._parameters["lora_b"]
        self.held[name] = [slot, adapter, a, b, _versions(adapter), adapter.scale]
        if self.cast is not None:  # the 16-bit copy follows, slot by slot
            self.cast[1][slot] = self.a[slot]
            self.cast[2][slot] = self.up[slot]

    def _clear(self, slot: int) -> None:
        self.a[slot] = 0
        self.up[slot] = 0
        if self.cast is not None:
            self.cast[1][slot] = 0
            self.cast[2][slot] = 0
        if slot in self.dora:
            self.factor[slot] = 0
            self.dora.discard(slot)

    def grow(self, width: int, rank: int) -> None:
        a = torch.zeros(width, self.rows_in, rank, dtype=self.dtype, device=self.device)
        up = torch.zeros(width, rank, self.out, dtype=self.dtype, device=self.device)
        a[:self.width, :, :self.rank] = self.a
        up[:self.width, :self.rank] = self.up
        self.a, self.up = a, up
        if self.factor is not None:
            self.factor = torch.cat([self.factor, self.factor.new_zeros(width - self.width, self.out)])
        self.width, self.rank, self.cast = width, rank, None


def _versions(adapter: nn.Module) -> tuple[int, ...]:
    """The versions of an adapter's tensors: any in-place change (a training step, a hot swap) bumps one."""
    return tuple(p._version for p in (adapter.lora_a, adapter.lora_b, adapter.magnitude) if p is not None)


def bank(layer: nn.Module, rows: Rows, dtype: torch.dtype, device: torch.device) -> Bank:
    """The layer's bank in `dtype` on `device`, level with the adapters the batch names (kept on the layer)."""
    current = layer.__dict__.get("_bank")
    if current is None or current.dtype != dtype or current.device != device:
        rank = max(a.lora_a.shape[0] for a in layer.adapters.values())
        current = layer.__dict__["_bank"] = Bank(layer, rows.slots.size, rank, dtype, device)
    stamp, checked = current.checked
    if rows.stamp is None or stamp != rows.stamp or tuple(rows.named) not in checked:
        current.sync(layer, rows)
        if rows.stamp is not None:
            current.checked = (rows.stamp, checked if stamp == rows.stamp else set())
            current.checked[1].add(tuple(rows.named))
    return current


def add_rows(layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """y, the base's output for x, plus each row's own adapter update: x (B, ..., in) → y (B, ..., out), or
    for an embedding's ids x (B, T) → y (B, T, dim). Rows whose adapter the layer lacks get nothing added."""
    g, rows = layer.geometry, layer.rows
    if x.shape[0] != len(rows):
        raise ValueError(f"mixed batch has {x.shape[0]} rows but {len(rows)} adapter names were given")
    adapters = layer.adapters._modules
    present = [n for n in rows.named if n in adapters]
    if not present:
        return y
    if g.kind == "conv2d":
        raise TypeError("mixed-adapter batches support Linear, Conv1D and Embedding layers, not Conv2d")
    if layer.merged:
        raise ValueError(f"adapters {layer.merged} are merged into the base weights; unmerge before a mixed batch")
    only = frozenset(present) if len(present) < len(rows.named) else None  # the batch names some it lacks
    b = bank(layer, rows, adapters[present[0]].lora_a.dtype, x.device)
    if b.dora and any(rows.slots.of[n] in b.dora for n in present):  # DoRA rows: W0 rescaled, y + (f − 1) ⊙ (y − bias)
        bias = getattr(layer.base, "bias", None)
        fm1 = b.factor[rows.index(x.device, only)].to(y.dtype)  # (B, out)
        y = y + (y if bias is None else y - bias) * fm1.view(len(rows), *[1] * (y.ndim - 2), -1)
    n = x.numel() if g.kind == "embedding" else x.numel() // g.in_features  # positions in the batch
    # On a CPU, thin matmuls over a few dozen positions (decoding) run faster in fp32 than in 16 bits.
    dtype = y.dtype if y.dtype in HALF and (n > SMALL or x.device.type != "cpu") else b.dtype
    a, up = b.weights(dtype)
    y2 = y.reshape(n, g.out_features)
    if rows.single is not None:  # one adapter for every row
        slot = rows.slots.of[rows.single]
        u = a[slot][x.reshape(-1)] if g.kind == "embedding" else x.reshape(n, g.in_features).to(dtype) @ a[slot]
        return _add(y2, u, up[slot]).view(y.shape)
    index = rows.index(x.device, only)
    if g.kind == "embedding":  # each position's own rows of A, then each row's B
        u = a[index[:, None], x]  # (B, T, R)
        return (y + torch.bmm(u, up[index]).to(y.dtype)).view(y.shape)
    width = min(b.width, rows.slots.size)  # the slots in use
    chosen, gather, back, m = rows.groups(width, x.device, only)
    a, up = (a[:width], up[:width]) if chosen is None else (a[chosen], up[chosen])
    xs = x.reshape(len(rows), -1, g.in_features).to(dtype)  # (B, T, in)
    xs = torch.cat([xs, xs.new_zeros(1, *xs.shape[1:])])[gather]  # (G·m, T, in): each group's rows, then padding
    u = torch.bmm(xs.view(a.shape[0], -1, g.in_features), a)  # (G, m·T, R)
    out = torch.bmm(u, up).view(len(gather), -1)[back]  # (B, T·out): each row's own
    if torch.is_grad_enabled():
        return y + out.to(y.dtype).view(y.shape)
    return y.add_(out.view(y.shape).to(y.dtype))


def _add(y: Tensor, u: Tensor, up: Tensor) -> Tensor:
    """y + u·up, in place when nothing records gradients (y is the base's fresh output)."""
    if torch.is_grad_enabled():
        return y + (u @ up).to(y.dtype)
    return y.addmm_(u, up) if u.dtype == y.dtype else y.add_(u @ up)


def saved_rows(module: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """A `modules_to_save` module under mixed rows: each row through its adapter's copy (or the original)."""
    rows = module.rows
    if x.shape[0] != len(rows):
        raise ValueError(f"mixed batch has {x.shape[0]} rows but {len(rows)} adapter names were given")
    y = module.original(x, *args, **kwargs)
    for name in {n for n in rows if n in module.adapters}:
        mask = torch.tensor([n == name for n in rows], device=x.device)
        y = torch.where(mask.view(-1, *[1] * (y.ndim - 1)), module.adapters[name](x, *args, **kwargs), y)
    return y

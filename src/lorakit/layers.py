"""LoRA layers: a frozen base layer plus low-rank adapters.

For a base weight W0 the adapted layer computes

    h = W0·x + s · B·A·dropout(x),   s = alpha / r   (alpha / sqrt(r) with rslora)

with A: (r, in) random and B: (out, r) zero, so a fresh adapter changes nothing. Only A and B
train. One `LoraLayer` wraps any supported base (Linear, Hugging Face Conv1D, Conv2d, Embedding)
by composition; what differs between them is captured by a `Geometry`. A bitsandbytes 4-bit
`Linear4bit` (QLoRA's NF4 base, see quant.py) is a Linear here too: it computes W0·x itself, and only
merging has to dequantize and re-quantize its weight.

A fused projection (GPT-2's `c_attn` computes q, k and v with one 768→2304 weight) can be adapted
on some output slices only: each slice gets its own rank-r pair (A_i, B_i). The A_i are stacked
into one (p·r, in) matrix so the input is read once; the B_i are scattered into an (out, p·r)
block matrix whose rows for untouched slices are zero, so ΔW = up · A holds exactly.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
import weakref
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quant import dequantize, is_quantized, requantize

Kind = Literal["linear", "conv1d", "conv2d", "embedding"]
Init = Literal["kaiming", "gaussian"]
Bias = Literal["none", "all", "lora_only"]
INITS: tuple[str, ...] = ("kaiming", "gaussian")
BIASES: tuple[str, ...] = ("none", "all", "lora_only")
SUPPORTED = "Linear, Conv1D (Hugging Face), Conv2d, Embedding"


@dataclass(frozen=True)
class LoraConfig:
    """Settings of one adapter.

    r: rank of the update. alpha: scale numerator (default r, so s = 1). dropout: probability on
    the adapter's input; LoRA Linears that read the same input in turn (q, k, v; gate, up) drop the
    same entries of it, one mask, as one A for all of them would. rslora: scale by alpha / sqrt(r)
    instead of alpha / r. init: A drawn Kaiming-uniform (a=√5, as nn.Linear) or Gaussian (std 1/r).
    bias: which biases train —
    "none", "all" of the model's, or "lora_only" (those of adapted layers).
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    init: Init = "kaiming"
    bias: Bias = "none"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if self.alpha is not None and not (_real(self.alpha) and 0 < self.alpha < math.inf):
            raise ValueError(f"alpha must be a finite number > 0 (or None for alpha = r), got {self.alpha!r}")
        if not (_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, bool):
            raise ValueError(f"rslora must be True or False, got {self.rslora!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES}, got {self.bias!r}")

    @property
    def scale(self) -> float:
        alpha = self.r if self.alpha is None else self.alpha
        return alpha / math.sqrt(self.r) if self.rslora else alpha / self.r


def check_name(name: object) -> None:
    """An adapter's name keys a ModuleDict: a non-empty string without dots."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a linear layer whose weight is stored (in, out).

    Recognised by name and layout so transformers need not be imported."""
    w = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(w, Tensor)
        and w.ndim == 2
        and getattr(module, "nf", None) == w.shape[1]
    )


def kind_of(module: nn.Module) -> Kind | None:
    """The LoRA kind of a module, or None when LoRA cannot adapt it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_hf_conv1d(module):
        return "conv1d"
    return None


@dataclass(frozen=True)
class Geometry:
    """What an adapter needs to know about its base layer.

    in_features: inputs (Conv2d: in_channels; Embedding: num_embeddings).
    out_features: outputs (Conv2d: out_channels; Embedding: embedding_dim).
    """

    kind: Kind
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    padding_idx: int | None = None

    @classmethod
    def of(cls, module: nn.Module) -> Geometry:
        kind = kind_of(module)
        if kind == "linear":
            return cls(kind, module.in_features, module.out_features)
        if kind == "conv1d":
            fan_in, fan_out = module.weight.shape
            return cls(kind, fan_in, fan_out)
        if kind == "embedding":
            return cls(kind, module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
        if kind == "conv2d":
            if module.groups != 1 or module.padding_mode != "zeros":
                raise TypeError(
                    f"LoRA on Conv2d needs groups=1 and padding_mode='zeros', got groups={module.groups}, "
                    f"padding_mode={module.padding_mode!r}"
                )
            return cls(kind, module.in_channels, module.out_channels, tuple(module.kernel_size),
                       tuple(module.stride), module.padding, tuple(module.dilation))
        raise TypeError(f"LoRA cannot adapt {type(module).__name__}; supported: {SUPPORTED}")

    @property
    def fan_in(self) -> int:
        """Columns of A: what one output of the base reads."""
        return self.in_features * math.prod(self.kernel_size)


Slices = tuple[tuple[int, int], ...]


def _keep_mask(x: Tensor, p: float) -> tuple[Tensor, float]:
    """A bool mask shaped like x, each entry False with probability p rounded to a multiple of 2⁻¹⁶,
    and that rounded p (the caller rescales by 1/(1-p) with it, so the update stays unbiased).

    Four entries come from one 64-bit random draw (its four 16-bit words, each compared with a
    threshold): several times faster on CPU than drawing a float per entry, which is what makes
    dropout on x nearly free next to the matmuls."""
    drop = round(p * 65536)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
    keep = words.view(torch.int16)[:x.numel()].view(x.shape) >= drop - 32768
    return keep, drop / 65536


_draws = threading.local()


def _shared_keep_mask(x: Tensor, rows: Tensor, p: float, user: nn.Module) -> tuple[Tensor, float]:
    """`_keep_mask` for `rows` (the layer input x as the matmul reads it), shared by the LoRA layers that read
    the same x one after another: q, k and v (gate and up) drop the same entries of their common input, one
    draw instead of three, as a single A for the three would. The last draw is remembered by weak reference
    to x (with its version counter, so an x changed in place draws again) and to the mask (alive while the
    autograd graph that saved it is); a layer that already used it (one called twice) draws anew."""
    last = getattr(_draws, "last", None)
    if last is not None:
        x_ref, version, asked, keep_ref, drawn, users = last
        keep = keep_ref()
        if (x_ref() is x and x._version == version and asked == p and keep is not None
                and keep.shape == rows.shape and id(user) not in users):
            users.add(id(user))
            return keep, drawn
    keep, drawn = _keep_mask(rows, p)
    _draws.last = (weakref.ref(x), x._version, p, weakref.ref(keep), drawn, {id(user)})
    return keep, drawn


class FastDropout(nn.Dropout):
    """nn.Dropout whose mask comes from `_keep_mask` on CPU: the same Bernoulli keep with the 1/(1-p)
    scale, p rounded to a multiple of 2⁻¹⁶, several times faster to draw than `bernoulli_`; backward
    keeps a 1-byte mask. On other devices it is nn.Dropout (their fused kernel is already fast)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep, p = _keep_mask(x, self.p)
        return (x * keep).mul_(1.0 / (1.0 - p))


def fast_dropout(model: nn.Module) -> int:
    """Replace every plain nn.Dropout of `model` by a `FastDropout` of the same p, in place, leaving the
    LoRA adapters' own dropout alone; returns how many were replaced. Training on CPU spends a sizeable
    share of each step drawing the base model's dropout masks (BERT's hidden dropout): this draws them
    several times faster, with the same distribution."""
    adapters = {id(m.dropout) for m in model.modules() if isinstance(m, LoraAdapter)}
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Dropout and id(child) not in adapters]
    for parent, name, child in swaps:
        setattr(parent, name, FastDropout(child.p, child.inplace))
    return len(swaps)


class _LoraLinear(torch.autograd.Function):
    """out = y + s · (dropout(x) · Aᵀ) · upᵀ for a linear base, as one autograd node.

    x: (N, in), y: (N, out) the base's output, both in the compute dtype; a: (p·r, in) and up: (out, p·r)
    the adapter's own weights, cast inside the node (no separate autograd step) and given their gradients
    back in their own dtype. keep: the dropout mask (None without dropout) and p the probability it was drawn
    with (`_shared_keep_mask`). Saves x itself (shared with every sibling projection that reads the same x),
    the bool mask (1 byte an element, not a dropped copy of x; shared by the siblings too) and
    u = dropout(x)·Aᵀ (p·r values a row); the scale rides in the matmuls.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, a: Tensor, up: Tensor, scale: float, keep: Tensor | None,
                p: float) -> Tensor:
        ctx.dtypes = a.dtype, up.dtype
        a, up = a.to(x.dtype), up.to(x.dtype)  # 16-bit copies for a 16-bit x; their gradients go back in fp32
        u = (x if keep is None else x * keep) @ a.t()  # (N, p·r)
        if keep is not None:
            u.mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(x, keep, u, a, up)
        ctx.scale, ctx.p = scale, p
        return torch.addmm(y, u, up.t(), alpha=scale)  # (N, out)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, keep, u, a, up = ctx.saved_tensors
        need_x, _, need_a, need_up = ctx.needs_input_grad[:4]
        inv = 1.0 if keep is None else 1.0 / (1.0 - ctx.p)
        gu = torch.mm(g, up).mul_(ctx.scale * inv)  # (N, p·r): ∂L/∂u, with dropout's 1/(1-p) folded in
        grad_x = grad_a = grad_up = None
        if need_x:
            grad_x = gu @ a  # (N, in)
            if keep is not None:
                grad_x.mul_(keep)
        if need_a:
            grad_a = (gu.t() @ (x if keep is None else x * keep)).to(ctx.dtypes[0])  # (p·r, in)
        if need_up:
            grad_up = torch.mm(g.t(), u).mul_(ctx.scale).to(ctx.dtypes[1])  # (out, p·r)
        return grad_x, g, grad_a, grad_up, None, None, None


def _plain_update(x: Tensor, y: Tensor, a: Tensor, up: Tensor, scale: float, p: float) -> Tensor:
    """What `_LoraLinear` computes, as plain autograd ops in x's dtype: y + s · (dropout(x) · Aᵀ) · upᵀ."""
    xd = F.dropout(x, p, training=True) if p > 0 else x
    return torch.addmm(y, xd @ a.to(x.dtype).t(), up.to(x.dtype).t(), alpha=scale)


class LoraAdapter(nn.Module):
    """The trainable part of one adapter on one layer.

    lora_a: (p·r, fan_in) — Conv2d: (r, in, kh, kw); Embedding: (r, num_embeddings).
    lora_b: (Σ slice sizes, r) — the B_i of the p adapted output slices, stacked by rows.
    slices: the adapted output ranges [start, stop), or None for every output (p = 1).
    """

    def __init__(self, geometry: Geometry, config: LoraConfig, slices: Slices | None = None,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if slices is not None and geometry.kind not in ("linear", "conv1d"):
            raise TypeError(f"output slices need a Linear or Conv1D base, got {geometry.kind}")
        if slices is not None:
            bounds = [0] + [v for s in slices for v in s] + [geometry.out_features]
            if not slices or any(len(s) != 2 for s in slices) or bounds != sorted(bounds) \
                    or any(start >= stop for start, stop in slices):
                raise ValueError(f"output slices must be sorted, non-overlapping [start, stop) ranges within "
                                 f"0..{geometry.out_features}, got {slices!r}")
        sizes = [geometry.out_features] if slices is None else [stop - start for start, stop in slices]
        limit = min(geometry.fan_in, min(sizes))
        if config.r > limit:
            raise ValueError(
                f"r={config.r} exceeds min(in, out)={limit} of this {geometry.kind} layer "
                f"(in={geometry.fan_in}, out={min(sizes)})"
            )
        self.geometry, self.config, self.slices = geometry, config, slices
        self.scale = config.scale
        r, p = config.r, len(sizes)
        a_shape = (r, geometry.in_features, *geometry.kernel_size) if geometry.kind == "conv2d" else (p * r, geometry.fan_in)
        self.lora_a = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(sum(sizes), r, device=device, dtype=dtype))
        # Dropout on token ids means nothing; embeddings never take it.
        use_dropout = config.dropout > 0 and geometry.kind != "embedding"
        self.dropout = nn.Dropout(config.dropout) if use_dropout else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.geometry.kind == "embedding":
                # A one-hot input gives Kaiming's fan-in scaling nothing to balance: follow the
                # original LoRA code, A = 0 and B ~ N(0, 1), so the update still starts at zero.
                self.lora_a.zero_()
                self.lora_b.normal_()
            elif self.config.init == "gaussian":
                self.lora_a.normal_(std=1.0 / self.config.r)
                self.lora_b.zero_()
            else:
                for a in self.lora_a.view(-1, self.config.r, *self.lora_a.shape[1:]):
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.lora_b.zero_()

    def up(self) -> Tensor:
        """B as an (out, p·r) matrix: block i holds B_i at slice i's rows, zero elsewhere."""
        if self.slices is None:
            return self.lora_b
        r, out = self.config.r, self.geometry.out_features
        up = self.lora_b.new_zeros(out, len(self.slices) * r)
        row = 0
        for i, (start, stop) in enumerate(self.slices):
            up[start:stop, i * r:(i + 1) * r] = self.lora_b[row:row + stop - start]
            row += stop - start
        return up

    def forward(self, x: Tensor) -> Tensor:
        """s · B·A·dropout(x) for the base's input x; the result has the base output's shape."""
        g = self.geometry
        if g.kind == "embedding":
            u = F.embedding(x, self.lora_a.T, padding_idx=g.padding_idx)  # (..., r)
            return F.linear(u, self.up()) * self.scale  # (..., dim)
        x = self.dropout(x.to(self.lora_a.dtype))
        if g.kind == "conv2d":
            u = F.conv2d(x, self.lora_a, None, g.stride, g.padding, g.dilation)  # (N, r, H', W')
            return F.conv2d(u, self.up()[:, :, None, None]) * self.scale  # (N, out, H', W')
        u = F.linear(x, self.lora_a)  # (..., p·r)
        return F.linear(u, self.up()) * self.scale  # (..., out)

    def add_to(self, x: Tensor, y: Tensor) -> Tensor:
        """y + s · B·A·dropout(x): the base's output y with this adapter's update added.

        Linear and Conv1D bases: on CPU, one fused autograd node (`_LoraLinear`), which saves x and a
        bool mask rather than a dropped copy of x; on a GPU, where steps of this size are bound by the
        host's launch overhead rather than by the matmuls, the same update as plain autograd ops
        (`_plain_update`: fewer Python steps per layer). Without autograd the update is added into y in
        place. The matmuls run in y's dtype when it is 16-bit (a bf16 base or autocast) and in the
        adapter's dtype otherwise."""
        g = self.geometry
        if g.kind not in ("linear", "conv1d"):
            return y + self(x).to(y.dtype)
        dtype = y.dtype if y.dtype in (torch.bfloat16, torch.float16) else self.lora_a.dtype
        x2 = x.reshape(-1, g.in_features).to(dtype)  # (N, in)
        y2 = y.reshape(-1, g.out_features).to(dtype)  # (N, out)
        p = self.config.dropout if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        device = x.device.type
        if torch.is_grad_enabled() and device != "cpu":
            out = _plain_update(x2, y2, self.lora_a, self.up(), self.scale, p)
        else:
            # The dtypes are chosen above; autocast (entered only when on: entering costs time) would recast.
            with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
                if torch.is_grad_enabled():
                    keep, p = _shared_keep_mask(x, x2, p, self) if p > 0 else (None, 0.0)
                    out = _LoraLinear.apply(x2, y2, self.lora_a, self.up(), self.scale, keep, p)
                else:
                    x2 = self.dropout(x2)
                    out = y2.addmm_(x2 @ self.lora_a.to(dtype).t(), self.up().to(dtype).t(), alpha=self.scale)
        return out.to(y.dtype).view(y.shape)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """s · ΔW in fp32 and in the base weight's own layout."""
        g = self.geometry
        up, a = self.up().float(), self.lora_a.float()
        if g.kind == "conv2d":
            dw = (up @ a.flatten(1)).view(g.out_features, g.in_features, *g.kernel_size)
        else:
            dw = up @ a  # (out, in)
            if g.kind in ("conv1d", "embedding"):
                dw = dw.T  # stored (in, out) and (num_embeddings, dim)
        return dw * self.scale

    def extra_repr(self) -> str:
        c = self.config
        return f"r={c.r}, alpha={c.r if c.alpha is None else c.alpha}, scale={self.scale:g}, slices={self.slices}"


def weight_digest(weight: Tensor) -> str:
    """A hash of a frozen weight: its shape and up to 65,536 evenly strided values in fp32.

    Enough to tell one pretrained base from another without reading every byte of a large model."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // 65536)
    sample = flat[::step][:65536].to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(weight.shape)).encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()


class LoraLayer(nn.Module):
    """A frozen base layer and its named adapters; the active one adds its update to the output.

    merged: names of adapters folded into the base weight, which then no longer add anything.
    disabled: when True the layer is exactly its base (unless adapters are merged).
    rows: per-row adapter names for a mixed batch (see `lorakit.mixed_batch`), else None.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.geometry = Geometry.of(base)
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: list[str] = []
        self.disabled = False
        self.rows: list[str | None] | None = None
        self._digest: str | None = None
        self._banked: tuple[tuple, Tensor, Tensor] | None = None
        self.train(base.training)

    def add(self, name: str, config: LoraConfig, slices: Slices | None = None) -> LoraAdapter:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        w = self.base.weight
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        device = None if w.device.type == "meta" else w.device
        self.adapters[name] = adapter = LoraAdapter(self.geometry, config, slices, device, dtype)
        adapter.train(self.training)
        if self.active is None:
            self.active = name
        return adapter

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base(x, *args, **kwargs)
        if self.disabled:
            return y
        if self.rows is not None:
            return y + self._per_row(x).to(y.dtype)
        if self.active is None or self.active in self.merged:
            return y
        adapter = self.adapters[self.active]
        if self.training and torch.is_grad_enabled() and not adapter.lora_a.requires_grad:
            warnings.warn(f"training with LoRA adapter {self.active!r} frozen, so it will not learn; "
                          f"load it with trainable=True (or call lorakit.freeze) to train it", stacklevel=2)
        return adapter.add_to(x, y)

    def _per_row(self, x: Tensor) -> Tensor:
        """Row i of the batch gets adapter rows[i] (None: no update), as two gathered bmm's.

        Every adapter's A and s·up are zero-padded to the largest rank R and stacked into a bank
        with one extra all-zero entry for rows without an adapter; padding with zeros is exact.
        Dropout is not applied: mixed batches serve inference."""
        g, rows = self.geometry, self.rows
        if g.kind == "conv2d":
            raise TypeError("mixed-adapter batches support Linear, Conv1D and Embedding layers, not Conv2d")
        if self.merged:
            raise ValueError(f"adapters {self.merged} are merged into the base weights; unmerge before a mixed batch")
        if x.shape[0] != len(rows):
            raise ValueError(f"mixed batch has {x.shape[0]} rows but {len(rows)} adapter names were given")
        names = list(self.adapters)
        index = torch.tensor([names.index(n) if n in self.adapters else len(names) for n in rows], device=x.device)
        ref = next(iter(self.adapters.values())).lora_a
        a_bank, up_bank = self._bank()
        up = up_bank[index]  # (B, out, R)
        if g.kind == "embedding":
            u = a_bank.transpose(1, 2)[index[:, None], x]  # (B, T, R)
            return torch.bmm(u, up.transpose(1, 2))  # (B, T, dim)
        xb = x.to(ref.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (B, L, in)
        u = torch.bmm(xb, a_bank[index].transpose(1, 2))  # (B, L, R)
        return torch.bmm(u, up.transpose(1, 2)).reshape(*x.shape[:-1], g.out_features)  # (B, ..., out)

    def _bank(self) -> tuple[Tensor, Tensor]:
        """A: (n+1, R, in) and s·up: (n+1, out, R) of every adapter, zero-padded to the largest rank R.

        Without autograd the bank is kept and rebuilt only when an adapter's weights change (their
        version counters), so serving mixed batches does not restack it on every call."""
        key = tuple((id(a), p.data_ptr(), p._version) for a in self.adapters.values() for p in (a.lora_a, a.lora_b))
        if self._banked is not None and self._banked[0] == key and not torch.is_grad_enabled():
            return self._banked[1], self._banked[2]
        adapters = list(self.adapters.values())
        rank, ref = max(a.lora_a.shape[0] for a in adapters), adapters[0].lora_a
        a_bank = ref.new_zeros(len(adapters) + 1, rank, ref.shape[1])  # (n+1, R, in)
        up_bank = ref.new_zeros(len(adapters) + 1, self.geometry.out_features, rank)  # (n+1, out, R)
        for i, a in enumerate(adapters):
            a_bank[i, :a.lora_a.shape[0]] = a.lora_a
            up_bank[i, :, :a.lora_a.shape[0]] = a.up() * a.scale
        self._banked = (key, a_bank, up_bank) if not torch.is_grad_enabled() else None
        return a_bank, up_bank

    def base_digest(self) -> str:
        """`weight_digest` of W0 (a 4-bit base: of its dequantized weight), remembered before the
        first merge changes the weight."""
        if self._digest is None:
            assert not self.merged, "digest must be taken before merging"
            self._digest = weight_digest(dequantize(self.base) if is_quantized(self.base) else self.base.weight)
        return self._digest

    @torch.no_grad()
    def merge(self, name: str) -> float | None:
        """W0 += s·ΔW, computed in fp32 and cast back. A merged adapter is not merged again.

        A 4-bit base is dequantized, W0 + s·ΔW formed in fp32 and quantized again; the return value
        is the max abs weight error that re-quantization added (None for a float base)."""
        if name in self.merged:
            return None
        self.base_digest()
        delta = self.adapters[name].delta_weight()
        self.merged.append(name)
        if is_quantized(self.base):
            return requantize(self.base, dequantize(self.base) + delta.to(self.base.weight.device))
        self._add_to_weight(delta)
        return None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter back out of W0, last merged first.

        Refused on a 4-bit base: the merge re-quantized W0 + s·ΔW, so subtracting s·ΔW would not
        give W0 back."""
        if self.merged and is_quantized(self.base):
            raise ValueError(f"cannot unmerge {self.merged} from a 4-bit base: merging re-quantized W0 + s·ΔW, "
                             f"so W0 cannot be recovered; reload the base (or merge into a float copy with "
                             f"merge_and_unload(model, dtype=torch.float32))")
        while self.merged:
            self._add_to_weight(-self.adapters[self.merged.pop()].delta_weight())

    def _add_to_weight(self, delta: Tensor) -> None:
        w = self.base.weight
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))

    def extra_repr(self) -> str:
        return f"kind={self.geometry.kind}, active={self.active!r}, merged={self.merged}"


class SavedModule(nn.Module):
    """A module that trains in full for an adapter (`modules_to_save`, e.g. a new classifier head).

    The original stays frozen and in place for the base model and other adapters; `adapters` holds
    each adapter's own copy, used while that adapter is active."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.rows: list[str | None] | None = None
        self.train(original.training)

    def add(self, name: str) -> nn.Module:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        self.adapters[name] = copy = deepcopy(self.original)
        if self.active is None:
            self.active = name
        return copy

    def current(self) -> nn.Module:
        if self.disabled or self.active not in self.adapters:
            return self.original
        return self.adapters[self.active]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.rows is None or self.disabled:
            return self.current()(x, *args, **kwargs)
        if x.shape[0] != len(self.rows):
            raise ValueError(f"mixed batch has {x.shape[0]} rows but {len(self.rows)} adapter names were given")
        y = self.original(x, *args, **kwargs)
        for name in {n for n in self.rows if n in self.adapters}:
            mask = torch.tensor([n == name for n in self.rows], device=x.device)
            y = torch.where(mask.view(-1, *[1] * (y.ndim - 1)), self.adapters[name](x, *args, **kwargs), y)
        return y

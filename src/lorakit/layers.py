"""LoRA layers: a frozen base layer plus low-rank adapters.

For a base weight W0 the adapted layer computes

    h = W0·x + s · B·A·dropout(x),   s = alpha / r   (alpha / sqrt(r) with rslora)

with A: (r, in) random and B: (out, r) zero, so a fresh adapter changes nothing. Only A and B
train. One `LoraLayer` wraps any supported base (Linear, Hugging Face Conv1D, Conv2d, Embedding)
by composition; what differs between them is captured by a `Geometry`. A bitsandbytes 4-bit
`Linear4bit` (QLoRA's NF4 base, see quant.py) is a Linear here too: it computes W0·x itself, and only
merging has to dequantize and re-quantize its weight.

This file is the idea; how fast it runs lives beside it (fused.py: kernels; mixed.py: an adapter per row).

With DoRA (Liu et al. 2024, arXiv 2402.09353) an adapter also holds a magnitude m, one per output, and the
layer computes W'·x with W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖, the norm taken over each output's row (dora.py).

A fused projection (GPT-2's `c_attn` computes q, k and v with one 768→2304 weight) can be adapted
on some output slices only: each slice gets its own rank-r pair (A_i, B_i). The A_i are stacked
into one (p·r, in) matrix so the input is read once; the B_i are scattered into an (out, p·r)
block matrix whose rows for untouched slices are zero, so ΔW = up · A holds exactly.
"""

from __future__ import annotations

import math
import warnings
from copy import deepcopy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dora, fused, mixed, residual
from .quant import dequantize, is_quantized, requantize

Kind = Literal["linear", "conv1d", "conv2d", "embedding"]
Init = Literal["kaiming", "gaussian", "pissa", "olora"] | str  # str: "pissa_niter_K"
Bias = Literal["none", "all", "lora_only"]
INITS: tuple[str, ...] = ("kaiming", "gaussian", *residual.INITS)  # and "pissa_niter_K"
BIASES: tuple[str, ...] = ("none", "all", "lora_only")
SUPPORTED = "Linear, Conv1D (Hugging Face), Conv2d, Embedding"


@dataclass(frozen=True)
class LoraConfig:
    """Settings of one adapter.

    r: rank of the update. alpha: scale numerator (default r, so s = 1). dropout: probability on the adapter's
    input; LoRA Linears that read the same input in turn (q, k, v; gate, up) drop the same entries of it, one mask,
    as one A for all of them would. rslora: scale by alpha / sqrt(r) instead of alpha / r. init: A drawn
    Kaiming-uniform (a=√5, as nn.Linear) or Gaussian (std 1/r), or A and B from W0's SVD ("pissa",
    "pissa_niter_K") or QR ("olora"), W0 then holding the rest (residual.py). train_a: False freezes A; B trains
    alone (LoRA-FA).
    bias: which biases train —
    "none", "all" of the model's, or "lora_only" (those of adapted layers).
    dora: decompose the adapted weight into a trained magnitude per output and a direction (DoRA).
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    init: Init = "kaiming"
    train_a: bool = True
    bias: Bias = "none"
    dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if self.alpha is not None and not (_real(self.alpha) and 0 < self.alpha < math.inf):
            raise ValueError(f"alpha must be a finite number > 0 (or None for alpha = r), got {self.alpha!r}")
        if not (_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for flag in ("rslora", "train_a", "dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.init not in INITS and not residual.is_residual(self.init):
            raise ValueError(f"init must be one of {INITS} or 'pissa_niter_K' (K >= 1), got {self.init!r}")
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES}, got {self.bias!r}")

    @property
    def scale(self) -> float:
        alpha = self.r if self.alpha is None else self.alpha
        return alpha / math.sqrt(self.r) if self.rslora else alpha / self.r


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


def base_of(module: nn.Module) -> nn.Module:
    """The frozen layer itself: a LoRA layer's base, or the module when it is not a LoRA layer."""
    return module.base if isinstance(module, LoraLayer) else module


class LoraAdapter(nn.Module):
    """The trainable part of one adapter on one layer.

    lora_a: (p·r, fan_in) — Conv2d: (r, in, kh, kw); Embedding: (r, num_embeddings).
    lora_b: (Σ slice sizes, r) — the B_i of the p adapted output slices, stacked by rows.
    slices: the adapted output ranges [start, stop), or None for every output (p = 1).
    magnitude: (out,) DoRA's m, or None; `LoraLayer.add` sets it to ‖W0‖ (it alone sees W0).
    """

    def __init__(self, geometry: Geometry, config: LoraConfig, slices: Slices | None = None,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        a_shape, b_shape = self.shapes(geometry, config, slices)
        self.geometry, self.config, self.slices = geometry, config, slices
        self.scale = config.scale
        self.lora_a = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
        self.magnitude = (nn.Parameter(torch.ones(geometry.out_features, device=device, dtype=dtype))
                          if config.dora else None)
        if self.lora_a.device.type != "meta":  # meta tensors hold no values to initialise
            self.reset_parameters()

    @staticmethod
    def shapes(geometry: Geometry, config: LoraConfig, slices: Slices | None = None) -> tuple[tuple, tuple]:
        """A's and B's shapes on this base; TypeError or ValueError where such an adapter cannot be."""
        if slices is not None and geometry.kind not in ("linear", "conv1d"):
            raise TypeError(f"output slices need a Linear or Conv1D base, got {geometry.kind}")
        if slices is not None and config.dora:
            raise TypeError("DoRA adapts whole layers: its magnitude rescales every output of the layer, so it "
                            "cannot keep to output slices; target the whole projection (PEFT has no slices either)")
        assert slices is None or all(0 <= a < b <= geometry.out_features for a, b in slices), slices
        sizes = [geometry.out_features] if slices is None else [stop - start for start, stop in slices]
        if config.r > (limit := min(geometry.fan_in, min(sizes))):
            raise ValueError(f"r={config.r} exceeds min(in, out)={limit} of this {geometry.kind} layer "
                             f"(in={geometry.fan_in}, out={min(sizes)})")
        r, g = config.r, geometry
        return ((r, g.in_features, *g.kernel_size) if g.kind == "conv2d" else (len(sizes) * r, g.fan_in)), (sum(sizes), r)

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

    def forward(self, x: Tensor, dropout: bool = True) -> Tensor:
        """s · B·A·dropout(x) for the base's input x (x as it is with dropout=False); the result has the
        base output's shape. (Embeddings take no dropout: it means nothing on token ids.)"""
        g = self.geometry
        if g.kind == "embedding":
            u = F.embedding(x, self.lora_a.T, padding_idx=g.padding_idx)  # (..., r)
            return F.linear(u, self.up()) * self.scale  # (..., dim)
        x = x.to(self.lora_a.dtype)
        if dropout and self.training and self.config.dropout > 0:
            x = F.dropout(x, self.config.dropout, training=True)
        if g.kind == "conv2d":
            u = F.conv2d(x, self.lora_a, None, g.stride, g.padding, g.dilation)  # (N, r, H', W')
            return F.conv2d(u, self.up()[:, :, None, None]) * self.scale  # (N, out, H', W')
        u = F.linear(x, self.lora_a)  # (..., p·r)
        return F.linear(u, self.up()) * self.scale  # (..., out)

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
        return (f"r={c.r}, alpha={c.r if c.alpha is None else c.alpha}, scale={self.scale:g}, slices={self.slices}"
                + (", dora" if c.dora else ""))


def adapter_home(base: nn.Module) -> tuple[torch.device | None, torch.dtype]:
    """Where a base layer's adapters live: its device (None for a meta base), in fp32 (fp64 beside fp64)."""
    device = base.weight.device
    return (None if device.type == "meta" else device), torch.promote_types(base.weight.dtype, torch.float32)


class LoraLayer(nn.Module):
    """A frozen base layer and its named adapters; the active one adds its update to the output.

    merged: names of adapters folded into the base weight, which then no longer add anything.
    disabled: when True the layer is exactly its base (unless adapters are merged).
    rows: per-row adapter names for a mixed batch (see `lorakit.mixed_batch`), else None.
    base_sha: the digest of W0 that adapter files name as their base (`lorakit.files.base_digest`), taken
    before W0 first changes (a merge, a cast), else None.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.geometry = Geometry.of(base)
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: list[str] = []
        self.disabled = False
        self.rows: mixed.Rows | None = None
        self.base_sha: str | None = None
        self.factors: dict[str, Tensor] = {}  # merged DoRA adapter → its f = m / ‖W0 + s·ΔW‖, to unmerge with
        self.train(base.training)

    def add(self, name: str, config: LoraConfig, slices: Slices | None = None,
            adapter: LoraAdapter | None = None) -> LoraAdapter:
        """Add adapter `name`: a new one, or `adapter` as built elsewhere (`lorakit.files.prepare_adapter`)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if adapter is None:
            adapter = LoraAdapter(self.geometry, config, slices, *adapter_home(self.base))
            residual.init(self, adapter)  # PiSSA, OLoRA: A and B from W0, which keeps the rest
            dora.init_magnitude(self, adapter)  # DoRA: m = ‖W0‖
        elif adapter.geometry != self.geometry:
            raise ValueError(f"adapter {name!r} was built for a {adapter.geometry}, this layer is a {self.geometry}")
        self.adapters[name] = adapter
        adapter.train(self.training)
        if self.active is None:
            self.active = name
        return adapter

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """W0·x, plus s·B·A·dropout(x) of the active adapter (of each row's, in a mixed batch)."""
        y = self.base(x, *args, **kwargs)
        if self.disabled:
            return y
        if self.rows is not None:
            return mixed.add_rows(self, x, y)
        if self.active is None or self.active in self.merged:
            return y
        adapter = self.adapters[self.active]
        if self.training and torch.is_grad_enabled() and not adapter.lora_b.requires_grad:
            warnings.warn(f"training with LoRA adapter {self.active!r} frozen, so it will not learn; "
                          f"load it with trainable=True (or call lorakit.freeze) to train it", stacklevel=2)
        if adapter.magnitude is not None:
            return dora.add_update(self, adapter, x, y, lambda xd: self.base(xd, *args, **kwargs))
        return fused.add_update(adapter, x, y)

    @torch.no_grad()
    def merge(self, name: str) -> float | None:
        """W0 ← W0 + s·ΔW (DoRA: f ⊙ (W0 + s·ΔW)), computed in fp32 and cast back. A merged adapter is not
        merged again.

        A 4-bit base is dequantized, the new weight formed in fp32 and quantized again; the return value
        is the max abs weight error that re-quantization added (None for a float base)."""
        if name in self.merged:
            return None
        adapter = self.adapters[name]
        w = (dequantize(self.base) if is_quantized(self.base) else self.base.weight).float()
        new = w + adapter.delta_weight().to(w.device)
        if adapter.magnitude is not None:  # DoRA: f ⊙ (W0 + s·ΔW), f kept to unmerge with
            new.mul_(dora.merge_factor(self, name))
        self.merged.append(name)
        if is_quantized(self.base):
            return requantize(self.base, new)
        self.base.weight.copy_(new)
        return None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter back out of W0, last merged first.

        Refused on a 4-bit base: the merge re-quantized the new weight, so W0 cannot be recovered from it."""
        if self.merged and is_quantized(self.base):
            raise ValueError(f"cannot unmerge {self.merged} from a 4-bit base: merging re-quantized W0 + s·ΔW, "
                             f"so W0 cannot be recovered; reload the base (or merge into a float copy with "
                             f"merge_and_unload(model, dtype=torch.float32))")
        while self.merged:
            name = self.merged.pop()
            w = self.base.weight.float() / self.factors.pop(name, 1.0)  # a DoRA merge's f, else 1
            self.base.weight.copy_(w - self.adapters[name].delta_weight())

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
        self.rows: mixed.Rows | None = None
        self.train(original.training)

    def add(self, name: str, copy: nn.Module | None = None) -> nn.Module:
        """Give adapter `name` its copy of the original: a fresh one, or `copy` as made elsewhere."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        self.adapters[name] = copy = deepcopy(self.original) if copy is None else copy
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
        return mixed.saved_rows(self, x, *args, **kwargs)

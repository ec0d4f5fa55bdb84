"""QLoRA's frozen base (Dettmers et al. 2023): a model's nn.Linear layers swapped for NF4 ones.

The NF4 format and the conversion of one layer are quant.py's; this is the surgery on a model — which
layers, checked before any changes — and the table of what each format stores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .files import base_digest
from .inject import replace_module
from .layers import LoraLayer
from .quant import BLOCK_SIZES, COMPUTE_DTYPES, dequantized_copy, is_quantized, load_bitsandbytes, nf4_bytes, to_nf4
from .targets import output_head, resolve_targets


@dataclass(frozen=True)
class QuantReport:
    """What `quantize_base` converted and the bytes the converted weights take before and after."""

    names: list[str]
    block_size: int
    double_quant: bool
    compute_dtype: torch.dtype
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        dq = " + double quant" if self.double_quant else ""
        return (f"lorakit: quantized {len(self.names)} Linear layers to NF4{dq} (blocks of {self.block_size}, "
                f"compute in {str(self.compute_dtype).removeprefix('torch.')}): weights "
                f"{self.bytes_before / 2**20:,.1f} MiB → {self.bytes_after / 2**20:,.1f} MiB "
                f"({self.bytes_after / max(self.bytes_before, 1):.3f}×)")


def quantize_base(
    model: nn.Module,
    targets="all-linear",
    *,
    exclude: Iterable[str] = (),
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    block_size: int = 64,
) -> QuantReport:
    """Replace the target nn.Linear layers of `model` by frozen NF4 `bitsandbytes.nn.Linear4bit`, in place.

    targets: as `lorakit.inject` takes them; "all-linear" is every nn.Linear except the output head.
    exclude: module names left in float (modules that train in full, such as a new classifier).
    The output head and embeddings are never quantized. compute_dtype: the dtype the weight is
    dequantized to for each matmul. Everything is checked before the model changes: a layer that is
    already quantized, wrapped by LoRA (quantize before `inject`), not an nn.Linear, the output head,
    or one whose in_features is not a multiple of block_size raises, naming it."""
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(map(str, COMPUTE_DTYPES))}, got {compute_dtype!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    excluded = set(exclude)
    chosen = {n: m for n, (m, _) in resolve_targets(model, targets, exclude=excluded).items() if n not in excluded}
    head = output_head(model)
    for name, module in chosen.items():
        if isinstance(module, LoraLayer):
            raise ValueError(f"module {name!r} is already a LoRA layer; quantize the base before lorakit.inject")
        if is_quantized(module):
            raise ValueError(f"module {name!r} is already quantized ({type(module).__name__}, "
                             f"{module.weight.quant_state.quant_type}); quantize a float model")
        if type(module) is not nn.Linear:
            raise TypeError(f"NF4 quantization converts nn.Linear layers; {name!r} is {type(module).__name__}")
        if module is head:
            raise ValueError(f"module {name!r} is the output head, which stays in float; leave it out of targets")
        if module.in_features % block_size:
            # bitsandbytes 0.50's CPU kernel decodes such a layer wrongly (its blocks cross rows).
            raise ValueError(f"module {name!r} has in_features={module.in_features}, not a multiple of "
                             f"block_size={block_size}, which bitsandbytes' 4-bit CPU kernel does not decode "
                             f"correctly; leave it out of targets or pick a block_size that divides it")
        if not module.weight.is_floating_point():
            raise TypeError(f"module {name!r} has a {module.weight.dtype} weight; NF4 quantizes float weights")
    load_bitsandbytes()
    before = after = 0
    for name, module in chosen.items():
        q = to_nf4(module, double_quant=double_quant, compute_dtype=compute_dtype, block_size=block_size)
        before += module.weight.numel() * module.weight.element_size()
        after += nf4_bytes(q)
        replace_module(model, name, q)
    return QuantReport(list(chosen), block_size, double_quant, compute_dtype, before, after)


@dataclass(frozen=True)
class StorageTable:
    """Bytes of a model's linear weights in fp32, NF4 and NF4 with double quantization."""

    layers: int
    weights: int
    fp32: int
    nf4: int
    nf4_dq: int
    block_size: int

    def ratio(self, which: str) -> float:
        return getattr(self, which) / self.fp32

    def rows(self) -> list[tuple[str, int, float, float]]:
        """(format, bytes, bytes per weight, × fp32) per format."""
        return [(label, b, b / self.weights, b / self.fp32)
                for label, b in (("fp32", self.fp32), ("NF4", self.nf4), ("NF4 + double quant", self.nf4_dq))]

    def __str__(self) -> str:
        lines = [f"{self.layers} linear layers, {self.weights:,} weights, NF4 blocks of {self.block_size}",
                 f"  {'format':<20} {'MiB':>9} {'bytes/weight':>13} {'× fp32':>8}"]
        lines += [f"  {label:<20} {b / 2**20:>9.2f} {per:>13.4f} {ratio:>8.4f}" for label, b, per, ratio in self.rows()]
        return "\n".join(lines)


@torch.no_grad()
def storage_table(model: nn.Module, targets="all-linear", block_size: int = 64) -> StorageTable:
    """Quantize each target Linear weight both ways (one at a time, the model is not changed) and
    count the bytes bitsandbytes actually stores."""
    bnb = load_bitsandbytes()
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    chosen = [m for m, _ in resolve_targets(model, targets).values() if type(m) is nn.Linear]
    if not chosen:
        raise ValueError(f"no float nn.Linear layer in {type(model).__name__} matches {targets!r}")
    fp32 = nf4 = nf4_dq = weights = 0
    for m in chosen:
        w = m.weight.detach().float().contiguous()
        weights += w.numel()
        fp32 += w.numel() * 4
        for nested in (False, True):
            packed, qs = bnb.functional.quantize_4bit(w, blocksize=block_size, compress_statistics=nested,
                                                      quant_type="nf4")
            tensors = [packed, qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if nested else [])
            size = sum(t.numel() * t.element_size() for t in tensors)
            if nested:
                nf4_dq += size
            else:
                nf4 += size
    return StorageTable(len(chosen), weights, fp32, nf4, nf4_dq, block_size)


def dequantize_all(model: nn.Module) -> list[nn.Linear]:
    """Replace every 4-bit layer (LoRA bases included) by an fp32 nn.Linear holding its dequantized
    weight; a LoRA layer with adapters already merged into its 4-bit weight is refused."""
    found = [(n, m) for n, m in model.named_modules() if is_quantized(m)]
    holders = {n: model.get_submodule(n.rpartition(".")[0]) for n, _ in found}
    for name, holder in holders.items():
        if isinstance(holder, LoraLayer) and holder.merged:
            raise ValueError(f"{name.rpartition('.')[0]!r} already has {holder.merged} merged into its 4-bit weight")
    out = []
    for name, module in found:
        if isinstance(holders[name], LoraLayer):
            base_digest(holders[name])
        out.append(linear := dequantized_copy(module))
        replace_module(model, name, linear)
    return out

"""QLoRA's frozen base (Dettmers et al. 2023): nn.Linear weights stored in 4-bit NormalFloat.

NF4 cuts the flattened weight into blocks of `block_size` values. Each block keeps one scale, its
absmax m = max|w|, and each value a 4-bit index k into 16 code values q_0 < ... < q_15 in [-1, 1]
(quantiles of N(0, 1), scaled so that q_0 = -1, q_7 = 0, q_15 = 1):

    k = argmin_j |w/m - q_j|,   w ≈ m·q_k,   so   |w - m·q_k| ≤ m · max_j (q_{j+1} - q_j) / 2

Double quantization stores the fp32 scales themselves in 8 bits (blocks of 256 scales with one fp32
scale each, after subtracting their mean). Bits per weight:

    fp32 32  |  NF4 4 + 32/64 = 4.5  |  NF4 + double quant 4 + 8/64 + 32/(64·256) ≈ 4.127

Storage and kernels are bitsandbytes' `Linear4bit` (quant_type "nf4"); this file converts one layer
(`to_nf4`), reads its weight back (`dequantize`) and writes a merged one (`requantize`). It imports nothing
of lorakit's; choosing a model's layers and swapping them (`quantize_base`) is surgery, in qlora.py. A LoRA
layer holds a `Linear4bit` as its `base` exactly as it holds an `nn.Linear`.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import torch
from torch import Tensor, nn

Quantize = Literal["none", "nf4"]
QUANTIZE: tuple[str, ...] = ("none", "nf4")
BLOCK_SIZES: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
DQ_BLOCK = 256  # scales per block of bitsandbytes' double quantization


def load_bitsandbytes():
    if "bitsandbytes" not in sys.modules:
        # On AVX512-BF16 CPUs bitsandbytes tries to fetch an optional kernel from the Hugging Face Hub
        # and warns when it can't; lorakit never uses it, so the warning is noise.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("4-bit quantization needs bitsandbytes: pip install 'lorakit[quant]' "
                          "(or 'bitsandbytes>=0.50,<0.51')") from None
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit layer (ours or one loaded by transformers with load_in_4bit).

    Recognised by its weight's quant_state, so bitsandbytes need not be imported."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def nf4_code() -> Tensor:
    """The 16 NF4 code values, ascending, as bitsandbytes stores them."""
    return load_bitsandbytes().functional.get_4bit_type("nf4", device="cpu").float().sort().values


def nf4_half_gap() -> float:
    """max_j (q_{j+1} - q_j) / 2: the largest round-off, as a fraction of a block's absmax."""
    return nf4_code().diff().max().item() / 2


def to_nf4(linear: nn.Linear, *, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
           block_size: int = 64) -> nn.Module:
    """A frozen `Linear4bit` (NF4) holding `linear`'s weight; the bias is kept as it is, frozen."""
    bnb = load_bitsandbytes()
    w = linear.weight.detach()
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                          device="meta")
    # bitsandbytes' CPU inference path (AVX512-BF16) repacks the weight and computes in bf16 whatever
    # compute_dtype says; keep the plain dequantize-then-matmul so outputs match `dequantize` exactly.
    q.support_avx512bf16_for_cpu = False
    q.weight = bnb.nn.Params4bit(w.float().contiguous(), requires_grad=False, blocksize=block_size,
                                 compress_statistics=double_quant, quant_type="nf4", module=q).to(w.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    q.train(linear.training)
    return q


def nf4_bytes(module: nn.Module) -> int:
    """Bytes a 4-bit layer's weight occupies: packed codes, scales, and the second-level scales."""
    qs = module.weight.quant_state
    tensors = [module.weight.data, qs.absmax, qs.code]
    if qs.nested:
        tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def _plain_state(module: nn.Module):
    """(packed codes, quant_state) in bitsandbytes' standard layout, without changing the module."""
    w = module.weight
    qs = w.quant_state
    if getattr(qs, "packing_format_for_cpu", False):  # repacked by bitsandbytes' CPU inference path
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        return _convert_weight_packed_for_cpu_inverse(w.data, qs)
    return w.data, qs


@torch.no_grad()
def dequantize(module: nn.Module) -> Tensor:
    """The weight a 4-bit layer computes with, m·q_k per value, as fp32 (out_features, in_features)."""
    if not is_quantized(module):
        raise TypeError(f"{type(module).__name__} is not a 4-bit quantized layer")
    data, qs = _plain_state(module)
    return load_bitsandbytes().functional.dequantize_4bit(data, qs).float().reshape(module.out_features, module.in_features)


@torch.no_grad()
def requantize(module: nn.Module, weight: Tensor) -> float:
    """Store `weight` (out, in) in `module` with the module's own NF4 settings; return the max abs
    error the re-quantization introduced, max |dequantize(module) - weight|."""
    bnb = load_bitsandbytes()
    data, qs = _plain_state(module)
    old = module.weight
    new = bnb.nn.Params4bit(weight.float().contiguous(), requires_grad=False, blocksize=qs.blocksize,
                            compress_statistics=qs.nested, quant_type=qs.quant_type,
                            quant_storage=data.dtype, module=module).to(old.device)
    module.weight = new
    return (dequantize(module) - weight.float().to(old.device)).abs().max().item()


def nf4_bits_per_weight(block_size: int = 64, double_quant: bool = True) -> float:
    """The formula of the module docstring, without the per-layer code tables."""
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * DQ_BLOCK)
    return 4 + 32 / block_size


@torch.no_grad()
def nf4_roundtrip(weight: Tensor, block_size: int = 64, double_quant: bool = True) -> Tensor:
    """`weight` quantized to NF4 and read back, in fp32: what a quantized copy of it computes with."""
    F = load_bitsandbytes().functional
    w = weight.detach().float().contiguous()
    packed, qs = F.quantize_4bit(w, blocksize=block_size, compress_statistics=double_quant, quant_type="nf4")
    return F.dequantize_4bit(packed, qs).float().reshape(w.shape)


def dequantized_copy(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain nn.Linear holding a 4-bit layer's dequantized weight (and its bias) in `dtype`."""
    w = dequantize(module)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=w.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        if module.bias is not None:
            linear.bias.copy_(module.bias.float())
    linear.requires_grad_(False)
    linear.train(module.training)
    return linear

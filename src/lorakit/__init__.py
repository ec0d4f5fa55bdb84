"""lorakit: LoRA (Hu et al. 2021) for any PyTorch model — surgery, merge, adapters."""

from .adapters import (
    active_adapter, combine_adapters, delete_adapter, disable_adapters, enable_adapters, list_adapters,
    mixed_batch, set_adapter,
)
from .files import AdapterFileError, fingerprint, hot_swap, load_adapter, read_adapter, save_adapter
from .inject import InjectReport, Replacement, Summary, freeze, inject, output_head, resolve_targets, summary
from .layers import (
    FastDropout, Geometry, LoraAdapter, LoraConfig, LoraLayer, SavedModule, fast_dropout, is_hf_conv1d, kind_of,
)
from .merge import MergeReport, lora_layers, merge, merge_and_unload, unmerge
from .quant import QuantReport, StorageTable, dequantize, is_quantized, quantize_base, storage_table

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError", "SavedModule", "active_adapter", "combine_adapters", "delete_adapter",
    "disable_adapters", "enable_adapters", "fast_dropout", "fingerprint", "hot_swap", "list_adapters", "load_adapter",
    "mixed_batch", "read_adapter", "save_adapter", "set_adapter",
    "FastDropout", "Geometry", "InjectReport", "LoraAdapter", "LoraConfig", "LoraLayer", "Replacement", "Summary",
    "freeze", "inject", "is_hf_conv1d", "kind_of", "lora_layers", "merge", "merge_and_unload",
    "output_head", "resolve_targets", "summary", "unmerge",
    "MergeReport", "QuantReport", "StorageTable", "dequantize", "is_quantized", "quantize_base", "storage_table",
]

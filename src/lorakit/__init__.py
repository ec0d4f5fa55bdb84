"""lorakit: LoRA (Hu et al. 2021) for any PyTorch model — surgery, merge, adapters."""

from .adapters import (
    active_adapter, combine_adapters, delete_adapter, disable_adapters, enable_adapters, list_adapters, lora_layers,
    mixed_batch, set_adapter,
)
from .files import (
    AdapterFileError, attach_adapter, fingerprint, hot_swap, load_adapter, prepare_adapter, read_adapter, save_adapter,
)
from .fused import FastDropout, fast_dropout
from .inject import InjectReport, Replacement, freeze, inject, replace_module
from .layers import Geometry, LoraAdapter, LoraConfig, LoraLayer, SavedModule, is_hf_conv1d, kind_of
from .merge import MergeReport, merge, merge_and_unload, unmerge
from .optim import param_groups
from .qlora import QuantReport, StorageTable, quantize_base, storage_table
from .quant import dequantize, is_quantized
from .summary import Summary, summary
from .targets import output_head, resolve_targets
from .view import show

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError", "SavedModule", "active_adapter", "combine_adapters", "delete_adapter",
    "disable_adapters", "enable_adapters", "fast_dropout", "fingerprint", "hot_swap", "list_adapters", "load_adapter",
    "mixed_batch", "read_adapter", "prepare_adapter", "attach_adapter", "save_adapter", "set_adapter",
    "FastDropout", "Geometry", "InjectReport", "LoraAdapter", "LoraConfig", "LoraLayer", "Replacement", "Summary",
    "freeze", "inject", "is_hf_conv1d", "kind_of", "lora_layers", "merge", "merge_and_unload",
    "output_head", "param_groups", "replace_module", "resolve_targets", "show", "summary", "unmerge",
    "MergeReport", "QuantReport", "StorageTable", "dequantize", "is_quantized", "quantize_base", "storage_table",
]

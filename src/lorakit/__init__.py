"""lorakit: LoRA (Hu et al. 2021) for any PyTorch model — surgery, merge, adapters."""

from .inject import InjectReport, Replacement, Summary, freeze, inject, output_head, resolve_targets, summary
from .layers import Geometry, LoraAdapter, LoraConfig, LoraLayer, is_hf_conv1d, kind_of
from .merge import lora_layers, merge, merge_and_unload, unmerge

__version__ = "0.1.0"

__all__ = [
    "Geometry", "InjectReport", "LoraAdapter", "LoraConfig", "LoraLayer", "Replacement", "Summary",
    "freeze", "inject", "is_hf_conv1d", "kind_of", "lora_layers", "merge", "merge_and_unload",
    "output_head", "resolve_targets", "summary", "unmerge",
]

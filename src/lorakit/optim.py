"""Optimizer parameter groups for LoRA training, with LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B learns at
a higher rate than A."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .layers import LoraAdapter


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 loraplus_ratio: float = 1.0) -> list[dict[str, Any]]:
    """The model's trainable parameters as optimizer groups: every adapter's B at lr × loraplus_ratio, the rest
    (A, trained biases, modules_to_save) at lr, all with weight_decay. With a ratio of 1, one group holding
    them in the model's order, as `optimizer(model.parameters())` would.

        torch.optim.AdamW(lorakit.param_groups(model, lr=2e-4, loraplus_ratio=16))

    (PEFT's `create_loraplus_optimizer` also gives 1-D parameters B's rate and embedding adapters a fixed
    1e-6; here only B's rate changes, as in the paper.) The groups hold what trains, so LoRA-FA's frozen A
    (`LoraConfig.train_a=False`, applied by `inject` and `freeze`) is in none."""
    for name, value, allowed, ok in (("lr", lr, "> 0", lambda v: v > 0),
                                     ("weight_decay", weight_decay, ">= 0", lambda v: v >= 0),
                                     ("loraplus_ratio", loraplus_ratio, "> 0", lambda v: v > 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and ok(value)):
            raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if loraplus_ratio == 1:
        return [{"params": trainable, "lr": lr, "weight_decay": weight_decay}]
    ups = {id(m.lora_b) for m in model.modules() if isinstance(m, LoraAdapter)}
    groups = [{"params": [p for p in trainable if id(p) not in ups], "lr": lr, "weight_decay": weight_decay},
              {"params": [p for p in trainable if id(p) in ups], "lr": lr * loraplus_ratio,
               "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]

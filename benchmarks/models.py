"""The models `python -m benchmarks` runs and how each variant is made from them: the base models (packaged
weights through `lorakit.hub`, or random ones), the random batch, the floor, lorakit and PEFT models (LoRA
or DoRA; LoRA-FA), their optimizers, and giving both libraries the same adapter weights."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

import lorakit

from .cases import HEADS, LORAPLUS_RATIO, LR, MODEL_NAMES, Case, Lora, Variant
from .common import HERE

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers 5, called by peft
# LoRA-FA freezes A on purpose; lorakit's warning about training a frozen adapter looks at A alone.
warnings.filterwarnings("ignore", message="training with LoRA adapter .* frozen")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_base(name: str, dtype: torch.dtype, device: str, random_weights: bool = False) -> nn.Module:
    """The base model, its new classifier head (if any) drawn from seed 0, in `dtype` on `device`.

    random_weights: build MiniLM or SmolLM2 from its architecture alone (benchmarks/configs/NAME.json), with
    transformers' random initialisation, for machines without the packaged weights. Time and memory depend
    on the shapes, not the values."""
    from transformers import (AutoConfig, AutoModelForCausalLM, BertConfig, BertForSequenceClassification,
                              LlamaConfig, LlamaForCausalLM)
    from transformers.utils import logging as hf_logging

    from lorakit import hub

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    if random_weights and name in ("minilm", "smollm2"):
        config = AutoConfig.from_pretrained(HERE / "configs" / f"{name}.json")
        model = (BertForSequenceClassification(BertConfig(**config.to_dict(), num_labels=2)) if name == "minilm"
                 else LlamaForCausalLM(config))
    elif name == "minilm":
        model = BertForSequenceClassification.from_pretrained(hub.minilm_dir(), num_labels=2)
    elif name == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(hub.smollm2_dir())
    elif name == "tiny-bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=2))
    elif name == "tiny-llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    else:
        raise ValueError(f"unknown model {name!r}; models: {', '.join(MODEL_NAMES)}")
    return model.to(device=device, dtype=dtype)


def make_batch(model: nn.Module, case: Case, device: str, labels: bool) -> dict[str, torch.Tensor]:
    """B×T random token ids (the same for every variant), no padding; labels for the loss if asked."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (case.batch, case.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        batch["labels"] = torch.randint(0, 2, (case.batch,), generator=g) if HEADS[case.model] else ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


def embedding_output(model: nn.Module) -> nn.Module:
    """The module whose output feeds the first layer: BERT's embeddings block, else the token embedding."""
    return getattr(model.base_model, "embeddings", None) or model.get_input_embeddings()


def inject(model: nn.Module, lora: Lora, **extra: Any) -> None:
    """`lorakit.inject` with the setting `lora`; `extra` as inject takes it (adapter, modules_to_save)."""
    lorakit.inject(model, list(lora.targets), r=lora.r, alpha=lora.alpha, dropout=lora.dropout, dora=lora.dora,
                   **extra)


def peft_config(lora: Lora, task_type: str) -> Any:
    """The `peft.LoraConfig` of the setting `lora`."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, target_modules=list(lora.targets), r=lora.r, lora_alpha=lora.alpha,
                      lora_dropout=lora.dropout, use_dora=lora.dora)


def build(model: nn.Module, v: Variant, head: str | None) -> nn.Module:
    """Turn `model` (changed in place, so pass a copy) into variant `v`."""
    if v.impl == "floor":
        model.requires_grad_(False)
        if head:
            model.get_submodule(head).requires_grad_(True)
        embedding_output(model).register_forward_hook(lambda module, args, out: out.requires_grad_())
        return model
    if v.impl == "full":
        return model.requires_grad_(True)
    lora = v.lora
    assert lora is not None, v
    if v.impl == "lorakit":
        inject(model, lora, modules_to_save=[head] if head else [])
        if not v.train_a:  # LoRA-FA: A stays as initialised, only B (and the head) train
            for m in model.modules():
                if isinstance(m, lorakit.LoraAdapter):
                    m.lora_a.requires_grad_(False)
        return model
    from peft import get_peft_model

    # task_type SEQ_CLS puts the classifier in modules_to_save, as lorakit's modules_to_save does.
    return get_peft_model(model, peft_config(lora, "SEQ_CLS" if head else "CAUSAL_LM"))


def optimizer(model: nn.Module, v: Variant) -> torch.optim.Optimizer | None:
    """AdamW over what trains in `model` (variant `v`), at LR; LoRA+ through `lorakit.param_groups`. None when
    the variant's step has no optimizer step."""
    if v.optimizer is None:
        return None
    ratio = LORAPLUS_RATIO if v.optimizer == "loraplus" else 1
    return torch.optim.AdamW(lorakit.param_groups(model, LR, loraplus_ratio=ratio))


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    """Give lorakit's B matrices small random values and move each DoRA magnitude m off its initial ‖W0‖ by
    a random 20% (a trained-looking adapter: B·A and m both change the output; merging changes W)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, lorakit.LoraAdapter):
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.02)
            if m.magnitude is not None:
                m.magnitude.mul_(1 + 0.2 * torch.randn(m.magnitude.shape, generator=g))


def twins(src: nn.Module, dst: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Each lorakit adapter's A, B and DoRA magnitude m (from `src`) with the PEFT model's (`dst`) for the
    same adapter name and layer: lora_A, lora_B and lora_magnitude_vector."""
    inner, out = dst.base_model.model, []
    for name, layer in lorakit.lora_layers(src):
        target = inner.get_submodule(name)
        for adapter, a in layer.adapters.items():
            out += [(a.lora_a, target.lora_A[adapter].weight), (a.lora_b, target.lora_B[adapter].weight)]
            if a.magnitude is not None:
                out.append((a.magnitude, target.lora_magnitude_vector[adapter].weight))
    return out


@torch.no_grad()
def copy_to_peft(src: nn.Module, dst: nn.Module) -> None:
    """Copy every lorakit adapter's A, B and DoRA magnitude into the PEFT model's (`twins`)."""
    for ours, theirs in twins(src, dst):
        theirs.copy_(ours)


def grad_diff(src: nn.Module, dst: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """One backward of the loss on `batch` through each model (as they are: eval mode for a check without
    dropout), then max |lorakit − PEFT| over the gradients of A, B and m (`twins`), relative to the largest
    gradient; the gradients are cleared again."""
    for model in (src, dst):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
    pairs = twins(src, dst)
    diff = max(max_diff(ours.grad, theirs.grad) for ours, theirs in pairs)
    top = max(theirs.grad.abs().max().item() for _, theirs in pairs)
    for model in (src, dst):
        model.zero_grad(set_to_none=True)
    return diff / top


def out_of(model: nn.Module, batch: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
    """The model's logits on `batch` (without its labels), in fp32."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}, **extra).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()

"""What `python -m benchmarks` measures: the cases (a model, a batch, LoRA settings, how many steps) and the
variants of a training case (the floor, lorakit, PEFT, full fine-tuning; or LoRA, LoRA+ and LoRA-FA, each
with an AdamW step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MODEL_NAMES = {"minilm": "MiniLM", "smollm2": "SmolLM2-135M", "tiny-bert": "tiny BERT", "tiny-llama": "tiny Llama"}
HEADS = {"minilm": "classifier", "tiny-bert": "classifier", "smollm2": None, "tiny-llama": None}
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV = ("query", "value")
LR = 1e-4  # the AdamW learning rate of the optimizer cases (their memory and time do not depend on it)
LORAPLUS_RATIO = 16  # LoRA+: B learns at LR × this (`lorakit.param_groups(..., loraplus_ratio=...)`)


@dataclass(frozen=True)
class Lora:
    """One LoRA setting, given to `lorakit.inject` and to `peft.LoraConfig` alike (dora: `dora=True` and
    `use_dora=True`)."""

    targets: tuple[str, ...]
    r: int
    alpha: int
    dropout: float
    dora: bool = False

    def __str__(self) -> str:
        return f"{'DoRA' if self.dora else 'LoRA'} {','.join(self.targets)} r={self.r} dropout {self.dropout:g}"


@dataclass(frozen=True)
class Case:
    """A model, the batch it runs (B rows of T tokens), the LoRA settings, and how many timed steps.

    kind: "train" (floor vs LoRA steps, full fine-tuning if `full`), "infer" (base vs adapter unmerged
    and merged) or "mixed" (`adapters` adapters, rows spread over them, vs a single-adapter forward).
    warmup: untimed steps per variant before the timed ones.
    optimizer: a training case of lorakit alone whose steps include an AdamW step: LoRA, LoRA+ and LoRA-FA
    (A frozen) on the one setting `loras[0]`, instead of the floor, lorakit and PEFT."""

    name: str
    kind: Literal["train", "infer", "mixed"]
    model: str
    batch: int
    seq: int
    loras: tuple[Lora, ...]
    steps: int
    warmup: int = 2
    full: bool = False
    adapters: int = 1
    random_weights: bool = False
    optimizer: bool = False

    def describe(self) -> str:
        what = f"{MODEL_NAMES[self.model]}{' (random weights)' if self.random_weights else ''}, " \
               f"B={self.batch}, T={self.seq}"
        if self.kind == "mixed":
            return f"{what}, {self.adapters} adapters × {self.batch // self.adapters} rows, {self.loras[0]}"
        return f"{what}, " + "; ".join(map(str, self.loras)) + ("; full fine-tuning" if self.full else "") \
            + (f"; each step with AdamW: LoRA, LoRA+ (B's lr ×{LORAPLUS_RATIO}), LoRA-FA (A frozen)"
               if self.optimizer else "")


@dataclass(frozen=True)
class Variant:
    """One model of a case: impl is floor, full, lorakit or peft; lora the setting (for lorakit and peft).

    optimizer: None (a step is forward and backward), "adamw" (plus an AdamW step over what trains) or
    "loraplus" (AdamW over `lorakit.param_groups(..., loraplus_ratio=LORAPLUS_RATIO)`). train_a: False
    freezes every adapter's A (`requires_grad_(False)`): LoRA-FA."""

    name: str
    impl: str
    lora: Lora | None = None
    optimizer: Literal["adamw", "loraplus"] | None = None
    train_a: bool = True


def cases(quick: bool) -> list[Case]:
    """The issue's cases; --quick swaps in tiny random models and tiny batches with the same structure."""
    qv0, qv1 = Lora(QV, 8, 16, 0.0), Lora(QV, 8, 16, 0.1)
    every = Lora(LLAMA_LINEAR, 16, 32, 0.05)
    served = Lora(LLAMA_LINEAR, 16, 32, 0.0)
    # DoRA without dropout: with dropout both libraries run the base a second time, on the dropped input
    # (PEFT's definition, which lorakit keeps), so a DoRA step would cost that by definition.
    dora_qv = (qv0, Lora(QV, 8, 16, 0.0, dora=True))
    dora_every = (served, Lora(LLAMA_LINEAR, 16, 32, 0.0, dora=True))
    if quick:
        return [Case("minilm-train", "train", "tiny-bert", 4, 16, (qv0, qv1), 2, 1, full=True),
                Case("smollm2-train", "train", "tiny-llama", 2, 16, (every,), 2, 1),
                Case("minilm-infer", "infer", "tiny-bert", 4, 16, (qv0,), 2, 1),
                Case("smollm2-mixed", "mixed", "tiny-llama", 16, 8, (served,), 2, 1, adapters=8),
                Case("minilm-dora", "train", "tiny-bert", 4, 16, dora_qv, 2, 1),
                Case("smollm2-dora", "train", "tiny-llama", 2, 16, dora_every, 2, 1),
                Case("minilm-optim", "train", "tiny-bert", 4, 16, (qv1,), 2, 1, optimizer=True),
                Case("smollm2-optim", "train", "tiny-llama", 2, 16, (every,), 2, 1, optimizer=True)]
    return [Case("minilm-train", "train", "minilm", 32, 64, (qv0, qv1), 20, 2, full=True),
            Case("smollm2-train", "train", "smollm2", 4, 256, (every,), 10, 1),
            Case("minilm-infer", "infer", "minilm", 32, 64, (qv0,), 30, 2),
            Case("smollm2-mixed", "mixed", "smollm2", 16, 64, (served,), 10, 1, adapters=8),
            Case("minilm-dora", "train", "minilm", 32, 64, dora_qv, 20, 2),
            Case("smollm2-dora", "train", "smollm2", 4, 256, dora_every, 10, 1),
            Case("minilm-optim", "train", "minilm", 32, 64, (qv1,), 10, 2, optimizer=True),
            Case("smollm2-optim", "train", "smollm2", 4, 256, (every,), 10, 1, optimizer=True)]


def train_variants(case: Case) -> list[Variant]:
    """The floor, then lorakit and PEFT for each LoRA setting (named by what tells the settings apart: dropout,
    LoRA or DoRA), then full fine-tuning if the case asks for it. An optimizer case: LoRA, LoRA+ and LoRA-FA,
    all lorakit, on its one setting."""
    if case.optimizer:
        lora = case.loras[0]
        return [Variant("LoRA", "lorakit", lora, "adamw"), Variant("LoRA+", "lorakit", lora, "loraplus"),
                Variant("LoRA-FA", "lorakit", lora, "adamw", train_a=False)]

    def label(impl: str, lora: Lora) -> str:
        parts = [impl]
        if len({x.dropout for x in case.loras}) > 1:
            parts.append(f"dropout {lora.dropout:g}")
        if len({x.dora for x in case.loras}) > 1:
            parts.append("DoRA" if lora.dora else "LoRA")
        return " ".join(parts)

    out = [Variant("floor", "floor")]
    out += [Variant(label(impl, lora), impl, lora) for lora in case.loras for impl in ("lorakit", "peft")]
    return out + ([Variant("full", "full")] if case.full else [])

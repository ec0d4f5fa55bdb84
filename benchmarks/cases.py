"""What `python -m benchmarks` measures: the cases (a model, a batch, LoRA settings, how many steps) and the
variants of a training case (the floor, lorakit, PEFT, full fine-tuning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MODEL_NAMES = {"minilm": "MiniLM", "smollm2": "SmolLM2-135M", "tiny-bert": "tiny BERT", "tiny-llama": "tiny Llama"}
HEADS = {"minilm": "classifier", "tiny-bert": "classifier", "smollm2": None, "tiny-llama": None}
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV = ("query", "value")


@dataclass(frozen=True)
class Lora:
    """One LoRA setting, given to `lorakit.inject` and to `peft.LoraConfig` alike."""

    targets: tuple[str, ...]
    r: int
    alpha: int
    dropout: float

    def __str__(self) -> str:
        return f"LoRA {','.join(self.targets)} r={self.r} dropout {self.dropout:g}"


@dataclass(frozen=True)
class Case:
    """A model, the batch it runs (B rows of T tokens), the LoRA settings, and how many timed steps.

    kind: "train" (floor vs LoRA steps, full fine-tuning if `full`), "infer" (base vs adapter unmerged
    and merged) or "mixed" (`adapters` adapters, rows spread over them, vs a single-adapter forward).
    warmup: untimed steps per variant before the timed ones."""

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

    def describe(self) -> str:
        what = f"{MODEL_NAMES[self.model]}{' (random weights)' if self.random_weights else ''}, " \
               f"B={self.batch}, T={self.seq}"
        if self.kind == "mixed":
            return f"{what}, {self.adapters} adapters × {self.batch // self.adapters} rows, {self.loras[0]}"
        return f"{what}, " + "; ".join(map(str, self.loras)) + ("; full fine-tuning" if self.full else "")


@dataclass(frozen=True)
class Variant:
    """One model of a case: impl is floor, full, lorakit or peft; lora the setting (for lorakit and peft)."""

    name: str
    impl: str
    lora: Lora | None = None


def cases(quick: bool) -> list[Case]:
    """The issue's cases; --quick swaps in tiny random models and tiny batches with the same structure."""
    qv0, qv1 = Lora(QV, 8, 16, 0.0), Lora(QV, 8, 16, 0.1)
    every = Lora(LLAMA_LINEAR, 16, 32, 0.05)
    served = Lora(LLAMA_LINEAR, 16, 32, 0.0)
    if quick:
        return [Case("minilm-train", "train", "tiny-bert", 4, 16, (qv0, qv1), 2, 1, full=True),
                Case("smollm2-train", "train", "tiny-llama", 2, 16, (every,), 2, 1),
                Case("minilm-infer", "infer", "tiny-bert", 4, 16, (qv0,), 2, 1),
                Case("smollm2-mixed", "mixed", "tiny-llama", 16, 8, (served,), 2, 1, adapters=8)]
    return [Case("minilm-train", "train", "minilm", 32, 64, (qv0, qv1), 20, 2, full=True),
            Case("smollm2-train", "train", "smollm2", 4, 256, (every,), 10, 1),
            Case("minilm-infer", "infer", "minilm", 32, 64, (qv0,), 30, 2),
            Case("smollm2-mixed", "mixed", "smollm2", 16, 64, (served,), 10, 1, adapters=8)]


def train_variants(case: Case) -> list[Variant]:
    """The floor, then lorakit and PEFT for each LoRA setting (named by dropout where there are several), then
    full fine-tuning if the case asks for it."""
    def label(impl: str, lora: Lora) -> str:
        return impl if len(case.loras) == 1 else f"{impl} dropout {lora.dropout:g}"

    out = [Variant("floor", "floor")]
    out += [Variant(label(impl, lora), impl, lora) for lora in case.loras for impl in ("lorakit", "peft")]
    return out + ([Variant("full", "full")] if case.full else [])

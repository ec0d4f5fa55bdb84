"""Study `cnn-subset`: LoRA on a small ConvNet steers it toward the classes it is trained on.

The from-scratch LoRA walkthrough's experiment, on Fashion-MNIST: train the ConvNet on all 10 classes;
adapt fc1, fc2 and fc3 with LoRA (r=4, α=4), everything else frozen; continue training on the three
classes the base model does worst on only; compare per-class test accuracy before and after. Expected
shape: the three classes improve, the other seven drop (the adapter learns "it is one of these three").
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import inject, lora_layers, summary
from ..models import ConvNet
from ..train.config import TrainSection
from ..train.data import load_fashion_mnist, shuffled_batches
from ..train.loop import RunState, fit
from ..train.tasks import Batch, Split
from .report import Report, command_line

TARGETS = ["fc1", "fc2", "fc3"]
RANK, ALPHA = 4, 4
K = 3  # classes to fine-tune on
BATCH = 64
LR = 1e-3  # AdamW, both phases
BASE_EPOCHS, LORA_EPOCHS = 2, 1
QUICK_TRAIN, QUICK_TEST, QUICK_LORA_STEPS = 3000, 2000, 150


def worst_classes(acc: list[float], k: int) -> list[int]:
    """Indices of the k lowest accuracies, worst first; ties go to the lower index."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(acc):
        raise ValueError(f"k must be an integer in 1..{len(acc)} (the number of classes), got {k!r}")
    return sorted(range(len(acc)), key=lambda i: (acc[i], i))[:k]


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Predicted classes (N,) of images x: (N, C, H, W)."""
    model.eval()
    return torch.cat([model(x[i:i + 1000]).argmax(-1) for i in range(0, len(x), 1000)])


def per_class_accuracy(pred: Tensor, y: Tensor, classes: int) -> tuple[list[float], float]:
    """Accuracy of each class and overall, from predictions and labels, both (N,)."""
    hit = (pred == y).float()
    per_class = [hit[y == c].mean().item() if (y == c).any() else float("nan") for c in range(classes)]
    return per_class, hit.mean().item()


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int, first_epoch: int = 0,
          max_steps: int | None = None) -> int:
    """AdamW on the trainable parameters at a constant LR, shuffled batches of BATCH, through lorakit's
    training loop; returns the steps taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    split = Split(len(x), lambda batch, epoch, shuffle: shuffled_batches(len(x), batch, seed, epoch),
                  lambda index: Batch({"pixels": x[index]}, y[index], len(index)))
    settings = TrainSection(epochs=first_epoch + epochs, batch_size=BATCH, lr=LR, weight_decay=0.0,
                            max_grad_norm=None, max_steps=max_steps)
    model.train()
    state = fit(model, classify, split, opt, None, params, RunState(epoch=first_epoch), settings, progress_bar=False)
    return state.step


def classify(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    logits = model(batch.inputs["pixels"])  # (B, classes)
    return F.cross_entropy(logits, batch.labels), logits


def run(out: Path, quick: bool = False, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times: dict[str, float] = {}
    t = time.perf_counter()
    data = load_fashion_mnist()
    train_x, train_y, test_x, test_y = data.train_x, data.train_y, data.test_x, data.test_y
    if quick:  # a random subset, the same for a given seed
        g = torch.Generator().manual_seed(seed)
        tr = torch.randperm(len(train_x), generator=g)[:QUICK_TRAIN]
        te = torch.randperm(len(test_x), generator=g)[:QUICK_TEST]
        train_x, train_y, test_x, test_y = train_x[tr], train_y[tr], test_x[te], test_y[te]
    n_classes, names = len(data.classes), data.classes
    times["load Fashion-MNIST"] = time.perf_counter() - t

    # 1. The base model, all parameters, all classes.
    torch.manual_seed(seed)
    model = ConvNet(in_channels=train_x.shape[1], classes=n_classes)
    base_counts = summary(model, print_fn=lambda _: None)
    base_epochs = 1 if quick else BASE_EPOCHS
    t = time.perf_counter()
    base_steps = train(model, train_x, train_y, base_epochs, seed)
    times[f"base training ({base_epochs} epoch{'s' * (base_epochs > 1)}, {base_steps} steps)"] = time.perf_counter() - t
    t = time.perf_counter()
    base_pred = predict(model, test_x)
    base_acc, base_all = per_class_accuracy(base_pred, test_y, n_classes)
    times["base evaluation"] = time.perf_counter() - t
    chosen = worst_classes(base_acc, K)

    # 2. LoRA on the fc layers; only A and B train, on the chosen classes only.
    report_inject = inject(model, TARGETS, r=RANK, alpha=ALPHA)
    lora_counts = summary(model, print_fn=lambda _: None)
    assert lora_counts.trainable == report_inject.params_added, (lora_counts, report_inject.params_added)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    keep = torch.isin(data.train_y, torch.tensor(chosen))
    sub_x, sub_y = data.train_x[keep], data.train_y[keep]  # quick mode too: only the steps are capped
    t = time.perf_counter()
    lora_steps = train(model, sub_x, sub_y, LORA_EPOCHS, seed, first_epoch=base_epochs,
                       max_steps=QUICK_LORA_STEPS if quick else None)
    times[f"LoRA training ({lora_steps} steps, batches drawn from {len(sub_x):,} images)"] = time.perf_counter() - t
    now = dict(model.named_parameters())
    changed = [n for n, w in frozen.items() if not torch.equal(now[n], w)]
    assert not changed, f"frozen base parameters changed during LoRA training: {changed}"
    t = time.perf_counter()
    lora_pred = predict(model, test_x)
    lora_acc, lora_all = per_class_accuracy(lora_pred, test_y, n_classes)
    times["LoRA evaluation"] = time.perf_counter() - t
    b_max = {name: layer.adapters["default"].lora_b.abs().max().item() for name, layer in lora_layers(model)}

    # 3. The report.
    delta = [100 * (a - b) for a, b in zip(lora_acc, base_acc)]
    others = [c for c in range(n_classes) if c not in chosen]
    report = Report("LoRA fine-tuning on three classes shifts a ConvNet toward them", out)
    size = (f"{len(train_x):,} training and {len(test_x):,} test images" if quick
            else f"all {len(train_x):,} training and {len(test_x):,} test images")
    report.header(
        f"The ConvNet of the from-scratch LoRA walkthrough on Fashion-MNIST ({size}), trained on all 10 classes "
        f"for {base_epochs} epoch{'s' * (base_epochs > 1)}; then LoRA (r={RANK}, α={ALPHA}) on "
        f"{', '.join(TARGETS)}, with every base weight frozen, trained on the training images of the {K} classes "
        f"the base model does worst on ({lora_steps} steps). AdamW, lr {LR:g}, batch {BATCH}, no weight decay.",
        command_line(), [seed], quick)
    report.add(f"Chosen by base test accuracy (the {K} lowest): "
               + ", ".join(f"**{names[c]}** ({100 * base_acc[c]:.1f}%)" for c in chosen) + ".", "")

    report.add("## Per-class test accuracy", "")
    rows = [[f"**{names[c]}**" if c in chosen else names[c], f"{100 * base_acc[c]:.1f}%",
             f"{100 * lora_acc[c]:.1f}%", f"{delta[c]:+.1f}"] for c in range(n_classes)]
    rows.append(["overall", f"{100 * base_all:.1f}%", f"{100 * lora_all:.1f}%", f"{100 * (lora_all - base_all):+.1f}"])
    report.table(["class", "base acc", "after LoRA acc", "change (points)"], rows)

    fig, ax = plt.subplots(figsize=(9, 3.8))
    xs = range(n_classes)
    ax.bar([i - 0.2 for i in xs], [100 * a for a in base_acc], 0.4, label="base")
    ax.bar([i + 0.2 for i in xs], [100 * a for a in lora_acc], 0.4, label=f"after LoRA on {K} classes")
    ax.set_xticks(list(xs), [n + (" *" if i in chosen else "") for i, n in enumerate(names)], rotation=30, ha="right")
    for i in chosen:
        ax.get_xticklabels()[i].set_fontweight("bold")
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title="per-class accuracy (* = LoRA training classes)")
    ax.legend(ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    report.figure(fig, "per_class", "per-class test accuracy before and after LoRA")
    plt.close(fig)

    up = [c for c in chosen if delta[c] > 0]
    fell = [c for c in others if delta[c] < 0]
    rose = [c for c in others if delta[c] > 0]

    def listed(cs: list[int]) -> str:
        return ", ".join(f"{names[c]} {delta[c]:+.1f}" for c in cs)

    def mean(cs: list[int]) -> float:
        return sum(delta[c] for c in cs) / len(cs)

    if len(up) == K:
        chosen_text = f"All {K} chosen classes improved ({listed(chosen)} points)."
    else:
        not_up = [c for c in chosen if c not in up]
        chosen_text = (f"Of the {K} chosen classes, {len(up)} improved ({listed(up) or 'none'}) and {len(not_up)} "
                       f"did not ({listed(not_up)} points).")
    others_text = (f"All {len(others)} other classes dropped" if len(fell) == len(others)
                   else f"{len(fell)} of the {len(others)} other classes dropped")
    others_text += f" (mean {mean(others):+.1f} points)." + (f" Some rose: {listed(rose)} points." if rose else "")
    holds = len(up) == K and not rose
    report.add(f"{chosen_text} {others_text} Overall accuracy went from {100 * base_all:.1f}% to "
               f"{100 * lora_all:.1f}%. The expected shape, the three up and the rest down, "
               f"{'holds' if holds else 'holds only in part'}.", "")
    # Where the predictions went: toward the chosen classes, from the rest and within the three.
    three = torch.tensor(chosen)
    is_chosen = torch.isin(test_y, three)
    pulled = [100 * torch.isin(p[~is_chosen], three).float().mean().item() for p in (base_pred, lora_pred)]
    wrong = (lora_pred != test_y) & is_chosen
    inside = 100 * torch.isin(lora_pred[wrong], three).float().mean().item() if wrong.any() else 0.0
    report.add(f"Test images of the other {len(others)} classes predicted as one of the three: {pulled[0]:.1f}% "
               f"before, {pulled[1]:.1f}% after. Of the chosen classes' test images still misclassified after LoRA, "
               f"{inside:.1f}% are taken for another of the three: a chosen class gains what the adapter takes "
               f"from the rest, and within the three it still competes with the other two.", "")

    report.add("## Parameters", "")
    report.table(["", "trainable parameters"],
                 [["base model (all parameters, phase 1; the unused conv3 included)", f"{base_counts.trainable:,}"]]
                 + [[f"LoRA on {r.name}: r·(in+out) = {RANK}·({r.in_features}+{r.out_features})", f"{r.params:,}"]
                    for r in report_inject.replaced]
                 + [["LoRA total (phase 2)", f"{lora_counts.trainable:,} "
                     f"({100 * lora_counts.trainable / base_counts.total:.1f}% of the base)"]])
    n_frozen = lora_counts.total - lora_counts.trainable
    report.add(f"Every frozen parameter ({len(frozen)} tensors, {n_frozen:,} values) is bit-identical before and "
               f"after LoRA training.", "")

    report.add("## B moved away from zero", "",
               "B starts at zero, so a fresh adapter changes nothing; after training:", "")
    report.table(["layer", "B shape", r"max \|B\|"],
                 [[n, "×".join(map(str, layer.adapters["default"].lora_b.shape)), f"{b_max[n]:.3g}"]
                  for n, layer in lora_layers(model)])
    moved = all(v > 0 and math.isfinite(v) for v in b_max.values())
    report.add(("Every B matrix moved away from zero." if moved
                else "Not every B matrix moved: " + ", ".join(n for n, v in b_max.items() if not v > 0) + "."), "")

    report.add("## Wall-clock", "")
    report.table(["phase", "seconds"], [[k, f"{v:.1f}"] for k, v in times.items()])
    return report.write()

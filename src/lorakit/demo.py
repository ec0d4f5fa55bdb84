"""A short tour on a real model: surgery → summary → training → merge → equal outputs.

    python -m lorakit.demo [--steps 150] [--batch-size 32] [--eval-size 800]

Adapts the packaged all-MiniLM-L6-v2 (BERT) for Rotten Tomatoes sentiment with LoRA on query and
value (the classifier head trains in full), then merges the adapter and checks the merged model
gives the same outputs and loads into a plain BERT.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import torch

import lorakit
from lorakit.hub import Example, minilm_dir, rotten_tomatoes


def split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """A fixed split by a hash of the text: one example in ten is held out for testing."""
    test = [e for e in examples if int(hashlib.sha1(e.text.encode()).hexdigest(), 16) % 10 == 0]
    train = [e for e in examples if int(hashlib.sha1(e.text.encode()).hexdigest(), 16) % 10 != 0]
    return train, test


@torch.no_grad()
def accuracy(model, tokenizer, examples: list[Example], batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        enc = tokenizer([e.text for e in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
        correct += (pred == torch.tensor([e.label for e in batch])).sum().item()
    return correct / len(examples)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-size", type=int, default=800, help="test examples to score (default 800)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    train, test = split(rotten_tomatoes())
    test = test[:args.eval_size]
    print(f"model: all-MiniLM-L6-v2 from {path}")
    print(f"data: Rotten Tomatoes, {len(train):,} train / {len(test):,} test snippets (fresh = positive)\n")

    print(lorakit.inject(model, ["query", "value"], r=8, alpha=16, dropout=0.05, modules_to_save=["classifier"]))
    print()
    counts = lorakit.summary(model, print_fn=lambda table: print("\n".join(
        line for line in table.splitlines() if "trainable" in line or line.startswith("parameter"))))
    print(f"(frozen rows omitted: {len(list(model.parameters())) - sum(p.requires_grad for p in model.parameters())})\n")

    before = accuracy(model, tokenizer, test)
    print(f"test accuracy before training: {before:.3f}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=gen).tolist()
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        idx = order[(step * args.batch_size) % len(order):][:args.batch_size]
        batch = [train[i] for i in idx]
        enc = tokenizer([e.text for e in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([e.label for e in batch])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 25 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch_size / (time.perf_counter() - start)
            print(f"  step {step + 1:>4}/{args.steps}  loss {loss.item():.4f}  {rate:,.0f} examples/s")
    after = accuracy(model, tokenizer, test)
    print(f"test accuracy after {args.steps} steps: {after:.3f} (before: {before:.3f})\n")

    model.eval()
    probe = tokenizer([e.text for e in test[:16]], padding=True, return_tensors="pt")
    with torch.no_grad():
        unmerged = model(**probe).logits
        lorakit.merge(model)
        merged = model(**probe).logits
    print(f"merged vs unmerged logits: max |difference| = {(merged - unmerged).abs().max():.2e}")
    plain = lorakit.merge_and_unload(model)
    fresh = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        reloaded = fresh.eval()(**probe).logits
    reload_diff = (reloaded - unmerged).abs().max().item()
    print(f"merge_and_unload → fresh BertForSequenceClassification (strict load): "
          f"max |difference| = {reload_diff:.2e}")
    print(f"\ntrained {counts.trainable:,} of {counts.total:,} parameters ({counts.percent:.2f}%); "
          f"accuracy {before:.3f} → {after:.3f}")
    return {"before": before, "after": after, "merge_diff": (merged - unmerged).abs().max().item(),
            "reload_diff": reload_diff, "trainable": counts.trainable}


if __name__ == "__main__":
    main()

"""lorakit.train.tasks: evaluation over length-sorted, padded batches equals one unpadded text at a time."""

import csv
import math

import torch

from lorakit.train.config import build_config
from lorakit.train.tasks import evaluate, prepare


def test_evaluate_equals_one_text_at_a_time(tmp_path):
    path = tmp_path / "reviews.csv"
    words = ["fine", "dull", "moving", "long"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(120):
            w.writerow([" ".join(words[j % 4] for j in range(1 + (i * 7) % 30)) + f" {i}", "pos" if i % 3 else "neg"])
    task = prepare(build_config({"data": {"path": str(path)}}))
    s = task.splits["test"]
    assert s.size > 3
    lengths = [s.collate([i]).inputs["attention_mask"].sum().item() for i in range(s.size)]
    assert len(set(lengths)) > 2  # batches of 4 mix lengths, so padding is exercised
    with torch.no_grad():  # one text at a time: no padding at all
        one = [task.forward(task.model, s.collate([i])) for i in range(s.size)]
    labels = s.collate(list(range(s.size))).labels
    logits = torch.cat([out for _, out in one])
    got = evaluate(task, task.model, "test", batch_size=4)
    assert got["accuracy"] == (logits.argmax(-1) == labels).sum().item() / s.size
    assert math.isclose(got["loss"], sum(loss.item() for loss, _ in one) / s.size, rel_tol=1e-5)
    assert 0 < got["accuracy"] < 1  # a random head: neither all right nor all wrong

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
    task = prepare(build_config({"data": {"path": str(path)}, "train": {"bf16": False}}))  # fp32: exact on any CPU
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


def test_cpu_training_switches_attention_with_dropout_to_eager():
    from conftest import make_tiny_llama
    from transformers import BertConfig, BertForSequenceClassification

    from lorakit.train.tasks import eager_attention_for_dropout

    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32))
    assert bert.config._attn_implementation == "sdpa" and bert.config.attention_probs_dropout_prob > 0
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = bert.eval()(x).logits
    assert eager_attention_for_dropout(bert) and bert.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(bert(x).logits, before, atol=1e-5, rtol=0)
    llama = make_tiny_llama()  # attention_dropout 0: SDPA stays
    assert not eager_attention_for_dropout(llama) and llama.config._attn_implementation == "sdpa"

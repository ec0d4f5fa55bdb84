import csv
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.models import ConvNet

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return ConvNet()


def randomize(model: nn.Module, std: float = 0.1) -> None:
    """Give every adapter non-zero A and B, so it changes the output."""
    from lorakit import LoraAdapter

    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraAdapter):
                m.lora_a.copy_(torch.randn(m.lora_a.shape, generator=g) * std)
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * std)


@pytest.fixture(scope="session")
def minilm_dir():
    from lorakit.hub import minilm_dir

    return minilm_dir()


@pytest.fixture
def minilm(minilm_dir):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def smollm2_dir():
    from lorakit.hub import smollm2_dir

    return smollm2_dir()


@pytest.fixture
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


def make_tiny_llama(width: int = 32) -> nn.Module:
    """A 2-layer random Llama `width` wide (FFN 2×), vocabulary 120, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=120, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class Nested(nn.Module):
    """Layers whose names trip a loose pattern: "fc" is also the end of "block.fc", and "a.b" read as a
    regex also matches "a_b"."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.block = nn.Sequential()
        self.block.add_module("fc", nn.Linear(8, 8))
        self.a = nn.Sequential()
        self.a.add_module("b", nn.Linear(8, 8))
        self.a_b = nn.Linear(8, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(12))

    def forward(self, x):
        return self.a_b(self.a.b(self.block.fc(self.fc(x)))) + sum(layer(x) for layer in self.layers)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def plain_state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, state: dict) -> None:
    """The model has no LoRA layers and the same tensors as `state`."""
    from lorakit import LoraLayer, SavedModule

    assert not any(isinstance(m, (LoraLayer, SavedModule)) for m in model.modules())
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


WORDS = {"good": "a wonderful moving film, I loved every minute",
         "bad": "a dull tedious mess, I hated every minute",
         "meh": "an average film, some parts fine and some parts not"}


def write_reviews(path: Path) -> Path:
    """A 3-class CSV (columns review, verdict) of 96 short reviews."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "verdict"])
        for i in range(96):
            label = list(WORDS)[i % 3]
            w.writerow([f"{WORDS[label]} (number {i})", label])
    return path


def save_tiny_bert(path: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer BERT 32 wide without dropout, 64 positions, with MiniLM's tokenizer, as a Hugging Face directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reviews(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.csv")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_dir):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_dir)


def hook_shapes(model: nn.Module, example) -> dict[str, list[tuple[set, set]]]:
    """Independently of the tracer: every module call's (input shapes, output shapes), by forward hooks."""
    calls: dict[str, list[tuple[set, set]]] = {}
    names = {m: n for n, m in model.named_modules()}

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, dict):
            return [t for v in x.values() for t in tensors(v)]
        if isinstance(x, (tuple, list)):
            return [t for v in x for t in tensors(v)]
        return [t for v in getattr(x, "__dict__", {}).values() for t in tensors(v)] if hasattr(x, "to_tuple") else []

    def hook(m, args, kwargs, out):
        ins = {tuple(t.shape) for t in tensors(args) + tensors(kwargs)}
        calls.setdefault(names[m], []).append((ins, {tuple(t.shape) for t in tensors(out)}))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad():
            model(**example) if isinstance(example, dict) else model(example)
    finally:
        for h in handles:
            h.remove()
    return calls


def bert_example(vocab: int = 1000, length: int = 10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}

"""The training data layer: loaders, splits, blocks, image sets and batching."""

import bz2
import gzip
import io
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.train.data import (
    FASHION_MNIST_DIR, DataError, TextExample, causal_blocks, length_grouped_batches, load_cifar10,
    load_fashion_mnist, load_text_classification, load_text_file, pad_batch, split_blocks, split_by_hash,
    tokenize_texts,
)

CSV = 'text,label,source\n"Fine, I guess.",neutral,a\nLoved it,positive,b\n"He said ""no""",negative,c\nMeh,neutral,d\n'


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rotten():
    return load_text_classification(None)


# --- text classification files ---------------------------------------------------------------------


def test_csv_with_string_labels(tmp_path):
    examples, names = load_text_classification(write(tmp_path / "d.csv", CSV))
    assert names == ["negative", "neutral", "positive"]
    assert examples == [TextExample("Fine, I guess.", 1), TextExample("Loved it", 2),
                        TextExample('He said "no"', 0), TextExample("Meh", 1)]


def test_tsv_keeps_quotes_and_sorts_integer_labels_numerically(tmp_path):
    path = write(tmp_path / "d.tsv", 'sentence\ty\n"Quoted" start\t10\nplain\t2\nagain\t10\n')
    examples, names = load_text_classification(path, text_column="sentence", label_column="y")
    assert names == ["2", "10"]
    assert examples == [TextExample('"Quoted" start', 1), TextExample("plain", 0), TextExample("again", 1)]


def test_jsonl_with_int_labels(tmp_path):
    rows = [{"text": "a", "label": 2, "id": 7}, {"text": "b", "label": 0}, {"text": "c", "label": 1}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples, names = load_text_classification(path)
    assert names == ["0", "1", "2"]
    assert [e.label for e in examples] == [2, 0, 1]


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".bz2", bz2.open)])
def test_compressed_csv(tmp_path, suffix, opener):
    path = tmp_path / f"d.csv{suffix}"
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(CSV)
    assert load_text_classification(path) == load_text_classification(write(tmp_path / "d.csv", CSV))


def test_empty_texts_are_dropped(tmp_path):
    examples, names = load_text_classification(write(tmp_path / "d.csv", "text,label\n,x\n  ,x\nhi,y\nho,z\n"))
    assert examples == [TextExample("hi", 0), TextExample("ho", 1)] and names == ["y", "z"]


@pytest.mark.parametrize("name, content, kwargs, message", [
    ("d.txt", "text,label\na,b\n", {}, r"unsupported data file .*d\.txt.*\.csv, \.tsv, \.jsonl, \.json"),
    ("d.csv", CSV, {"text_column": "review"},
     r"no text column 'review'; columns present: \['text', 'label', 'source'\]"),
    ("d.csv", CSV, {"label_column": "y"}, r"no label column 'y'"),
    ("d.csv", "text,label\n", {}, r"d\.csv: no rows"),
    ("d.csv", "text,label\n,a\n  ,b\n", {}, r"all 2 rows have empty text in column 'text'"),
    ("d.csv", "text,y\na,pos\nb,pos\n", {"label_column": "y"},
     r"label column 'y' has one class \('pos'\); classification needs at least 2"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', {}, r"d\.jsonl: line 2 is not valid JSON"),
    ("d.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', {}, r"line 2 is a JSON list, expected an object"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n', {},
     r"line 2: label column 'label' must hold a string or an integer, got 0\.5"),
    ("d.csv", "text,label\na,x\nb,\n", {}, r"line 3: empty label in column 'label'"),
])
def test_text_classification_errors(tmp_path, name, content, kwargs, message):
    with pytest.raises(DataError, match=message):
        load_text_classification(write(tmp_path / name, content), **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.csv"):
        load_text_classification(tmp_path / "nope.csv")


def test_rotten_tomatoes_default(rotten):
    examples, names = rotten
    assert len(examples) == 12_808 and names == ["negative", "positive"]
    assert {e.label for e in examples} == {0, 1}


# --- splits -----------------------------------------------------------------------------------------


def test_split_by_hash_is_fixed_and_honours_fractions(rotten):
    examples, _ = rotten
    train, val, test = split_by_hash(examples, key=lambda e: e.text)
    assert len(train) + len(val) + len(test) == len(examples)
    for part, fraction in ((train, 0.8), (val, 0.1), (test, 0.1)):
        assert abs(len(part) / len(examples) - fraction) < 0.02
    assert split_by_hash(examples, key=lambda e: e.text) == (train, val, test)
    reversed_parts = split_by_hash(examples[::-1], key=lambda e: e.text)
    assert [set(p) for p in reversed_parts] == [set(train), set(val), set(test)]
    texts = [{e.text for e in p} for p in (train, val, test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


def test_split_by_hash_keeps_duplicates_together():
    items = [f"text {i % 50}" for i in range(500)]
    parts = split_by_hash(items, key=str, fractions=(0.5, 0.25, 0.25))
    assert all(items.count(x) == p.count(x) for p in parts for x in set(p))


@pytest.mark.parametrize("fractions, message", [
    ((0.8, 0.2), r"fractions must be 3 numbers"),
    ((0.9, -0.1, 0.2), r"validation fraction must be a number in \[0, 1\], got -0.1"),
    ((0.8, 0.1, "0.1"), r"test fraction must be a number in \[0, 1\], got '0.1'"),
    ((0.8, 0.1, 0.2), r"fractions must sum to 1, got \(0.8, 0.1, 0.2\)"),
])
def test_bad_fractions(fractions, message):
    with pytest.raises(DataError, match=message):
        split_by_hash(["a"], key=str, fractions=fractions)


# --- causal LM --------------------------------------------------------------------------------------


def test_causal_blocks_drop_the_tail():
    blocks = causal_blocks(list(range(11)), block_size=3)
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert causal_blocks(torch.arange(12, dtype=torch.int32), 4).shape == (3, 4)


def test_causal_blocks_errors():
    with pytest.raises(DataError, match="5 tokens are fewer than one block of 8"):
        causal_blocks([1, 2, 3, 4, 5], 8)
    with pytest.raises(DataError, match="block_size must be a positive integer, got 0"):
        causal_blocks([1, 2, 3], 0)


def test_split_blocks_is_contiguous():
    blocks = causal_blocks(list(range(1000)), 10)
    train, val, test = split_blocks(blocks)
    assert (len(train), len(val), len(test)) == (90, 5, 5)
    assert torch.equal(torch.cat([train, val, test]), blocks)
    assert train.max() < val.min() and val.max() < test.min()
    assert [len(p) for p in split_blocks(blocks[:3])] == [1, 1, 1]
    with pytest.raises(DataError, match="2 blocks are too few"):
        split_blocks(blocks[:2])


def test_load_text_file(tmp_path):
    assert load_text_file(write(tmp_path / "t.txt", "To be, or not to be\n")) == "To be, or not to be\n"
    with pytest.raises(DataError, match=r"text file is empty: .*e\.txt"):
        load_text_file(write(tmp_path / "e.txt", " \n"))
    with pytest.raises(DataError, match=r"text file not found: .*none\.txt"):
        load_text_file(tmp_path / "none.txt")


# --- images -----------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> None:
    header = struct.pack(">I", magic if magic is not None else 0x800 + array.ndim)
    header += b"".join(struct.pack(">I", n) for n in array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root: Path, n: int = 4) -> np.ndarray:
    images = np.arange(n * 28 * 28).reshape(n, 28, 28) % 256
    for prefix, gz in (("train", True), ("t10k", False)):
        write_idx(root / (f"{prefix}-images-idx3-ubyte" + ".gz" * gz), images, gz=gz)
        write_idx(root / (f"{prefix}-labels-idx1-ubyte" + ".gz" * gz), np.arange(n) % 10, gz=gz)
    return images


def test_fashion_mnist_from_idx_files(tmp_path):
    images = fake_fashion_mnist(tmp_path)
    data = load_fashion_mnist(tmp_path)
    assert data.train_x.shape == data.test_x.shape == (4, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    torch.testing.assert_close(data.test_x[:, 0], torch.tensor(images / 255, dtype=torch.float32))
    assert data.train_y.tolist() == [0, 1, 2, 3]


def test_fashion_mnist_bad_files(tmp_path):
    fake_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4), magic=0x803)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: bad IDX magic number 0x00000803; expected 0x00000801"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 5) + bytes(4))
    with pytest.raises(DataError, match=r"header says shape \(5,\) \(5 bytes\) but the file holds 4"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="neither t10k-labels-idx1-ubyte nor t10k-labels-idx1-ubyte.gz found"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(DataError, match="Fashion-MNIST folder not found: .*dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "absent")


def test_fashion_mnist_installed():
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} is absent (Debian package dataset-fashion-mnist)")
    data = load_fashion_mnist()
    assert data.train_x.shape == (60_000, 1, 28, 28) and data.test_x.shape == (10_000, 1, 28, 28)
    assert data.train_y.shape == (60_000,) and data.test_y.shape == (10_000,)
    assert data.train_x.min() == 0 and data.train_x.max() == 1
    assert len(data.classes) == 10 and set(data.train_y.tolist()) == set(range(10))


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), the way the CIFAR-10 batches were pickled."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj: object) -> bytes:
    """A protocol-2 pickle like Python 2's: byte-string keys, numpy 1.x's module name for _reconstruct."""
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def fake_cifar(root: Path, dumps) -> np.ndarray:
    """Five training batches of 2 images and a test batch of 2, in 2 classes; returns the test pixels."""
    root.mkdir()
    (root / "batches.meta").write_bytes(dumps({b"label_names": [b"cat", b"dog"], b"num_vis": 3072}))
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = ((np.arange(2 * 3072) + i) % 256).astype(np.uint8).reshape(2, 3072)
        (root / name).write_bytes(dumps({b"batch_label": b"batch", b"data": data, b"labels": [0, 1]}))
    return data


@pytest.mark.parametrize("dumps", [py2_pickle, pickle.dumps], ids=["python2-style", "python3"])
def test_cifar10_from_pickles(tmp_path, dumps):
    test_pixels = fake_cifar(tmp_path / "cifar", dumps)
    data = load_cifar10(tmp_path / "cifar")
    assert data.classes == ["cat", "dog"]
    assert data.train_x.shape == (10, 3, 32, 32) and data.test_x.shape == (2, 3, 32, 32)
    assert data.train_x.dtype == torch.float32 and data.train_y.tolist() == [0, 1] * 5
    assert data.test_x[1, 2, 3, 4] == test_pixels[1, 2 * 1024 + 3 * 32 + 4] / 255  # R, G, B planes, row-major


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    fake_cifar(tmp_path / "cifar", pickle.dumps)
    marker = tmp_path / "ran"
    (tmp_path / "cifar" / "test_batch").write_bytes(pickle.dumps({"data": RunsACommand(marker)}))
    with pytest.raises(DataError, match=rf"test_batch: refusing to unpickle the global {os.system.__module__}\.system"):
        load_cifar10(tmp_path / "cifar")
    assert not marker.exists()


def test_cifar10_bad_batches(tmp_path):
    fake_cifar(tmp_path / "cifar", pickle.dumps)
    (tmp_path / "cifar" / "data_batch_3").write_bytes(pickle.dumps({"data": np.zeros((2, 10)), "labels": [0, 1]}))
    with pytest.raises(DataError, match=r"data_batch_3: 'data' must be a uint8 array of shape \(N, 3072\), got float64"):
        load_cifar10(tmp_path / "cifar")
    (tmp_path / "cifar" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3: not a readable CIFAR-10 pickle"):
        load_cifar10(tmp_path / "cifar")
    (tmp_path / "cifar" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="CIFAR-10 file not found: .*data_batch_3"):
        load_cifar10(tmp_path / "cifar")


# --- batching ---------------------------------------------------------------------------------------


def spread(batches: list[list[int]], lengths: list[int]) -> float:
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)


def test_length_grouped_batches():
    lengths = torch.randint(1, 513, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    batches = length_grouped_batches(lengths, batch_size=16, seed=3, epoch=0)
    assert batches == length_grouped_batches(lengths, batch_size=16, seed=3, epoch=0)
    assert batches != length_grouped_batches(lengths, batch_size=16, seed=3, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(4000))
    assert all(len(b) == 16 for b in batches)
    in_order = [list(range(i, i + 16)) for i in range(0, 4000, 16)]
    assert spread(batches, lengths) < 0.1 * spread(in_order, lengths)
    for_eval = length_grouped_batches(lengths, batch_size=16, seed=3, epoch=0, shuffle=False)
    assert sorted(i for b in for_eval for i in b) == list(range(4000))
    flat = [lengths[i] for b in for_eval for i in b]
    assert flat == sorted(lengths, reverse=True)


def test_length_grouped_batches_short_batch_last():
    batches = length_grouped_batches([5] * 103, batch_size=10, seed=0, epoch=2, group_factor=3)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert length_grouped_batches([1, 3, 3], batch_size=2, seed=0, epoch=0, shuffle=False) == [[1, 2], [0]]


def test_pad_batch():
    input_ids, mask = pad_batch([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert input_ids.dtype == mask.dtype == torch.int64


def test_tokenize_texts(minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    ids = tokenize_texts(tokenizer, ["a short one", "a much longer sentence " * 20], max_length=16)
    assert len(ids[0]) < 16 and len(ids[1]) == 16
    assert ids[0][0] == tokenizer.cls_token_id and ids[1][-1] == tokenizer.sep_token_id

"""The data layer of training: read a data set, split it, batch it. No model code.

Three kinds of data:

- text classification: CSV, TSV or JSON Lines files (or the packaged Rotten Tomatoes reviews), split
  train/validation/test by a hash of each text, batched by similar length;
- causal LM: one text file, tokenized and cut into fixed blocks, split into contiguous stretches;
- images: Fashion-MNIST (IDX files) or CIFAR-10 (python pickles, read by a restricted unpickler).

Every bad input raises `DataError`, naming the file or value and what was expected.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import json
import math
import numbers
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from .. import hub

T = TypeVar("T")

TEXT_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")
COMPRESSED_EXTENSIONS = {".gz": gzip.open, ".bz2": bz2.open}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))

TextExample = hub.Example
"""One labelled text: `text: str`, `label: int` in 0..K-1 (the same class as `hub.Example`)."""


class DataError(ValueError):
    """A data file or data argument is missing, malformed or unusable."""


# ---------------------------------------------------------------------------------------------------
# Text classification


def load_text_classification(path: str | Path | None, text_column: str = "text", label_column: str = "label",
                             names: list[str] | None = None) -> tuple[list[TextExample], list[str]]:
    """Read labelled texts; return the examples and the label names (index = label id).

    path None gives the packaged Rotten Tomatoes reviews, labelled ["negative", "positive"]. Otherwise
    the extension picks the format: .csv, .tsv (tab-separated, no quoting), .jsonl or .json (JSON Lines:
    one object per line), each optionally compressed as .gz or .bz2. Files are read as UTF-8.

    Labels may be strings or integers. The distinct values, sorted (numerically when all are integers),
    become the ids 0..K-1, and their string forms the returned names; given `names` (a training file's), the
    labels must be among them and take their ids. Rows whose text is empty or only whitespace are dropped;
    if no row has text, that is an error.
    """
    if path is None:
        return hub.rotten_tomatoes(), list(hub.SENTIMENT_LABELS)
    path = Path(path)
    rows = _labelled_rows(path, text_column, label_column)
    texts = [text for _, text, _ in rows]
    labels = [key for _, _, key in rows]
    numeric = all(re.fullmatch(r"[+-]?\d+", k) for k in (names if names is not None else labels))
    if numeric:
        labels = [str(int(k)) if re.fullmatch(r"[+-]?\d+", k) else k for k in labels]
    if names is None:
        names = sorted(set(labels), key=int) if numeric else sorted(set(labels))
        if len(names) < 2:
            raise DataError(f"{path}: label column {label_column!r} has one class ({names[0]!r}); "
                            f"classification needs at least 2")
    index = {name: i for i, name in enumerate(names)}
    unknown = next(((line, k) for (line, _, _), k in zip(rows, labels) if k not in index), None)
    if unknown:
        raise DataError(f"{path}: line {unknown[0]}: label {unknown[1]!r} is not one of the training labels "
                        f"({', '.join(names[:10])})")
    return [TextExample(t, index[k]) for t, k in zip(texts, labels)], list(names)


def _labelled_rows(path: Path, text_column: str, label_column: str | None) -> list[tuple[int, str, str | None]]:
    """(line, text, label key) of each row of a data file with text; label None when not asked for."""
    if not path.is_file():
        raise DataError(f"data file {path} is a folder" if path.is_dir() else f"data file not found: {path}")
    opener, kind = _text_format(path)
    columns, rows = _read_rows(path, opener, kind)
    if not rows:
        raise DataError(f"{path}: no rows")
    for role, name in (("text", text_column), ("label", label_column)):
        if name is not None and name not in columns:
            raise DataError(f"{path}: no {role} column {name!r}; columns present: {columns}")
    out = []
    for line, row in rows:
        text = row.get(text_column)
        if text is None or (isinstance(text, str) and not text.strip()):
            continue
        if not isinstance(text, str):
            raise DataError(f"{path}: line {line}: text column {text_column!r} must hold a string, got {text!r}")
        key = None if label_column is None else _label_key(row.get(label_column), path, line, label_column)
        out.append((line, text, key))
    if not out:
        raise DataError(f"{path}: all {len(rows)} rows have empty text in column {text_column!r}")
    return out


def read_texts(path: str | Path, text_column: str = "text") -> list[str]:
    """The texts of a file to label: the text column of a CSV/TSV/JSONL file (as `load_text_classification`
    reads them, no label needed), or else every non-empty line of a UTF-8 text file."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_EXTENSIONS:
        suffixes.pop()
    if suffixes and suffixes[-1] in TEXT_EXTENSIONS:
        return [text for _, text, _ in _labelled_rows(path, text_column, None)]
    return [line for line in read_text(path, "file").splitlines() if line.strip()]


def _text_format(path: Path) -> tuple[Callable[..., Any], str]:
    """The opener (open, gzip.open or bz2.open) and the format extension of a data file."""
    suffixes = [s.lower() for s in path.suffixes]
    opener = COMPRESSED_EXTENSIONS.get(suffixes[-1]) if suffixes else None
    if opener is not None:
        suffixes.pop()
    kind = suffixes[-1] if suffixes else ""
    if kind not in TEXT_EXTENSIONS:
        raise DataError(f"unsupported data file {path} (extension {''.join(path.suffixes)!r}); expected one of "
                        f"{', '.join(TEXT_EXTENSIONS)}, optionally followed by {' or '.join(COMPRESSED_EXTENSIONS)}")
    return opener or open, kind


def _read_rows(path: Path, opener: Callable[..., Any], kind: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """The column names, and each row with its line number."""
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            if kind in (".csv", ".tsv"):
                return _read_delimited(f, path, kind)
            return _read_json_lines(f, path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _read_delimited(f: Any, path: Path, kind: str) -> tuple[list[str], list[tuple[int, dict]]]:
    # TSV as usually written has no quoting, so a quote character in a text is kept as is.
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == ".tsv" else {}
    reader = csv.DictReader(f, **options)
    try:
        columns = list(reader.fieldnames or [])
        return columns, [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: {e}") from e


def _read_json_lines(f: Any, path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    columns: dict[str, None] = {}
    rows = []
    for line, content in enumerate(f, start=1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {line} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line} is a JSON {type(record).__name__}, expected an object "
                            f"(JSON Lines: one object per line)")
        columns.update(dict.fromkeys(record))
        rows.append((line, record))
    return list(columns), rows


def _label_key(value: object, path: Path, line: int, column: str) -> str:
    """A label as a stripped string; integers keep their decimal form."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{path}: line {line}: label column {column!r} must hold a string or an integer, "
                        f"got {value!r}")
    key = str(value).strip()
    if not key:
        raise DataError(f"{path}: line {line}: empty label in column {column!r}")
    return key


# ---------------------------------------------------------------------------------------------------
# Splits


def split_by_hash(items: list[T], key: Callable[[T], str],
                  fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[list[T], list[T], list[T]]:
    """Split into (train, validation, test) by a hash of each item's key.

    An item with u = blake2b(key) / 2**64 in [0, 1) goes to train if u < f_train, else to validation if
    u < f_train + f_val, else to test. The split of an item depends on its key alone: it is the same on
    every run and machine, whatever the order or the other items, and equal keys share a split. The
    fractions hold in expectation, not exactly. Each split keeps the input order.
    """
    train_f, val_f, _ = _check_fractions(fractions)
    splits: tuple[list[T], list[T], list[T]] = ([], [], [])
    for item in items:
        digest = hashlib.blake2b(key(item).encode("utf-8"), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64
        splits[0 if u < train_f else 1 if u < train_f + val_f else 2].append(item)
    return splits


def split_blocks(blocks: Tensor, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> tuple[Tensor, Tensor, Tensor]:
    """Split (N, block_size) blocks into contiguous (train, validation, test) stretches, in that order.

    The blocks do not overlap, so no held-out token is also a training token. A non-zero validation or
    test fraction gets at least one block; train gets the rest. Returns views of `blocks`.
    """
    _, val_f, test_f = _check_fractions(fractions)
    if blocks.ndim != 2:
        raise DataError(f"blocks must have shape (N, block_size), got {tuple(blocks.shape)}")
    n = len(blocks)
    n_val, n_test = (max(1, round(n * f)) if f > 0 else 0 for f in (val_f, test_f))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"{n} blocks are too few to split by fractions {tuple(fractions)}: "
                        f"{n_val} validation and {n_test} test blocks leave none to train on")
    return blocks[:n_train], blocks[n_train:n_train + n_val], blocks[n_train + n_val:]


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(fractions)
    if len(values) != 3:
        raise DataError(f"fractions must be 3 numbers (train, validation, test), got {fractions!r}")
    for name, value in zip(("train", "validation", "test"), values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
            raise DataError(f"{name} fraction must be a number in [0, 1], got {value!r}")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise DataError(f"fractions must sum to 1, got {values} (sum {sum(values):g})")
    return float(values[0]), float(values[1]), float(values[2])


# ---------------------------------------------------------------------------------------------------
# Causal LM


def read_text(path: str | Path, what: str = "text file", error: type[Exception] = DataError) -> str:
    """The whole of a UTF-8 text file; `error`, naming `what` and the path, when it is missing, a folder,
    unreadable or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} is a folder, not a file" if path.is_dir() else f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"cannot read {what} {path} ({e.strerror or e})") from None


def load_text_file(path: str | Path) -> str:
    """The whole of a UTF-8 text file, which must not be empty."""
    text = read_text(path)
    if not text.strip():
        raise DataError(f"text file is empty: {path}")
    return text


def causal_blocks(token_ids: list[int] | Tensor, block_size: int) -> Tensor:
    """Cut a token stream into consecutive, non-overlapping blocks; the tail shorter than a block is dropped.

    token_ids: (L,). Returns (L // block_size, block_size) int64, a copy.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise DataError(f"block_size must be a positive integer, got {block_size!r}")
    ids = torch.as_tensor(token_ids, dtype=torch.int64)
    if ids.ndim != 1:
        raise DataError(f"token_ids must be one flat sequence, got shape {tuple(ids.shape)}")
    n = len(ids) // block_size
    if n == 0:
        raise DataError(f"{len(ids)} tokens are fewer than one block of {block_size}")
    return ids[:n * block_size].reshape(n, block_size).clone()


# ---------------------------------------------------------------------------------------------------
# Images


@dataclass
class ImageData:
    """An image classification set, pixels scaled to [0, 1].

    train_x: (N, C, H, W) float32; train_y: (N,) int64 in 0..len(classes)-1; test_x, test_y likewise.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> ImageData:
    """Fashion-MNIST from its four IDX files (plain or .gz), as installed by Debian's dataset-fashion-mnist.

    Returns 60,000 training and 10,000 test images of shape (1, 28, 28).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder not found: {root}; install the Debian package "
                        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    parts = []
    for prefix in ("train", "t10k"):
        images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"), ndim=3)
        labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"), ndim=1)
        if len(images) != len(labels):
            raise DataError(f"{root}: {prefix} has {len(images)} images but {len(labels)} labels")
        parts += [_pixels(images[:, None]), _labels(labels, len(FASHION_MNIST_CLASSES), root / prefix)]
    return ImageData(*parts, classes=list(FASHION_MNIST_CLASSES))


def _find_idx(root: Path, name: str) -> Path:
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            return path
    raise DataError(f"{root}: neither {name} nor {name}.gz found")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes: magic 0x0000080{ndim}, ndim big-endian uint32 sizes, then the data."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    magic, expected = int.from_bytes(data[:4], "big"), 0x800 + ndim
    if len(data) < 4 or magic != expected:
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08x}; expected 0x{expected:08x} "
                        f"(unsigned bytes, {ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, expected {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != math.prod(shape):
        raise DataError(f"{path}: IDX header says shape {shape} ({math.prod(shape)} bytes) "
                        f"but the file holds {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_cifar10(root: str | Path) -> ImageData:
    """CIFAR-10 in its python format: data_batch_1..5, test_batch and batches.meta under `root`.

    The batches are pickles; they are read by an unpickler that accepts only the globals a pickled
    numpy array needs (see `_ArrayUnpickler`). Returns 50,000 training and 10,000 test images of
    shape (3, 32, 32).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"CIFAR-10 folder not found: {root}")
    meta = _unpickle(root / "batches.meta")
    classes = _field(meta, "label_names", root / "batches.meta")
    if not isinstance(classes, list) or not all(isinstance(c, (str, bytes)) for c in classes):
        raise DataError(f"{root / 'batches.meta'}: 'label_names' must be a list of strings, got {classes!r}")
    classes = [c.decode() if isinstance(c, bytes) else c for c in classes]
    train = [_cifar_batch(root / name, len(classes)) for name in CIFAR10_TRAIN_BATCHES]
    test_x, test_y = _cifar_batch(root / "test_batch", len(classes))
    train_x = np.concatenate([x for x, _ in train])
    return ImageData(_pixels(train_x), torch.cat([y for _, y in train]), _pixels(test_x), test_y, classes)


def _cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, Tensor]:
    """Images (N, 3, 32, 32) uint8 (each row of 3072 bytes is R, G, B planes, row-major) and labels (N,)."""
    batch = _unpickle(path)
    data, labels = _field(batch, "data", path), _field(batch, "labels", path)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(type(y) is int for y in labels):
        raise DataError(f"{path}: 'labels' must be a list of {len(data)} integers")
    return data.reshape(-1, 3, 32, 32), _labels(np.array(labels), num_classes, path)


def _field(obj: object, key: str, path: Path) -> Any:
    """obj[key], for a dict keyed by str or, as Python 2 pickles may be, by bytes."""
    if isinstance(obj, dict):
        for k in (key, key.encode()):
            if k in obj:
                return obj[k]
    keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
    raise DataError(f"{path}: expected a dict with key {key!r}, got {keys}")


def _unpickle(path: Path) -> object:
    if not path.is_file():
        raise DataError(f"CIFAR-10 file not found: {path}")
    with path.open("rb") as f:
        try:
            return _ArrayUnpickler(f, path).load()
        except DataError:
            raise
        except Exception as e:  # a damaged pickle fails in many ways; the restricted unpickler runs no code
            raise DataError(f"{path}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from None


_reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,   # numpy 1.x, and the CIFAR-10 files
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, and refuses every other global, so no code can run.

    Strings pickled by Python 2 (as CIFAR-10 was) are decoded as latin-1, the decoding numpy expects
    for the raw bytes of a Python 2 array.
    """

    def __init__(self, file: Any, path: Path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            allowed = ", ".join(f"{m}.{n}" for m, n in _SAFE_GLOBALS)
            raise DataError(f"{self.path}: refusing to unpickle the global {module}.{name}; allowed: {allowed}")
        return _SAFE_GLOBALS[module, name]


def _pixels(images: np.ndarray) -> Tensor:
    """(N, C, H, W) uint8 → float32 in [0, 1]."""
    return torch.tensor(images).to(torch.float32).div_(255)


def _labels(labels: np.ndarray, num_classes: int, where: Path) -> Tensor:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{where}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}")
    return torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------------
# Batching text


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The RNG that orders an epoch's data: a function of (seed, epoch) alone, so a resumed run sees
    the same order, and distinct for every pair (seed 1 epoch 0 is not seed 0 epoch 1)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Consecutive batches of a permutation of range(n) (or of range(n) itself without shuffle)."""
    order = torch.randperm(n, generator=epoch_generator(seed, epoch)) if shuffle else torch.arange(n)
    return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           group_factor: int = 50, shuffle: bool = True) -> list[list[int]]:
    """The batches of one epoch, as lists of indices into `lengths`; each index appears exactly once.

    With shuffle: a permutation drawn from `epoch_generator(seed, epoch)` is cut into groups of
    batch_size * group_factor; each group is sorted by length (longest first) and cut into batches, so
    a batch holds texts of similar length and pads little; the full batches are then shuffled with the
    same generator and the one short batch, if any, comes last. The result depends only on
    (lengths, batch_size, seed, epoch, group_factor), so a resumed run can skip the batches it has done.

    Without shuffle, for evaluation: every index sorted by length, longest first (ties in index order), so
    the evaluation batches pad as little as possible and the first batch shows the peak memory at once.
    """
    for name, value in (("batch_size", batch_size), ("group_factor", group_factor)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]

    generator = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=generator).tolist()
    group_size = batch_size * group_factor
    batches = []
    for start in range(0, n, group_size):
        group = sorted(order[start:start + group_size], key=lambda i: lengths[i], reverse=True)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    short = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + short


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token sequences to the longest one.

    Returns input_ids (B, T_max) int64 and attention_mask (B, T_max) int64: 1 on tokens, 0 on padding.
    """
    if not sequences:
        raise DataError("pad_batch needs at least one sequence, got none")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = torch.as_tensor(sequence, dtype=torch.int64)
        attention_mask[row, :len(sequence)] = 1
    return input_ids, attention_mask


def tokenize_texts(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to max_length, unpadded: one call to a Hugging Face tokenizer."""
    if not texts:
        return []
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    return [list(ids) for ids in encoded["input_ids"]]

"""safetensors files that carry their own checksum, read without ever unpickling.

`dumps` puts a sha256 of the tensors (each name, dtype, shape and bytes, in name order) into the file's
header metadata under `lorakit.sha256`; `loads` recomputes it and refuses a file whose tensors changed
after writing. The digest is over the tensors, not the bytes of the file, so it does not depend on how
safetensors lays the file out. `check_file` reads only a header and the file size: enough to tell a
complete file from a truncated one without loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load as _load
from safetensors.torch import save as _save

DIGEST_KEY = "lorakit.sha256"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEADER = 100 * 2**20


class TensorFileError(ValueError):
    """A safetensors file that is truncated, corrupt, or whose tensors do not match its checksum."""


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None: first the sum of each
    tensor (finite sums mean finite values; a sum that overflows only sends the check on), then tensor by
    tensor, exactly, to name the culprit."""
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors.values():
        if t.is_floating_point() and t.numel():
            sums.setdefault(t.device, []).append(t.sum(dtype=torch.float32))
    if all(bool(torch.stack(group).isfinite().all()) for group in sums.values()):
        return None
    return next((n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def dumps(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding `tensors` (on the CPU, contiguous) and their digest.

    Tensors that share memory are written as separate copies."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        key = t.untyped_storage().data_ptr()
        out[name] = t.clone() if key in seen and t.numel() else t
        seen.add(key)
    meta = {"format": "pt", **(metadata or {}), DIGEST_KEY: digest(out)}
    return _save(out, metadata=meta)


def header(blob: bytes, where: str = "file") -> tuple[dict, int]:
    """The parsed header of safetensors bytes and where the data starts."""
    if len(blob) < 8:
        raise TensorFileError(f"{where} is truncated ({len(blob)} bytes; a safetensors file starts with an 8-byte header size)")
    n = int.from_bytes(blob[:8], "little")
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise TensorFileError(f"{where} is truncated or not safetensors (header of {n} bytes in a file of {len(blob)})")
    try:
        head = json.loads(blob[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TensorFileError(f"{where} is not safetensors (its header is not JSON)") from None
    if not isinstance(head, dict):
        raise TensorFileError(f"{where} is not safetensors (its header is not a JSON object)")
    return head, 8 + n


def metadata(blob: bytes, where: str = "file") -> dict[str, str]:
    meta = header(blob, where)[0].get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def loads(blob: bytes, where: str = "file", require_digest: bool = False,
          check_digest: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of safetensors bytes. A file with a digest must match it (unless `check_digest` is
    False: the caller has checked the whole file's bytes against a hash of its own); `require_digest` refuses
    one without."""
    meta = metadata(blob, where)
    try:
        tensors = _load(blob)
    except Exception as e:  # safetensors raises its own error types for a bad header or short data
        raise TensorFileError(f"{where} is truncated or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    expected = meta.get(DIGEST_KEY)
    if expected is None and require_digest:
        raise TensorFileError(f"{where} has no checksum ({DIGEST_KEY}); it was not written by lorakit or was altered")
    if expected is not None and check_digest and digest(tensors) != expected:
        raise TensorFileError(f"{where} does not match its checksum: its tensors changed after it was written")
    return tensors, meta


def read(path: str | os.PathLike, require_digest: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise TensorFileError(f"cannot read {path} ({e.strerror or e})") from None
    return loads(blob, str(path), require_digest)


def check_file(path: str | os.PathLike) -> dict:
    """Refuse a safetensors file that is truncated or whose header is inconsistent, reading only its
    header; return the header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            start = f.read(8)
            n = int.from_bytes(start, "little") if len(start) == 8 else -1
            blob = start + (f.read(n) if 0 <= n <= _MAX_HEADER else b"")
        size = path.stat().st_size
    except OSError as e:
        raise TensorFileError(f"cannot read {path} ({e.strerror or e})") from None
    head, data_start = header(blob, str(path))
    end = 0
    for name, entry in head.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise TensorFileError(f"{path} is not safetensors (tensor {name!r} has no data offsets)")
        end = max(end, offsets[1])
    if data_start + end != size:
        raise TensorFileError(f"{path} is truncated or corrupt: its header describes {data_start + end:,} bytes, "
                              f"the file holds {size:,}")
    return head

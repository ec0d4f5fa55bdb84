"""Adapter files: only the adapter's tensors, in safetensors, with a versioned JSON config.

A directory holds `adapter_model.safetensors` and `adapter_config.json`, in lorakit's own format or
in Hugging Face PEFT's (both are read; `load_adapter` tells them apart by the config). A directory is
written whole under a temporary name and swapped in (`atomic.write_dir`), so it always holds a complete
adapter, the old one or the new; files are never unpickled.

Integrity: the weights file's header metadata carries a digest of its tensors, the base model's fingerprint
and a digest of the settings that change what the adapter computes (each layer's rank, scale and slices,
the modules trained in full, the trained biases, the base), so a file whose tensors or whose config were
changed after saving is refused — PEFT reads the same file and ignores the metadata. lorakit's config also
holds the sha256 of the whole weights file.

Tensor keys, lorakit format: `{layer}.lora_a`, `{layer}.lora_b`, `{layer}.magnitude` (DoRA), `{module}.{param}`
for a module in `modules_to_save`, `{module}.bias` for biases trained under `bias="all"`/`"lora_only"`.
PEFT format: the same under `base_model.model.`, with `lora_A.weight`/`lora_B.weight` (Embedding:
`lora_embedding_A`/`lora_embedding_B`) and `lora_magnitude_vector`, as PEFT's `save_pretrained` writes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections import Counter
from copy import deepcopy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from . import atomic, residual, tensorfile
from .adapters import check_name, freeze_base, holders, list_adapters
from .digest import base_digest, weight_digest
from .inject import Plan, apply_plan, check_plan, freeze
from .layers import (Geometry, LoraAdapter, LoraConfig, LoraLayer, SavedModule, Slices, adapter_home, base_of,
                     kind_of)
from .quant import dequantize, is_quantized, nf4_roundtrip
from .targets import check_slices, matches_suffix, pattern_key

FORMAT_VERSION = "1.1"  # 1.1: the weights file's metadata carries the settings digest
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin")  # what a save replaces (PEFT may have left a .bin)
BASE_KEY, SETTINGS_KEY = "lorakit.base", "lorakit.settings"  # in the weights file's header metadata
PEFT_PREFIX = "base_model.model."
PEFT_ALPHA = 8  # PEFT's LoraConfig.lora_alpha when a config leaves it out
_NATIVE_KEYS = {"format_version", "library", "lorakit_version", "adapter", "lora", "layers", "modules_to_save",
                "biases", "base", "weights_sha256"}
_PEFT_UNSUPPORTED = {"lora_bias": False, "target_parameters": None, "layer_replication": None,
                     "layers_to_transform": None, "trainable_token_indices": None, "alora_invocation_tokens": None}
# PEFT initialisations that replace the base's weights by a residual (W0 - B0·A0 for PiSSA, OLoRA, CorDA, ASTRA,
# LoRA-GA; a quantized W0 - B·A for LoftQ): an adapter saved with one of them in its config belongs on that
# residual base, not on the original one. (PEFT's converted save, path_initial_model_for_weight_conversion,
# writes init_lora_weights = true.)
_PEFT_RESIDUAL_INITS = ("pissa", "corda", "astra", "olora", "loftq", "lora_ga")


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded onto this model; nothing was changed."""


class BaseMismatch(UserWarning):
    """An adapter loaded onto a base that differs from the one it was trained on (quantization, force=True)."""


class UnverifiedBase(BaseMismatch):
    """An adapter file with no base fingerprint (a PEFT file not written by lorakit): it loads onto any base of
    the right shapes, and nothing can tell whether it is the one it was trained on."""


@dataclass
class AdapterSpec:
    """An adapter as read from (or about to be written to) a directory, independent of format."""

    layers: dict[str, tuple[LoraConfig, Slices | None]]
    lora: dict[str, tuple[Tensor, Tensor]]  # layer → (lora_a, lora_b) in lorakit's shapes
    magnitude: dict[str, Tensor] = field(default_factory=dict)  # layer → DoRA's m (out,), for DoRA layers
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module → its state_dict
    biases: dict[str, Tensor] = field(default_factory=dict)  # module → trained bias
    base: dict | None = None  # fingerprint, when the file has one
    base_weights: dict[str, Tensor] = field(default_factory=dict)  # layer → its frozen weight, where PEFT saved it


# ---------------------------------------------------------------- fingerprint


def remember_base(model: nn.Module) -> int:
    """Take the digest of every adaptable layer's weight now and keep it on the layer (`lorakit_sha`), so that
    adapters are still recognised as trained on this base after its weights are cast (a bf16 server);
    returns how many layers."""
    layers = [m for m in model.modules() if kind_of(m) and not isinstance(m, LoraLayer)]
    for m in layers:
        m.lorakit_sha = weight_digest(dequantize(m) if is_quantized(m) else m.weight)
    return len(layers)


def fingerprint(model: nn.Module, layer_names: list[str], as_nf4: dict | None = None, current: bool = False) -> dict:
    """Architecture, adapted-layer shapes and a hash of their frozen (unmerged) weights.

    A 4-bit base layer is hashed by its dequantized weight and the fingerprint gains a
    "quantization" entry (method, block_size, double_quant). `as_nf4` (such an entry) hashes float
    layers as they would be after that quantization, to recognise the float base an NF4-trained
    adapter came from. `current`: hash the float weights as they are now (a PiSSA/OLoRA residual),
    not as each LoRA layer first recorded them."""
    h = hashlib.sha256()
    shapes, quantized = {}, []
    for name in sorted(layer_names):
        module = model.get_submodule(name)
        base = base_of(module)
        if is_quantized(base):
            qs = base.weight.quant_state
            quantized.append({"method": qs.quant_type, "block_size": qs.blocksize, "double_quant": bool(qs.nested)})
            digest = base_digest(module) if isinstance(module, LoraLayer) else weight_digest(dequantize(base))
            shape = [base.out_features, base.in_features]
        else:
            weight = base.weight if as_nf4 is None else nf4_roundtrip(base.weight, as_nf4["block_size"],
                                                                      as_nf4["double_quant"])
            if as_nf4 is not None or current:
                digest = weight_digest(weight)
            elif isinstance(module, LoraLayer):
                digest = base_digest(module)
            else:
                digest = getattr(base, "lorakit_sha", None) or weight_digest(weight)
            shape = list(base.weight.shape)
        h.update(f"{name}:{digest}".encode())
        shapes[name] = shape
    out = {"architecture": type(model).__name__, "shapes": shapes, "weights_sha256": h.hexdigest()}
    if quantized:
        out["quantization"] = quantized[0]
    return out


def _base_check(saved: dict, model: nn.Module, layers: list[str]) -> tuple[bool, str]:
    """(fits, message): whether an adapter's recorded base matches `model`, and what differs.

    An adapter trained on an NF4 copy of this very float base fits, with a message saying so."""
    ours = fingerprint(model, layers)
    if saved.get("architecture") != ours["architecture"]:
        return False, f"architecture {saved.get('architecture')!r} vs {ours['architecture']!r}"
    if saved.get("weights_sha256") == ours["weights_sha256"]:
        return True, ""
    theirs_q, ours_q = saved.get("quantization"), ours.get("quantization")
    if theirs_q and not ours_q and fingerprint(model, layers, as_nf4=theirs_q)["weights_sha256"] == saved["weights_sha256"]:
        dq = " + double quant" if theirs_q.get("double_quant") else ""
        return True, (f"it was trained on an NF4{dq} copy (blocks of {theirs_q.get('block_size')}) of this float base; "
                      f"applied to the float weights its outputs differ from training by the quantization error")
    if ours_q and not theirs_q:
        return False, "this base is quantized to NF4 and the adapter was trained on different (float) weights"
    return False, "the frozen weights of the adapted layers differ"


# ---------------------------------------------------------------- save


def full_tensor(t: Tensor) -> Tensor:
    """A tensor whole: a sharded DTensor (FSDP) is gathered from every rank — a collective, so every
    rank must make the same calls in the same order; any other tensor is returned as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def adapter_spec(model: nn.Module, adapter: str, residual_form: bool = False) -> AdapterSpec:
    """Gather one adapter's tensors and settings from the model, whole even when the model is
    sharded (FSDP: every rank must call this; see `full_tensor`).

    An adapter initialised by PiSSA or OLoRA (whose W0 is now a residual) is gathered for the original base,
    as a plain LoRA of rank 2r (`residual.for_original_base`); with `residual_form`, as it is, for the residual
    base, fingerprinted by the residual weights."""
    if adapter not in list_adapters(model):
        raise ValueError(f"no adapter {adapter!r} on {type(model).__name__}; adapters: "
                         f"{', '.join(list_adapters(model)) or 'none'}")
    if residual_form and not any(residual.holder(m) == adapter for m in holders(model)):
        raise ValueError(f"residual_form is for adapters initialised by PiSSA or OLoRA, which leave W0 a residual; "
                         f"{adapter!r} was not, and is saved for its base as it is")
    layers, lora, saved, biases, magnitude = {}, {}, {}, {}, {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer) and adapter in m.adapters:
                a = m.adapters[adapter]
                layers[name] = (a.config, a.slices)
                lora[name] = (full_tensor(a.lora_a.detach()), full_tensor(a.lora_b.detach()))
                if getattr(a, "initial_a", None) is not None and not residual_form:
                    r, alpha, down, up = residual.for_original_base(a, *lora[name])
                    lora[name] = (down, up)
                    layers[name] = (replace(a.config, r=r, alpha=alpha, init="kaiming"), a.slices)
                if a.magnitude is not None:
                    magnitude[name] = full_tensor(a.magnitude.detach())
            elif isinstance(m, SavedModule) and adapter in m.adapters:
                saved[name] = {k: full_tensor(v.detach()) for k, v in m.adapters[adapter].state_dict().items()}
        bias_mode = next(iter(layers.values()))[0].bias if layers else "none"
        if bias_mode != "none":
            biases = {k: full_tensor(v) for k, v in _trained_biases(model, adapter, bias_mode).items()}
    return AdapterSpec(layers, lora, magnitude, saved, biases, fingerprint(model, list(layers), current=residual_form))


def check_complete(model: nn.Module, spec: AdapterSpec, adapter: str) -> None:
    """Refuse to write an adapter whose tensors are not whole: any tensor that is empty, or whose shape
    is not the one the model's adapter layers define (A: (p·r, fan_in), B: (Σ slices, r); a
    modules_to_save copy or a bias: the module's own shapes). A shard saved as if it were the whole
    tensor is the usual way such a file arises under FSDP or ZeRO; it would load as garbage or not at all."""
    problems = []

    def check(key: str, got: Tensor, want: tuple[int, ...]) -> None:
        if got.numel() == 0 or tuple(got.shape) != tuple(want):
            problems.append(f"{key} has shape {tuple(got.shape)}, expected {tuple(want)}")
        elif got.is_floating_point() and not bool(torch.isfinite(got).all()):
            problems.append(f"{key} holds non-finite values (NaN or infinity)")

    for name, (a, b) in spec.lora.items():
        layer = model.get_submodule(name).adapters[adapter]
        expected = LoraAdapter(layer.geometry, *spec.layers[name], device="meta")
        check(f"{name}.lora_a", a, expected.lora_a.shape)
        check(f"{name}.lora_b", b, expected.lora_b.shape)
        if expected.magnitude is not None:
            check(f"{name}.magnitude", spec.magnitude.get(name, torch.empty(0)), expected.magnitude.shape)
    for name, state in spec.saved.items():
        own = model.get_submodule(name).original.state_dict()
        for k, v in state.items():
            check(f"{name}.{k}", v, own[k].shape)
    for name, bias in spec.biases.items():
        module = model.get_submodule(name)
        check(f"{name}.bias", bias, base_of(module).bias.shape)
    if problems:
        raise AdapterFileError(f"refusing to save adapter {adapter!r}: " + "; ".join(problems[:6])
                               + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
                               + " — a tensor that is empty or a shard of the whole, or that diverged, is not saved; "
                               "nothing was written")


def _trained_biases(model: nn.Module, adapter: str, mode: str) -> dict[str, Tensor]:
    """The biases that `bias="all"` or `"lora_only"` trains, under their base-model names."""
    inside = {id(m) for h in holders(model) for m in h.adapters.modules()}
    inside |= {id(m) for h in holders(model) if isinstance(h, SavedModule) for m in h.original.modules()}
    out = {}
    for name, m in model.named_modules():
        if id(m) in inside or isinstance(m, SavedModule):
            continue
        if isinstance(m, LoraLayer):
            inside.add(id(m.base))
            if mode == "all" or adapter in m.adapters:
                m = m.base
            else:
                continue
        elif mode != "all":
            continue
        if isinstance(getattr(m, "bias", None), nn.Parameter):
            out[name] = m.bias.detach()
    return out


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter: str | None = None,
    format: Literal["lorakit", "peft"] = "lorakit",
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    print_fn=print,
    residual_form: bool = False,
) -> Path:
    """Write one adapter (default: the active one) to `directory`; return the weights file's path.

    Only adapter tensors are written (plus `modules_to_save` and trained biases), as they are or
    cast to `dtype` (torch.bfloat16 or float16 halve the file; loading casts back to fp32). An
    existing adapter in `directory` is refused unless `overwrite=True`. A PiSSA or OLoRA adapter is written
    for the original base (a plain LoRA of rank 2r), or with `residual_form=True` for the residual base its
    initialisation left (see `adapter_spec`)."""
    adapter = adapter or only_active(model)
    spec = adapter_spec(model, adapter, residual_form)
    return write_adapter(model, spec, directory, adapter, format, overwrite, dtype, print_fn)


def write_adapter(
    model: nn.Module,
    spec: AdapterSpec,
    directory: str | os.PathLike,
    adapter: str,
    format: Literal["lorakit", "peft"] = "lorakit",
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    print_fn=print,
) -> Path:
    """The writing half of `save_adapter`, for tensors already gathered by `adapter_spec` (in a
    distributed run every rank gathers, one writes). Refuses tensors that are not whole
    (`check_complete`) before anything is written."""
    if format not in ("lorakit", "peft"):
        raise ValueError(f"format must be 'lorakit' or 'peft', got {format!r}")
    if dtype is not None and dtype not in tensorfile.FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating dtype ({', '.join(map(str, tensorfile.FLOAT_DTYPES))}), got {dtype!r}")
    check_complete(model, spec, adapter)
    out = Path(directory)
    _refuse_existing(out, overwrite)  # early, for a quick answer; again under the folder's lock below
    tensors, config = (_to_peft(model, spec, adapter) if format == "peft" else _to_native(spec, adapter))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = {BASE_KEY: json.dumps(spec.base, sort_keys=True)}
    # The digest a load will compute: of the settings as read back from exactly what is written.
    meta[SETTINGS_KEY] = settings_digest(_parse(config, tensors, meta, out / CONFIG_NAME))
    blob = tensorfile.dumps(tensors, meta)
    if format == "lorakit":
        config["weights_sha256"] = hashlib.sha256(blob).hexdigest()

    def fill(tmp: Path) -> None:
        (tmp / WEIGHTS_NAME).write_bytes(blob)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    atomic.write_dir(out, fill, check=lambda target: _refuse_existing(target, overwrite),
                     replaced=lambda entry: entry in ADAPTER_FILES)
    print_fn(f"lorakit: saved adapter {adapter!r} ({format} format, {len(tensors)} tensors, "
             f"{len(blob) / 1024:,.1f} KiB) to {out}")
    return out / WEIGHTS_NAME


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; an adapter is saved to a folder")
    if not overwrite:
        present = [out / f for f in ADAPTER_FILES if (out / f).exists()]
        if present:
            raise FileExistsError(f"{present[0]} already exists; pass overwrite=True to replace the adapter in {out}")
    atomic.replaceable(out, lambda entry: entry in ADAPTER_FILES)


def settings_digest(spec: AdapterSpec) -> str:
    """sha256 of what an adapter computes besides its tensors: each layer's rank, scale and output slices,
    the modules that train in full, the trained biases and the base fingerprint."""
    layers = {name: [c.r, float(c.scale).hex(), [list(s) for s in sl] if sl else None, *(["dora"] if c.dora else [])]
              for name, (c, sl) in spec.layers.items()}
    doc = {"layers": layers, "saved": sorted(spec.saved), "biases": sorted(spec.biases), "base": spec.base}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def only_active(model: nn.Module) -> str:
    """The adapter to save or act on when none is named: the active one, or the only one."""
    names = list_adapters(model)
    active = {m.active for m in holders(model) if m.active is not None}
    if len(active) == 1:
        return active.pop()
    if len(names) == 1:
        return names[0]
    raise ValueError(f"which adapter? the model has {', '.join(names) or 'none'}; pass adapter=...")


def _to_native(spec: AdapterSpec, adapter: str) -> tuple[dict[str, Tensor], dict]:
    from . import __version__

    tensors = {}
    for name, (a, b) in spec.lora.items():
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a, b
    tensors.update({f"{name}.magnitude": m for name, m in spec.magnitude.items()})
    for module, state in spec.saved.items():
        tensors.update({f"{module}.{k}": v for k, v in state.items()})
    tensors.update({f"{module}.bias": b for module, b in spec.biases.items()})
    first = next(iter(spec.layers.values()))[0]
    layers = {name: {"r": c.r, "alpha": c.r if c.alpha is None else c.alpha,
                     "slices": [list(s) for s in sl] if sl else None}
              for name, (c, sl) in spec.layers.items()}
    config = {"format_version": FORMAT_VERSION, "library": "lorakit", "lorakit_version": __version__,
              "adapter": adapter, "lora": asdict(first), "layers": layers,
              "modules_to_save": sorted(spec.saved), "biases": sorted(spec.biases), "base": spec.base}
    return tensors, config


def _to_peft(model: nn.Module, spec: AdapterSpec, name: str) -> tuple[dict[str, Tensor], dict]:
    """PEFT's layout. A sliced layer becomes a whole-layer LoRA of rank p·r whose B is the block
    matrix `up` (zero rows for untouched slices): the same ΔW, in a form PEFT can load."""
    tensors, ranks, alphas = {}, {}, {}
    has_conv1d = False
    for layer_name, (config, slices) in spec.layers.items():
        base = base_of(model.get_submodule(layer_name))
        adapter = _built(base, config, slices, spec.lora[layer_name])
        kind = adapter.geometry.kind
        has_conv1d |= kind == "conv1d"
        up = adapter.up().detach()
        key = PEFT_PREFIX + layer_name
        if kind == "embedding":
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = adapter.lora_a.detach(), up
        else:
            tensors[f"{key}.lora_A.weight"] = adapter.lora_a.detach()
            tensors[f"{key}.lora_B.weight"] = up[:, :, None, None] if kind == "conv2d" else up
        if layer_name in spec.magnitude:
            m = spec.magnitude[layer_name]
            tensors[f"{key}.lora_magnitude_vector"] = m.view(1, -1, 1, 1) if kind == "conv2d" else m
        rank = adapter.lora_a.shape[0]
        ranks[layer_name] = rank
        alphas[layer_name] = adapter.scale * (rank ** 0.5 if config.rslora else rank)
    for module, state in spec.saved.items():
        tensors.update({f"{PEFT_PREFIX}{module}.{k}": v for k, v in state.items()})
    tensors.update({f"{PEFT_PREFIX}{module}.bias": b for module, b in spec.biases.items()})
    # The most common rank and alpha are the defaults; each layer that differs is named by its full name, anchored
    # and escaped for PEFT's pattern match (`targets.pattern_key`): "^layers\.1\.q" names layers.1.q alone.
    r0, a0 = (Counter(values.values()).most_common(1)[0][0] for values in (ranks, alphas))
    c0 = next(iter(spec.layers.values()))[0]
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "r": r0, "lora_alpha": a0, "lora_dropout": c0.dropout, "use_rslora": c0.rslora, "bias": c0.bias,
        "target_modules": _peft_targets(model, sorted(spec.layers)), "modules_to_save": sorted(spec.saved) or None,
        "fan_in_fan_out": has_conv1d, "init_lora_weights": c0.init if residual.is_residual(c0.init) else True,
        "use_dora": c0.dora,
        "rank_pattern": {f"^{re.escape(n)}": r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {f"^{re.escape(n)}": a for n, a in alphas.items() if a != a0},
    }
    return tensors, config


def _peft_targets(model: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT's target_modules for exactly these layers: the names, which PEFT matches as dotted suffixes, or — where
    another module's name ends in one of them — one regex that PEFT matches against whole names."""
    wanted = set(names)
    if not any(n not in wanted and any(n.endswith("." + t) for t in names) for n, _ in model.named_modules()):
        return names
    return "(" + "|".join(re.escape(n) for n in names) + ")"


# ---------------------------------------------------------------- read


def read_adapter(directory: str | os.PathLike) -> AdapterSpec:
    """Read an adapter directory (lorakit or PEFT format) without touching any model.

    Every way the directory can be wrong raises AdapterFileError naming the file and the problem: a missing
    or unreadable file, a config that is not JSON or has fields of the wrong type, truncated or corrupt
    weights, tensors changed after saving, settings edited after saving, tensors that are not floating point
    or not finite."""
    path = Path(directory)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} not found" if not path.exists()
                               else f"{path} is a file; an adapter is a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    for p in (config_path, weights_path):
        if not p.is_file():
            extra = " (a pickle, which lorakit never loads)" if p == weights_path and (path / "adapter_model.bin").exists() else ""
            raise AdapterFileError(f"{p} not found{extra}; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        blob = weights_path.read_bytes()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config_path} is not valid JSON ({e}); the file is corrupt") from None
    except OSError as e:
        raise AdapterFileError(f"cannot read {e.filename or path} ({e.strerror or e})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    native = "peft_type" not in config
    if native:
        _check_version(config, config_path)
    expected = config.get("weights_sha256") if native else None
    hashed = expected is not None and hashlib.sha256(blob).hexdigest() == expected
    try:  # bytes that match the config's hash need no second check of the tensors' own digest
        tensors, meta = tensorfile.loads(blob, str(weights_path), check_digest=not hashed)
    except tensorfile.TensorFileError as e:
        raise AdapterFileError(str(e)) from None
    if expected is not None and not hashed:
        raise AdapterFileError(f"{weights_path} does not match the hash in {CONFIG_NAME}: the file is corrupt "
                               f"or from another save")
    for key, t in tensors.items():
        if t.dtype not in tensorfile.FLOAT_DTYPES:
            raise AdapterFileError(f"{weights_path}: tensor {key!r} is {t.dtype}; adapter tensors are floating point")
    if (key := tensorfile.first_non_finite(tensors)) is not None:
        raise AdapterFileError(f"{weights_path}: tensor {key!r} holds non-finite values (NaN or infinity)")
    spec = _parse(config, tensors, meta, config_path)
    recorded = meta.get(SETTINGS_KEY)
    if recorded is None and native and _version(config) >= (1, 1):
        raise AdapterFileError(f"{weights_path} has no settings digest ({SETTINGS_KEY}), which format "
                               f"{config['format_version']} files carry; the file was altered")
    if recorded is not None and recorded != settings_digest(spec):
        raise AdapterFileError(f"{config_path} does not match the settings {WEIGHTS_NAME} was saved with (rank, alpha, "
                               f"targets, slices, modules_to_save or base changed after saving); the adapter would "
                               f"compute something else than what was trained")
    return spec


def _version(config: dict) -> tuple[int, int]:
    major, minor = str(config.get("format_version", "0.0")).split(".")
    return int(major), int(minor)


def _check_version(config: dict, config_path: Path) -> None:
    version = config.get("format_version", "")
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+", version):
        raise AdapterFileError(f"{config_path} has no valid format_version (got {version!r}); "
                               f"expected 'MAJOR.MINOR' such as {FORMAT_VERSION!r}")
    major, minor = _version(config)
    ours_major, ours_minor = map(int, FORMAT_VERSION.split("."))
    if major > ours_major:
        raise AdapterFileError(f"{config_path} has format_version {version}, from a newer lorakit; this version "
                               f"reads format {ours_major}.x — upgrade lorakit to load it")
    unknown = sorted(set(config) - _NATIVE_KEYS)
    if unknown:
        newer = f" (format {version} is newer than {FORMAT_VERSION})" if minor > ours_minor else ""
        warnings.warn(f"{config_path}: ignoring unknown keys {', '.join(unknown)}{newer}", stacklevel=4)


def _parse(config: dict, tensors: dict[str, Tensor], meta: dict[str, str], config_path: Path) -> AdapterSpec:
    """The adapter a config and its tensors describe, in either format; AdapterFileError if they are malformed."""
    try:
        if "peft_type" in config:
            spec = _from_peft(config, tensors, config_path)
            spec.base = json.loads(meta[BASE_KEY]) if BASE_KEY in meta else None
        else:
            spec = _from_native(config, tensors, config_path)
        if spec.base is not None and not isinstance(spec.base, dict):
            raise TypeError(f"base must be a JSON object, got {type(spec.base).__name__}")
    except AdapterFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, re.error) as e:
        what = f"missing entry {e}" if isinstance(e, KeyError) else str(e)
        raise AdapterFileError(f"{config_path} is malformed: {what}") from None
    if not spec.layers:
        raise AdapterFileError(f"{config_path} describes no adapted layer")
    return spec


def _typed(value: object, kind: type | tuple[type, ...], what: str) -> object:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise TypeError(f"{what} must be a {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _names(value: object, what: str) -> list[str]:
    items = _typed(value, list, what)
    for item in items:
        _typed(item, str, f"each entry of {what}")
    return list(items)


def _slices(value: object, what: str) -> Slices | None:
    if value is None:
        return None
    out = []
    for s in _typed(value, list, what):
        if not (isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in s)):
            raise TypeError(f"{what} must be a list of [start, stop] integer pairs, got {value!r}")
        out.append((s[0], s[1]))
    return tuple(out) or None


def _from_native(config: dict, tensors: dict[str, Tensor], config_path: Path) -> AdapterSpec:
    lora = _typed(config["lora"], dict, "lora")
    settings = {k: lora[k] for k in ("dropout", "rslora", "init", "bias")}
    settings["dora"] = lora.get("dora", False)  # absent from files written before DoRA
    settings["train_a"] = lora.get("train_a", True)  # files written before LoRA-FA do not say
    layers = {}
    for name, v in _typed(config["layers"], dict, "layers").items():
        _typed(v, dict, f"layers.{name}")
        layers[name] = (LoraConfig(r=v["r"], alpha=v["alpha"], **settings), _slices(v.get("slices"), f"layers.{name}.slices"))
    saved_names = _names(config.get("modules_to_save", []), "modules_to_save")
    bias_names = _names(config.get("biases", []), "biases")
    spec = AdapterSpec(layers, {}, base=config.get("base"))
    remaining = dict(tensors)
    for name in layers:
        try:
            spec.lora[name] = (remaining.pop(f"{name}.lora_a"), remaining.pop(f"{name}.lora_b"))
            if settings["dora"]:
                spec.magnitude[name] = remaining.pop(f"{name}.magnitude")
        except KeyError as e:
            raise AdapterFileError(f"{WEIGHTS_NAME} lacks tensor {e.args[0]!r} named in {CONFIG_NAME}") from None
    for name in bias_names:
        if f"{name}.bias" not in remaining:
            raise AdapterFileError(f"{WEIGHTS_NAME} lacks tensor '{name}.bias' named in {CONFIG_NAME}")
        spec.biases[name] = remaining.pop(f"{name}.bias")
    for module in saved_names:
        spec.saved[module] = {k[len(module) + 1:]: remaining.pop(k) for k in list(remaining) if k.startswith(module + ".")}
        if not spec.saved[module]:
            raise AdapterFileError(f"{WEIGHTS_NAME} has no tensor of module {module!r} named in {CONFIG_NAME}")
    if remaining:
        raise AdapterFileError(f"{WEIGHTS_NAME} has tensors that {CONFIG_NAME} does not describe: "
                               f"{', '.join(sorted(remaining)[:5])}")
    return spec


_PEFT_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                       r"(\.weight)?")


def _from_peft(config: dict, tensors: dict[str, Tensor], config_path: Path) -> AdapterSpec:
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{config_path} is a PEFT {config.get('peft_type')!r} adapter; lorakit reads LORA")
    for key, neutral in _PEFT_UNSUPPORTED.items():
        if config.get(key, neutral) not in (neutral, None, False, [], {}):
            raise AdapterFileError(f"{config_path} uses PEFT option {key}={config[key]!r}, which lorakit does not support")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_PEFT_RESIDUAL_INITS):
        raise AdapterFileError(
            f"{config_path} has init_lora_weights={init!r}: PEFT saved it for the residual base that initialisation "
            f"made (the base's weights minus the initial adapter), so on the original base it would give wrong "
            f"outputs; save it from PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=...) to "
            f"get an adapter for the original base")
    alpha_pattern = _typed(config.get("alpha_pattern") or {}, dict, "alpha_pattern")
    settings = {"dropout": config.get("lora_dropout", 0.0), "rslora": _typed(config.get("use_rslora", False), bool, "use_rslora"),
                "bias": config.get("bias", "none"), "dora": _typed(config.get("use_dora", False), bool, "use_dora")}
    pairs: dict[str, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for key, value in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        m = _PEFT_KEY.fullmatch(key)
        if m:
            part = "m" if m["part"] == "lora_magnitude_vector" else m["part"][-1]
            pairs.setdefault(m["module"], {})[part] = value
        else:
            rest[key] = value
    spec = AdapterSpec({}, {})
    for name, ab in sorted(pairs.items()):
        if set(ab) - {"m"} != {"A", "B"}:
            raise AdapterFileError(f"{config_path.parent / WEIGHTS_NAME} has only lora_{''.join(sorted(set(ab) - {'m'}))} "
                                   f"for {name!r}")
        if ("m" in ab) != settings["dora"]:
            raise AdapterFileError(f"{config_path.parent / WEIGHTS_NAME}: {name!r} " + (
                "lacks lora_magnitude_vector, which use_dora = true needs" if settings["dora"]
                else "has a lora_magnitude_vector but its config has use_dora = false"))
        a, b = ab["A"], ab["B"]
        b = b.flatten(1) if b.ndim == 4 else b  # Conv2d B: (out, r, 1, 1)
        if a.ndim < 2 or b.ndim != 2:
            raise AdapterFileError(f"{config_path.parent / WEIGHTS_NAME}: {name!r} has lora_A of shape "
                                   f"{tuple(a.shape)} and lora_B of shape {tuple(b.shape)}; expected matrices")
        r = a.shape[0]
        key = pattern_key(alpha_pattern, name)  # the rank is A's; the alpha is PEFT's for this layer
        alpha = alpha_pattern[key] if key is not None else config.get("lora_alpha", PEFT_ALPHA)
        spec.layers[name] = (LoraConfig(r=r, alpha=alpha, **settings), None)
        spec.lora[name] = (a, b)
        if "m" in ab:
            spec.magnitude[name] = ab["m"].flatten()  # Conv2d: (1, out, 1, 1)
    saved = _names(config.get("modules_to_save") or [], "modules_to_save")
    for key, value in rest.items():
        root = _saved_root(key, saved)
        if root is not None:
            spec.saved.setdefault(root, {})[key[len(root) + 1:]] = value
        elif key.endswith(".bias") and settings["bias"] != "none":
            spec.biases[key.removesuffix(".bias")] = value
        elif key.endswith(".base_layer.weight") and key.removesuffix(".base_layer.weight") in spec.layers:
            # save_embedding_layers (PEFT's default when an embedding is adapted) writes the base's own weight
            spec.base_weights[key.removesuffix(".base_layer.weight")] = value
        else:
            raise AdapterFileError(f"{config_path.parent / WEIGHTS_NAME} has tensor {key!r} that its config "
                                   f"does not explain")
    return spec


def _saved_root(key: str, saved: list[str]) -> str | None:
    """The module a modules_to_save tensor belongs to: the longest name prefix of `key` that is,
    or ends with, one of the saved names."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if any(matches_suffix(prefix, s) for s in saved):
            return prefix
    return None


# ---------------------------------------------------------------- load


def _check_fits(model: nn.Module, spec: AdapterSpec, force: bool, where: Path) -> Plan:
    """Everything that can be wrong, checked before the model changes; returns the surgery plan."""
    plan: Plan = {}
    problems: list[str] = []

    def find(name: str, what: str) -> nn.Module | None:
        try:
            return model.get_submodule(name)
        except AttributeError:
            problems.append(f"{what} {name!r} is not in {type(model).__name__}")
            return None

    for name, (config, slices) in spec.layers.items():
        if (module := find(name, "layer")) is None:
            continue
        base = base_of(module)
        try:
            geometry = Geometry.of(base)
            if slices is not None:
                check_slices(slices, geometry.out_features, name)
            expected = LoraAdapter.shapes(geometry, config, slices)
        except (TypeError, ValueError) as e:
            problems.append(f"{name}: {e}")
            continue
        for key, got, want in zip(("lora_a", "lora_b"), spec.lora[name], expected):
            if tuple(got.shape) != tuple(want):
                problems.append(f"{name}.{key} has shape {tuple(got.shape)} in the file but {tuple(want)} here")
        m = spec.magnitude.get(name)
        if m is not None and tuple(m.shape) != (geometry.out_features,):
            problems.append(f"{name}.magnitude has shape {tuple(m.shape)} in the file but ({geometry.out_features},) here")
        w = spec.base_weights.get(name)
        if w is not None and not (w.shape == base.weight.shape and torch.allclose(
                w.to(base.weight.dtype).float(), base.weight.detach().float().cpu())):
            problems.append(f"{name}: the file carries the base weight it was trained with (PEFT's "
                            f"save_embedding_layers), and it differs from this model's (a resized or retrained layer)")
        plan[name] = (module, config, slices)
    for module_name, state in spec.saved.items():
        if (module := find(module_name, "module (modules_to_save)")) is None:
            continue
        own = (module.original if isinstance(module, SavedModule) else module).state_dict()
        for k, v in state.items():
            if k not in own or own[k].shape != v.shape:
                want = tuple(own[k].shape) if k in own else "no such tensor"
                problems.append(f"{module_name}.{k} has shape {tuple(v.shape)} in the file but {want} here")
        problems += [f"{module_name}.{k} is missing from the file" for k in own if k not in state]
    for module_name, b in spec.biases.items():
        if (target := find(module_name, "module (trained bias)")) is None:
            continue
        own = getattr(base_of(target), "bias", None)
        if own is None or own.shape != b.shape:
            problems.append(f"{module_name}.bias has shape {tuple(b.shape)} in the file but "
                            f"{None if own is None else tuple(own.shape)} here")
    if problems:
        raise AdapterFileError(f"adapter in {where} does not fit {type(model).__name__}: " + "; ".join(problems[:6])
                               + (f"; and {len(problems) - 6} more" if len(problems) > 6 else ""))
    if spec.base is None:
        warnings.warn(f"adapter in {where} carries no base fingerprint (a PEFT file not written by lorakit): "
                      f"nothing checks that {type(model).__name__} is the base it was trained on", UnverifiedBase,
                      stacklevel=3)
    else:
        fits, what = _base_check(spec.base, model, list(spec.layers))
        if fits and what:
            warnings.warn(f"adapter in {where}: {what}", BaseMismatch, stacklevel=3)
        elif not fits:
            message = f"adapter in {where} was trained on a different base model ({what})"
            if not force:
                raise AdapterFileError(message + "; pass force=True to load it anyway")
            warnings.warn(message + "; loading anyway because force=True", BaseMismatch, stacklevel=3)
    return plan


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    trainable: bool = False,
    force: bool = False,
) -> list[str]:
    """Load an adapter directory (lorakit or PEFT format) onto `model` as adapter `name`.

    Works on a plain base model (the adapted layers are injected) and on one that already has
    adapters (this one is added beside them). The adapter becomes active when none was; it trains
    only with `trainable=True`. Every check — shapes, file integrity, format version, the base
    fingerprint (overridable with `force=True`) — runs before the model changes. Returns the
    names of the adapted layers."""
    check_name(name)
    if name in list_adapters(model):
        raise ValueError(f"the model already has an adapter named {name!r}; choose another name or delete it")
    return place_adapter(model, read_adapter(directory), name, trainable, force, Path(directory))


def place_adapter(model: nn.Module, spec: AdapterSpec, name: str, trainable: bool = False, force: bool = False,
                  where: str | os.PathLike = "the adapter") -> list[str]:
    """The second half of `load_adapter`, for an adapter already read (`read_adapter`, which does the file's
    I/O and integrity checks): check that it fits `model`, then add it as adapter `name`
    (`prepare_adapter`, then `attach_adapter`). Returns the adapted layers."""
    check_name(name)
    if name in list_adapters(model):
        raise ValueError(f"the model already has an adapter named {name!r}; choose another name or delete it")
    return attach_adapter(model, prepare_adapter(model, spec, name, force, where), trainable)


def _built(base: nn.Module, config: LoraConfig, slices: Slices | None, weights: tuple[Tensor, ...]) -> LoraAdapter:
    """An adapter for base layer `base` holding `weights` (A, possibly flattened, B, and DoRA's magnitude), on
    the base's device; nothing is initialised."""
    adapter = LoraAdapter(Geometry.of(base), config, slices, torch.device("meta"))
    device, dtype = adapter_home(base)
    for key, value in zip(("lora_a", "lora_b", "magnitude"), weights):
        shape = getattr(adapter, key).shape
        setattr(adapter, key, nn.Parameter(value.detach().reshape(shape).to(device, dtype, copy=True)))
    return adapter


@dataclass
class Prepared:
    """An adapter checked against a model and built, holding its file's weights; `attach_adapter` adds it."""

    name: str
    spec: AdapterSpec
    plan: Plan
    built: dict[str, nn.Module]  # module name → its LoraAdapter, or its copy of a saved module
    bases: dict[str, nn.Module]  # module name → the base module it was checked against


def prepare_adapter(model: nn.Module, spec: AdapterSpec, name: str, force: bool = False,
                    where: str | os.PathLike = "the adapter") -> Prepared:
    """Everything of `place_adapter` that leaves the model as it is: every check (shapes, the base
    fingerprint, the surgery plan) and building the adapter's modules with the file's weights, frozen. It
    only looks modules up by name, so it may run on another thread while the model computes and another
    thread adds or deletes adapters; `attach_adapter` then changes the model in a few milliseconds."""
    check_name(name)
    plan = _check_fits(model, spec, force, Path(where))
    try:
        check_plan(plan, list(spec.saved), model, name)
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"adapter in {where} cannot be applied: {e}") from None
    built: dict[str, nn.Module] = {}
    bases: dict[str, nn.Module] = {}
    for layer_name, (module, config, slices) in plan.items():
        bases[layer_name] = base_of(module)
        magnitude = (spec.magnitude[layer_name],) if config.dora else ()
        built[layer_name] = _built(bases[layer_name], config, slices, (*spec.lora[layer_name], *magnitude))
    for module_name, state in spec.saved.items():
        module = model.get_submodule(module_name)
        bases[module_name] = module.original if isinstance(module, SavedModule) else module
        built[module_name] = copy = deepcopy(bases[module_name])
        copy.load_state_dict(state, strict=True)
    for m in built.values():
        m.requires_grad_(False)
    return Prepared(name, spec, plan, built, bases)


@torch.no_grad()
def attach_adapter(model: nn.Module, prepared: Prepared, trainable: bool = False) -> list[str]:
    """Add a prepared adapter to `model` (the model's modules are changed here, and only here): insert its
    modules, copy its trained biases, freeze the base (and the adapter unless `trainable`); it becomes
    active where no adapter was. Refused, with nothing changed, when the name is taken by then or a module
    it was checked against has been replaced since. Returns the adapted layers."""
    name, spec = prepared.name, prepared.spec
    present = holders(model)
    if any(name in m.adapters for m in present):
        raise ValueError(f"the model already has an adapter named {name!r}; choose another name or delete it")
    current = {n: model.get_submodule(n) for n in prepared.bases}
    for n, module in current.items():
        now = module.original if isinstance(module, SavedModule) else base_of(module)
        if now is not prepared.bases[n]:
            raise ValueError(f"module {n!r} was replaced after adapter {name!r} was prepared; prepare it again")
    had_active = any(m.active is not None for m in present)
    plan = {n: (current[n], config, slices) for n, (_, config, slices) in prepared.plan.items()}
    apply_plan(model, plan, list(spec.saved), name, prepared.built)
    for module_name, b in spec.biases.items():
        base_of(model.get_submodule(module_name)).bias.copy_(b)
    if trainable:
        bias_mode = next(iter(spec.layers.values()))[0].bias if spec.layers else "none"
        freeze(model, name, bias=bias_mode)
    else:
        freeze_base(model)
    if not had_active:
        for m in holders(model):
            m.active = name if name in m.adapters else None
    return list(spec.layers)


@torch.no_grad()
def _copy_in(model: nn.Module, spec: AdapterSpec, name: str) -> None:
    """Write an adapter's weights into the modules of loaded adapter `name`, in place."""
    for layer_name, (a, b) in spec.lora.items():
        adapter = model.get_submodule(layer_name).adapters[name]
        adapter.lora_a.copy_(a.view_as(adapter.lora_a))
        adapter.lora_b.copy_(b)
        if adapter.magnitude is not None:
            adapter.magnitude.copy_(spec.magnitude[layer_name])
    for module_name, state in spec.saved.items():
        model.get_submodule(module_name).adapters[name].load_state_dict(state, strict=True)
    for module_name, b in spec.biases.items():
        base_of(model.get_submodule(module_name)).bias.copy_(b)


def hot_swap(model: nn.Module, directory: str | os.PathLike, name: str, force: bool = False) -> None:
    """Replace the weights (and alpha, dropout) of loaded adapter `name` from a new directory, in place.

    The new adapter must cover the same layers with the same shapes (rank, slices); nothing is re-injected,
    so references to the model and compiled graphs stay valid. Everything is checked before the first
    layer changes: the swap is all or nothing."""
    if name not in list_adapters(model):
        raise ValueError(f"no adapter {name!r} to swap; adapters: {', '.join(list_adapters(model)) or 'none'}")
    spec = read_adapter(directory)
    current = {n for n, m in model.named_modules() if isinstance(m, (LoraLayer, SavedModule))
               and name in m.adapters}
    incoming = set(spec.layers) | set(spec.saved)
    if incoming != current:
        missing, extra = sorted(current - incoming), sorted(incoming - current)
        raise AdapterFileError(f"adapter in {directory} covers other modules than {name!r}: "
                               f"missing {missing[:3]}, extra {extra[:3]}")
    merged = [n for n in spec.layers if name in model.get_submodule(n).merged]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into {merged[0]}; unmerge before swapping it")
    _check_fits(model, spec, force, Path(directory))
    problems = []
    for layer_name, (config, slices) in spec.layers.items():
        adapter = model.get_submodule(layer_name).adapters[name]
        if config.r != adapter.config.r or slices != adapter.slices:
            problems.append(f"{layer_name} has r={config.r}, slices={slices} in the file but r={adapter.config.r}, "
                            f"slices={adapter.slices} loaded")
        if config.dora != adapter.config.dora:
            problems.append(f"{layer_name} has dora={config.dora} in the file but dora={adapter.config.dora} loaded")
    bias_now = next(iter(model.get_submodule(n).adapters[name].config.bias for n in spec.layers))
    bias_new = next(iter(spec.layers.values()))[0].bias
    if bias_now != bias_new:
        problems.append(f"bias={bias_new!r} in the file but {bias_now!r} loaded")
    if problems:
        raise AdapterFileError(f"cannot hot-swap {name!r} from {directory}: " + "; ".join(problems[:4])
                               + " — a swap keeps every shape; load it as a new adapter instead")
    for layer_name, (config, _) in spec.layers.items():
        adapter = model.get_submodule(layer_name).adapters[name]  # what trains stays as it was (train_a)
        adapter.config, adapter.scale = replace(config, train_a=adapter.config.train_a), config.scale
    _copy_in(model, spec, name)

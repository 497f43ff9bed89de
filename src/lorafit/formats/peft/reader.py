"""The PEFT reader: adapter_config.json plus adapter_model.safetensors (or .bin) -> Adapter.

A PEFT checkpoint key is `base_model.model.<module path>.<role>`. The reader groups keys by module
path into one LoraModule each (A, B and, where present, lora_bias and the DoRA magnitude); every other
tensor (modules_to_save copies, saved embedding layers) is kept as an ExtraTensor. Only headers are read
here; tensor data is read on demand through `Adapter.tensor`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter import Adapter, ExtraKind, ExtraTensor, LoraKind, LoraModule
from ...errors import AdapterFormatError, AdapterNotFoundError
from ...fileio.hub import cached_snapshot, looks_like_repo_id
from ...fileio.inputs import load_config, open_regular
from ...fileio.safetensors_header import read_safetensors_header
from ...tensor_info import TensorInfo
from ...user_regex import RegexTimeout
from . import targeting
from .config import validate_config
from .schema import peft_types

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


def strip_root(path: str) -> str:
    """A module path without PEFT's key root (`base_model.model.`): the path in the model itself."""
    return path.removeprefix(PEFT_PREFIX)

# Role of a tensor inside a LoRA module, by the key's suffix. Order matters: longest first.
_ROLE_SUFFIXES = (
    ("lora_magnitude_vector.weight", "magnitude"),
    ("lora_magnitude_vector", "magnitude"),
    ("lora_embedding_A", "A"),
    ("lora_embedding_B", "B"),
    ("lora_A.weight", "A"),
    ("lora_B.weight", "B"),
    ("lora_B.bias", "bias"),
)
_TORCH_DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def resolve_adapter_dir(spec: str | Path, subfolder: str | None = None) -> Path:
    """Find the adapter directory for a path, a file inside it, a parent of one adapter, or a cached hub id.

    Raises:
        AdapterNotFoundError: nothing adapter-like is there, or several adapters are and none was chosen.
    """
    p = Path(spec).expanduser()
    try:
        return _resolve_dir(p, spec, subfolder)
    except OSError as e:  # a name too long for the OS, a component that is not a directory, ...
        raise AdapterNotFoundError(f"cannot be looked up ({e.strerror or e})", p) from None


def _resolve_dir(p: Path, spec: str | Path, subfolder: str | None) -> Path:
    if not p.exists() and looks_like_repo_id(str(spec)):
        p = cached_snapshot(str(spec)) or p  # not cached: reported below as "no such directory"
    if subfolder:
        p = p / subfolder
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise AdapterNotFoundError("no such adapter directory (and no cached hub snapshot by that id)", p)
    if (p / CONFIG_NAME).exists():
        return p
    nested = sorted(c for c in p.iterdir() if c.is_dir() and (c / CONFIG_NAME).exists())
    if len(nested) == 1:
        return nested[0]
    if nested:
        names = ", ".join(c.name for c in nested)
        raise AdapterNotFoundError(f"holds several adapters ({names}); pass one of those sub-directories", p)
    raise AdapterNotFoundError(f"{CONFIG_NAME} is missing: this is not a PEFT adapter directory", p)


def read_config(path: Path) -> dict[str, Any]:
    """Read and validate adapter_config.json.

    Raises:
        AdapterNotFoundError / AdapterFormatError: missing, empty, not JSON, or not a LoRA config.
    """
    cfg_path = path / CONFIG_NAME
    config = load_config(path, CONFIG_NAME)
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterFormatError("has no peft_type; a PEFT adapter config always names one", cfg_path)
    if peft_type != "LORA":
        if str(peft_type).upper() == "LORA":
            raise AdapterFormatError(f"peft_type {peft_type!r} must be spelled 'LORA': PEFT matches it exactly and "
                                     "fails to load it otherwise", cfg_path)
        if str(peft_type).upper() in peft_types():
            raise AdapterFormatError(f"peft_type {peft_type!r} is not supported: lorafit reads LoRA adapters", cfg_path)
        raise AdapterFormatError(f"unknown peft_type {peft_type!r} (this PEFT knows LORA, IA3, ADALORA, ...)", cfg_path)
    validate_config(config, cfg_path)
    return config


# What torch's weights_only unpickler says is wrong, most telling first.
_UNPICKLER_REASONS = (r"Unsupported global: GLOBAL \S+", r"Unsupported operand \d+", r"WeightsUnpickler error: .+")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a .bin that needs more than tensors is refused, never executed.

    Each tensor must be plain data that its file really holds (see _check_bin_tensor), before any use.
    """
    import pickle

    import torch

    try:
        with open(open_regular(path, AdapterFormatError), "rb") as f:
            data = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message carries terminal escape codes
        found = [m.group(0).strip() for m in (re.search(p, text) for p in _UNPICKLER_REASONS) if m]
        why = found[0] if found else "content that is not plain tensors"
        raise AdapterFormatError(
            f"cannot be read with torch.load(weights_only=True): {why[:160]}. It needs pickle beyond plain "
            "tensors, or it is corrupt; lorafit will not execute code from a checkpoint. Re-save it with "
            "safetensors", path) from None
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:120]}"
        raise AdapterFormatError(f"is not a readable torch checkpoint ({why})", path) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise AdapterFormatError("does not hold a flat dict of tensors by name", path)
    for key, t in data.items():
        _check_bin_tensor(str(key), t, path)
    return data


def _check_bin_tensor(key: str, t: torch.Tensor, path: Path) -> None:
    """Refuse a tensor that is not dense, real, on the CPU, and backed by its own storage without overlap.

    weights_only admits `zeros(1).expand(60000, 60000)`: 4 bytes on disk, 14 GB once anything touches it.
    A view may not need more elements than its storage holds, nor reach past its end.
    """
    import torch

    if t.layout != torch.strided:
        raise AdapterFormatError(f"tensor {key!r} is a {t.layout} tensor; LoRA weights are dense", path)
    if t.device.type != "cpu":
        raise AdapterFormatError(f"tensor {key!r} is on the {t.device.type} device and holds no data", path)
    if t.dtype.is_complex or str(t.dtype).removeprefix("torch.") not in _TORCH_DTYPE_CODES:
        raise AdapterFormatError(f"tensor {key!r} has dtype {t.dtype}; LoRA weights are real floating point "
                                 f"({', '.join(_TORCH_DTYPE_CODES)})", path)
    if t.numel() == 0:
        return
    size = t.untyped_storage().nbytes()
    item = t.element_size()
    reach = (t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1) * item
    if t.numel() * item > size or reach > size or min(t.stride(), default=1) < 0:
        raise AdapterFormatError(f"tensor {key!r} claims shape {list(t.shape)} over {size} stored bytes (an expanded "
                                 "or overlapping view); re-save the adapter with plain tensors", path)


def _tensor_loader(weights: Path) -> Callable[[str], Mapping[str, torch.Tensor]]:
    """key -> tensors: one tensor from a safetensors file, or every tensor of a .bin (it has no random access)."""
    if weights.suffix != ".safetensors":
        return lambda key: _load_bin(weights)

    def load(key: str) -> Mapping[str, torch.Tensor]:
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                return {key: f.get_tensor(key)}
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise AdapterFormatError(f"cannot read tensor {key!r}: {e}", weights) from None

    return load


def _read_infos(weights: Path) -> tuple[dict[str, TensorInfo], dict[str, str], dict[str, torch.Tensor]]:
    if weights.suffix == ".safetensors":
        infos, metadata = read_safetensors_header(weights)
        return infos, metadata, {}
    tensors = _load_bin(weights)
    infos = {k: TensorInfo(tuple(v.shape), _TORCH_DTYPE_CODES[str(v.dtype).removeprefix("torch.")])
             for k, v in tensors.items()}
    return infos, {}, tensors


def split_key(key: str) -> tuple[str, str | None, str]:
    """Split a checkpoint key into (module path, LoRA role or None, parameter suffix); strips `base_model.model.`."""
    body = key.removeprefix(PEFT_PREFIX)
    for suffix, role in _ROLE_SUFFIXES:
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], role, suffix
    module, _, param = body.rpartition(".")
    return module, None, param


def _check_ndim(key: str, role: str, info: TensorInfo, weights: Path) -> None:
    nd = len(info.shape)
    ok = {"A": (2, 3, 4, 5), "B": (2, 3, 4, 5), "bias": (1,), "magnitude": (1, 2, 3, 4, 5)}[role]
    if role in ("A", "B") and ".lora_embedding_" in key:  # an Embedding's DoRA magnitude is 1-D
        ok = (2,)
    if nd not in ok:
        raise AdapterFormatError(
            f"tensor {key!r} has {nd} dimensions {list(info.shape)}; a LoRA {role} tensor has {ok[0]}", weights
        )


def read_adapter(spec: str | Path, subfolder: str | None = None) -> Adapter:
    """Read a PEFT LoRA adapter: config and tensor headers now, tensor data on demand.

    Args:
        spec: adapter directory, a file in it, a parent holding one adapter, or a hub id in the local cache.
        subfolder: a named adapter's sub-directory (PEFT saves non-default adapters there).
    Returns:
        the Adapter, with one LoraModule per adapted module path.
    Raises:
        LorafitError subclasses for every unreadable input (exit code 2 at the CLI).
    """
    path = resolve_adapter_dir(spec, subfolder)
    config = read_config(path)
    weights = path / SAFETENSORS_NAME
    if not weights.exists():
        weights = path / BIN_NAME
    if not weights.exists():
        raise AdapterNotFoundError(f"weights file missing: expected {SAFETENSORS_NAME} or {BIN_NAME}", path)
    infos, metadata, preloaded = _read_infos(weights)
    if not infos:
        raise AdapterFormatError("holds no tensors", weights)
    adapter = Adapter(path=path, weights_path=weights, config=config, infos=infos, metadata=metadata, format="peft",
                      task_type=config.get("task_type"), base_model=config.get("base_model_name_or_path"),
                      init_b_zero=config.get("init_lora_weights") is not False,
                      load=_tensor_loader(weights))
    adapter._cache.update(preloaded)
    try:
        _group_modules(adapter)  # matches the config's regexes against the saved module paths
    except RegexTimeout as e:
        raise e.at(path / CONFIG_NAME) from None
    return adapter


# PEFT saves some tensors inside its wrapper of a module: a targeted embedding's base weight under
# `<path>.base_layer.weight`, trainable tokens under `<path>.token_adapter.trainable_tokens_delta`, and, when it
# saves whole embedding layers (a resized vocabulary), a modules_to_save embedding's trained copy under
# `<path>.modules_to_save.weight` and its base weight under `<path>.original_module.weight`.
WRAPPER_SUFFIXES = (".base_layer", ".token_adapter", ".modules_to_save", ".original_module")


def split_wrapper(module: str) -> tuple[str, str]:
    """(the wrapped module's path, the wrapper suffix or '')."""
    for suffix in WRAPPER_SUFFIXES:
        if module.endswith(suffix):
            return module[: -len(suffix)], suffix
    return module, ""


def _extra_kind(config: dict[str, Any], module: str) -> ExtraKind:
    """Why a tensor that is not a LoRA factor is saved: a modules_to_save copy, a targeted embedding's own weight
    (under PEFT's `.base_layer`), trainable tokens, or something else."""
    if module.endswith((".base_layer", ".original_module")):  # the base's own weight, saved beside the adapter
        return "embedding_base"
    if targeting.in_modules_to_save(config, module):
        return "modules_to_save"
    if module.endswith(".token_adapter"):
        return "trainable_tokens"
    return "other"


def _group_modules(adapter: Adapter) -> None:
    roles: dict[str, dict[str, str]] = {}
    for key, info in adapter.infos.items():
        if not key.startswith(PEFT_PREFIX):
            adapter.unrooted_keys.append(key)
        module, role, param = split_key(key)
        if role is None:
            adapter.extras.append(ExtraTensor(key, module, param, info, _extra_kind(adapter.config, module),
                                              wrapper=split_wrapper(module)[1]))
            continue
        _check_ndim(key, role, info, adapter.weights_path)
        roles.setdefault(module, {})[role] = key
    for module, keys in sorted(roles.items()):
        if "A" not in keys or "B" not in keys:
            adapter.incomplete[module] = sorted(keys)
            continue
        a, b = adapter.infos[keys["A"]].shape, adapter.infos[keys["B"]].shape
        kind: LoraKind = "embedding" if "lora_embedding" in keys["A"] else "linear" if len(a) == 2 else "conv"
        rank, in_f, out_f = a[0], a[1], b[0]
        if kind == "linear":
            for role in ("magnitude", "bias"):
                extra = adapter.infos[keys[role]] if role in keys else None
                if extra is not None and extra.numel != out_f:
                    raise AdapterFormatError(f"tensor {keys[role]!r} has shape {list(extra.shape)}, but its module has "
                                             f"{out_f} outputs (lora_B is {list(b)}): a {role} needs {out_f} values",
                                             adapter.weights_path)
        param_target = targeting.parameter_target(adapter.config, module)
        if param_target is not None and kind == "linear":
            adapter.modules[module] = _param_module(adapter.config, module, param_target, keys, a, b)
            continue
        cfg_r, alpha = targeting.resolve_rank_alpha(adapter.config, module)
        adapter.modules[module] = LoraModule(
            path=module, kind=kind, keys=keys, rank=rank, rank_b=b[1], in_features=in_f, out_features=out_f,
            alpha=alpha, scaling=targeting.scaling(adapter.config, cfg_r, alpha), config_rank=cfg_r,
        )


def _param_module(config: dict[str, Any], module: str, target: tuple[str, int, list[str]], keys: dict[str, str],
                  a: tuple[int, ...], b: tuple[int, ...]) -> LoraModule:
    """A LoRA on parameters of the module (target_parameters): r, alpha and scaling for each parameter it may be."""
    base, depth, names = target
    per_param = {}
    for name in names:
        r, alpha = targeting.resolve_rank_alpha(config, f"{base}.{name}")
        per_param[name] = (r, alpha, targeting.scaling(config, r, alpha))
    only = next(iter(per_param.values())) if len(per_param) == 1 else (0, 0.0, 0.0)
    return LoraModule(path=module, kind="param", keys=keys, rank=a[0], rank_b=b[1], in_features=a[1],
                      out_features=b[0], alpha=only[1], scaling=only[2], config_rank=only[0], depth=depth,
                      wrapper=module[len(base):], per_param=per_param)

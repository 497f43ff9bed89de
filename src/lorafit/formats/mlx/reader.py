"""Read an mlx-lm adapter directory: adapter_config.json (fine_tune_type, num_layers, lora_parameters) and
adapters.safetensors, keys `<module path>.lora_a` (in, r) and `.lora_b` (r, out).

The Adapter presents each module in PEFT's orientation (A: r x in, B: out x r) with scaling = lora_parameters.scale,
so lorafit's core (align, merge) reads mlx adapters as it reads any other; `tensor` transposes on read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter import Adapter, LoraModule
from ...errors import AdapterFormatError, AdapterNotFoundError
from ...fileio.inputs import load_config
from ...fileio.safetensors_header import read_safetensors_header
from ...tensor_info import TensorInfo

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
ROLES = {"lora_a": "A", "lora_b": "B"}


def read_config(path: Path) -> dict[str, Any]:
    """The mlx-lm config, with the fields load_adapters needs checked. Raises AdapterFormatError otherwise."""
    cfg_path = path / CONFIG_NAME
    config = load_config(path, CONFIG_NAME)
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterFormatError(f"fine_tune_type {kind!r}: lorafit reads mlx-lm LoRA adapters", cfg_path)
    params = config.get("lora_parameters")
    if not isinstance(config.get("num_layers"), int) or not isinstance(params, dict):
        raise AdapterFormatError("needs num_layers (an integer) and lora_parameters, as mlx-lm's load_adapters "
                                 "reads them", cfg_path)
    for field in ("rank", "scale"):
        value = params.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value:
            raise AdapterFormatError(f"lora_parameters.{field} must be a number, got {value!r}", cfg_path)
    return config


def _loader(weights: Path) -> Callable[[str], Mapping[str, torch.Tensor]]:
    def load(key: str) -> Mapping[str, torch.Tensor]:
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                return {key: f.get_tensor(key).T.contiguous()}  # PEFT's orientation
        except Exception as e:
            raise AdapterFormatError(f"cannot read tensor {key!r}: {e}", weights) from None

    return load


def read_adapter(spec: str | Path, subfolder: str | None = None) -> Adapter:
    """Read the mlx-lm adapter in directory `spec`. Raises LorafitError subclasses for unreadable input."""
    path = Path(spec).expanduser() / (subfolder or "")
    if path.is_file():
        path = path.parent
    config = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterNotFoundError(f"weights file missing: expected {WEIGHTS_NAME}", path)
    raw, metadata = read_safetensors_header(weights)
    infos = {k: TensorInfo(tuple(reversed(i.shape)), i.dtype, None) for k, i in raw.items()}
    scale = float(config["lora_parameters"]["scale"])
    adapter = Adapter(path=path, weights_path=weights, config=config, infos=infos, metadata=metadata, format="mlx",
                      task_type="CAUSAL_LM", base_model=config.get("model"), load=_loader(weights))
    roles: dict[str, dict[str, str]] = {}
    for key, info in raw.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ROLES or len(info.shape) != 2:
            raise AdapterFormatError(f"tensor {key!r} is not a 2-D lora_a or lora_b", weights)
        roles.setdefault(module, {})[ROLES[leaf]] = key
    for module, keys in sorted(roles.items()):
        if set(keys) != {"A", "B"}:
            adapter.incomplete[module] = sorted(keys)
            continue
        a, b = infos[keys["A"]].shape, infos[keys["B"]].shape
        if a[0] != b[1]:
            raise AdapterFormatError(f"{keys['A']!r} has rank {a[0]} but {keys['B']!r} has rank {b[1]}", weights)
        adapter.modules[module] = LoraModule(path=module, kind="linear", keys=keys, rank=a[0], rank_b=b[1],
                                             in_features=a[1], out_features=b[0], alpha=scale * a[0], scaling=scale,
                                             config_rank=a[0])
    if not adapter.modules:
        raise AdapterFormatError("holds no lora_a/lora_b pair", weights)
    return adapter

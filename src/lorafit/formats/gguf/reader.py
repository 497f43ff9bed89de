"""Read a GGUF LoRA adapter (llama.cpp's `--lora` file): general.type=adapter, adapter.type=lora, adapter.lora.alpha,
and `<base tensor>.lora_a` / `.lora_b` pairs. Module paths are the base tensor names without `.weight`
(`blk.0.attn_q`); shapes are given in torch order (A: r x in, B: out x r), as the gguf package returns them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter import Adapter, LoraModule
from ...errors import AdapterFormatError, AdapterNotFoundError
from ...tensor_info import TensorInfo
from . import gguf_package

if TYPE_CHECKING:
    import torch

_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


def _field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def open_gguf(path: Path) -> Any:
    """The gguf package's reader of `path`. Raises AdapterFormatError when the file is not a whole GGUF file."""
    GGUFReader = gguf_package().GGUFReader  # noqa: N806

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError or struct errors on a truncated file
        raise AdapterFormatError(f"is not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})", path) from None


def read_adapter(spec: str | Path, subfolder: str | None = None) -> Adapter:
    """Read a GGUF LoRA adapter file. Raises LorafitError subclasses for unreadable or inconsistent input."""
    path = Path(spec).expanduser() / (subfolder or "")
    if not path.is_file():
        raise AdapterNotFoundError("no such GGUF file", path)
    reader = open_gguf(path)
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        raise AdapterFormatError("is a GGUF file but not a LoRA adapter (general.type=adapter, adapter.type=lora)",
                                 path)
    alpha = float(_field(reader, "adapter.lora.alpha") or 0.0)
    tensors = {t.name: t for t in reader.tensors}
    infos: dict[str, TensorInfo] = {}
    roles: dict[str, dict[str, str]] = {}
    for name, t in tensors.items():
        dtype = _DTYPES.get(t.tensor_type.name)
        stem, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b") or dtype is None or len(t.data.shape) != 2:
            raise AdapterFormatError(f"tensor {name!r} is not a 2-D float lora_a or lora_b", path)
        infos[name] = TensorInfo(tuple(int(d) for d in t.data.shape), dtype)
        roles.setdefault(stem.removesuffix(".weight"), {})["A" if leaf == "lora_a" else "B"] = name
    config = {"adapter.lora.alpha": alpha, "general.architecture": _field(reader, "general.architecture")}
    adapter = Adapter(path=path, weights_path=path, config=config, infos=infos, format="gguf",
                      task_type="CAUSAL_LM", load=_loader(tensors))
    for module, keys in sorted(roles.items()):
        if set(keys) != {"A", "B"}:
            raise AdapterFormatError(f"LoRA tensor pair for {module!r} is missing one component", path)
        a, b = infos[keys["A"]].shape, infos[keys["B"]].shape
        if a[0] != b[1]:
            raise AdapterFormatError(f"{keys['A']!r} has rank {a[0]} but {keys['B']!r} has rank {b[1]}", path)
        adapter.modules[module] = LoraModule(path=module, kind="linear", keys=keys, rank=a[0], rank_b=b[1],
                                             in_features=a[1], out_features=b[0], alpha=alpha,
                                             scaling=alpha / a[0] if alpha else 1.0, config_rank=a[0])
    if not adapter.modules:
        raise AdapterFormatError("holds no lora_a/lora_b pair", path)
    return adapter


def _loader(tensors: Mapping[str, Any]) -> Callable[[str], Mapping[str, torch.Tensor]]:
    def load(key: str) -> Mapping[str, torch.Tensor]:
        import numpy as np
        import torch

        return {key: torch.from_numpy(np.array(tensors[key].data))}

    return load

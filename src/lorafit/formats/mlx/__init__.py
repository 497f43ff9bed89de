"""The mlx-lm format: adapter_config.json with lora_parameters, and adapters.safetensors (lora_a / lora_b)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ...adapter import Adapter
from .. import ReadOnlyFormat, register_format
from .reader import CONFIG_NAME, WEIGHTS_NAME

_LAYER = re.compile(r"^(?P<stem>.*\blayers)\.(?P<n>\d+)\.(?P<key>.+)$")


def layer_key(path: str) -> tuple[str, int, str] | None:
    """'model.layers.3.self_attn.q_proj' -> ('model.layers', 3, 'self_attn.q_proj'): how mlx-lm names a LoRA."""
    m = _LAYER.match(path)
    return (m.group("stem"), int(m.group("n")), m.group("key")) if m else None


class MlxFormat(ReadOnlyFormat):
    """mlx-lm's LoRA adapters, as mlx_lm.tuner.utils.load_adapters reads them."""

    name = "mlx"

    def sniff(self, path: Path) -> bool:
        """mlx-lm's weights file name; the config is not opened here (it may be a FIFO or huge: the reader's
        guarded JSON read judges it)."""
        if path.name == CONFIG_NAME:
            path = path.parent
        return (path / WEIGHTS_NAME).is_file()

    def read(self, spec: str | Path, subfolder: str | None = None) -> Adapter:
        from .reader import read_adapter

        return read_adapter(spec, subfolder)

    def targeting(self, adapter: Adapter) -> Callable[[str], bool]:
        """The `keys` of the last `num_layers` layers (the layer count is the adapter's own: it covers the last)."""
        cfg = adapter.config
        keys = set(cfg["lora_parameters"].get("keys") or [])
        found = [k for k in map(layer_key, adapter.modules) if k]
        top = max((n for _, n, _ in found), default=-1)
        first = top + 1 - int(cfg["num_layers"])

        def targeted(path: str) -> bool:
            k = layer_key(path)
            return k is not None and k[1] >= first and k[2] in keys

        return targeted


register_format(MlxFormat())

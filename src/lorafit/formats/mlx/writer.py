"""Write mlx-lm adapters from PEFT ones, and PEFT adapters from mlx-lm ones, exactly.

PEFT -> mlx-lm: paths lose `base_model.model.`; lora_a = Aᵀ, lora_b = Bᵀ; one rank (the largest: smaller ranks are
zero-padded, which adds nothing) and one scale (the most common; a module trained with another scale, from
use_rslora or alpha_pattern, has it folded into its lora_b); `num_layers` reaches down to the lowest adapted layer,
and a layer x key cell the adapter lacks is written as zeros (B = 0 adds nothing), since mlx-lm wraps every cell.
mlx-lm -> PEFT: transposed back, lora_alpha = scale x rank, layers_to_transform = the layers mlx-lm wraps.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter import Adapter
from ...errors import LorafitError
from ...fileio.outputs import save_tensors, write_json
from ...version import __version__
from ..peft.reader import PEFT_PREFIX, strip_root
from . import layer_key

if TYPE_CHECKING:
    import torch



def to_mlx(a: Adapter, out: Path, num_hidden_layers: int | None, paths: dict[str, str] | None = None
           ) -> dict[str, Any]:
    """Write `a` as an mlx-lm adapter into the directory `out`; `paths` renames module paths (adapter -> base's
    class, from a landing), else `base_model.model.` is stripped. Returns how (rank, scale, num_layers, ...)."""
    import torch

    mods = {(paths or {}).get(m.path) or strip_root(m.path): m for m in a.modules.values()}
    cells = {p: layer_key(p) for p in mods}
    stems = {c[0] for c in cells.values() if c}
    if len(stems) != 1:
        raise LorafitError(f"the adapter's layers lie under {sorted(stems)}; mlx-lm wraps one stack", a.path)
    stem = stems.pop()
    layers = [c[1] for c in cells.values() if c]
    total = num_hidden_layers or max(layers) + 1
    first = min(layers)
    keys = sorted({c[2] for c in cells.values() if c})
    rank = max(m.rank for m in mods.values())
    scale = Counter(round(m.scaling, 12) for m in mods.values()).most_common(1)[0][0]
    shapes = {c[2]: (m.in_features, m.out_features) for p, m in mods.items() if (c := cells[p])}
    tensors: dict[str, torch.Tensor] = {}
    folded = 0
    for n in range(first, total):
        for key in keys:
            path = f"{stem}.{n}.{key}"
            m = mods.get(path)
            if m is None:  # a cell mlx-lm wraps that the adapter lacks: zeros add nothing
                i, o = shapes[key]
                dtype = a.tensor(next(iter(mods.values())).keys["A"]).dtype
                tensors[f"{path}.lora_a"] = torch.zeros(i, rank, dtype=dtype)
                tensors[f"{path}.lora_b"] = torch.zeros(rank, o, dtype=dtype)
                continue
            A, B = a.tensor(m.keys["A"]), a.tensor(m.keys["B"])
            if round(m.scaling, 12) != scale:
                B = (B.double() * (m.scaling / scale)).to(B.dtype)
                folded += 1
            lora_a = torch.zeros(A.shape[1], rank, dtype=A.dtype)
            lora_a[:, : m.rank] = A.T
            lora_b = torch.zeros(rank, B.shape[0], dtype=B.dtype)
            lora_b[: m.rank] = B.T
            tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"] = lora_a, lora_b
    save_tensors(tensors, out / "adapters.safetensors", {"format": "mlx", "lorafit.version": __version__})
    dropout = a.config.get("lora_dropout", 0.0) if a.format == "peft" else 0.0
    config = {"fine_tune_type": "lora", "num_layers": total - first,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": keys}}
    if a.base_model:
        config["model"] = a.base_model
    write_json(out / "adapter_config.json", config)
    return {"num_layers": total - first, "rank": rank, "scale": scale, "scale_folded_into_lora_b": folded,
            "zero_cells": len(tensors) // 2 - len(mods)}


def to_peft(a: Adapter, out: Path) -> dict[str, Any]:
    """Write the mlx-lm adapter `a` as a PEFT adapter into the directory `out`. Returns r, lora_alpha, layers."""

    cfg = a.config
    params = cfg["lora_parameters"]
    rank, scale = int(params["rank"]), float(params["scale"])
    tensors = {}
    for m in a.modules.values():
        tensors[f"{PEFT_PREFIX}{m.path}.lora_A.weight"] = a.tensor(m.keys["A"])
        tensors[f"{PEFT_PREFIX}{m.path}.lora_B.weight"] = a.tensor(m.keys["B"])
    save_tensors(tensors, out / "adapter_model.safetensors", {"format": "pt"})
    cells = [c for c in map(layer_key, a.modules) if c]
    top = max(c[1] for c in cells)
    layers = list(range(top + 1 - int(cfg["num_layers"]), top + 1))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": scale * rank,
              "target_modules": sorted({c[2].rsplit(".", 1)[-1] for c in cells}),
              "lora_dropout": float(params.get("dropout", 0.0)), "bias": "none", "use_rslora": False,
              "layers_to_transform": layers if layers[0] > 0 else None, "layers_pattern": None,
              "base_model_name_or_path": cfg.get("model"), "inference_mode": True}
    write_json(out / "adapter_config.json", config)
    return {"r": rank, "lora_alpha": scale * rank, "layers_to_transform": config["layers_to_transform"]}

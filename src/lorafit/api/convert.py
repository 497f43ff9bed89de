"""convert: a PEFT adapter to mlx-lm's format and back, exactly, or a refusal that says why.

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

from ..adapter import Adapter
from ..errors import LorafitError
from ..fileio.outputs import OutputDir, write_json
from ..findings import Finding
from ..formats import ensure_adapter
from ..formats.mlx import layer_key
from ..report import Report
from ..version import __version__
from .check import adapter_summary

if TYPE_CHECKING:
    import torch

TARGETS = ("mlx", "peft")
PEFT_ROOT = "base_model.model."


def _refusals(a: Adapter) -> list[str]:
    """What PEFT -> mlx-lm cannot carry exactly."""
    why = []
    if any(m.has_dora for m in a.modules.values()):
        why.append("DoRA magnitudes (mlx-lm's DoRA layers are not PEFT's)")
    if any(m.has_bias for m in a.modules.values()):
        why.append("lora_B biases (mlx-lm's LoRA has none)")
    if a.extras:
        why.append(f"{len(a.extras)} full tensors (modules_to_save or saved embeddings), which mlx-lm adapters cannot "
                   "hold")
    odd = [m.path for m in a.modules.values() if m.kind != "linear"]
    if odd:
        why.append(f"LoRA on {len(odd)} non-linear modules (embeddings, convolutions or MoE parameters), e.g. "
                   f"{odd[0]}")
    outside = [m.path for m in a.modules.values() if m.kind == "linear" and layer_key(_strip(m.path)) is None]
    if outside:
        why.append(f"{len(outside)} modules outside the decoder layers (mlx-lm wraps modules of model.layers only), "
                   f"e.g. {outside[0]}")
    if a.unrooted_keys or a.incomplete:
        why.append("keys PEFT itself would not load (run lorafit check)")
    return why


def _strip(path: str) -> str:
    return path.removeprefix(PEFT_ROOT)


def _to_mlx(a: Adapter, out: Path, num_hidden_layers: int | None) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    mods = {_strip(m.path): m for m in a.modules.values()}
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
    save_file(tensors, str(out / "adapters.safetensors"), metadata={"format": "mlx", "lorafit.version": __version__})
    dropout = a.config.get("lora_dropout", 0.0) if a.format == "peft" else 0.0
    config = {"fine_tune_type": "lora", "num_layers": total - first,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": keys}}
    if a.base_model:
        config["model"] = a.base_model
    write_json(out / "adapter_config.json", config)
    return {"num_layers": total - first, "rank": rank, "scale": scale, "scale_folded_into_lora_b": folded,
            "zero_cells": len(tensors) // 2 - len(mods)}


def _to_peft(a: Adapter, out: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    cfg = a.config
    params = cfg["lora_parameters"]
    rank, scale = int(params["rank"]), float(params["scale"])
    tensors = {}
    for m in a.modules.values():
        tensors[f"{PEFT_ROOT}{m.path}.lora_A.weight"] = a.tensor(m.keys["A"])
        tensors[f"{PEFT_ROOT}{m.path}.lora_B.weight"] = a.tensor(m.keys["B"])
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
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


def _num_layers(base: str | Path | None) -> int | None:
    if base is None:
        return None
    from ..targets.transformers.resolve import open_model_dir

    config = open_model_dir(base).config
    text = config.get("text_config")
    n = (text if isinstance(text, dict) else config).get("num_hidden_layers")
    return n if isinstance(n, int) else None


def convert(adapter: Adapter | str | Path, to: str, out: str | Path, base: str | Path | None = None,
            force: bool = False) -> Report:
    """Write `adapter` in the format `to` ("mlx" or "peft") to `out`, exactly, or refuse and write nothing.

    Args:
        base: the base model; for PEFT -> mlx-lm its num_hidden_layers, when the adapter's layers_to_transform
            leaves its top layers out (mlx-lm counts num_layers from the top).
    Returns:
        a Report (command "convert"); not ok, and nothing written, when the adapter cannot be converted exactly.
    Raises:
        LorafitError: unreadable input, unknown target format, OUT exists without force.
    """
    if to not in TARGETS:
        raise LorafitError(f"unknown --to {to!r}; known: {', '.join(TARGETS)}")
    a = ensure_adapter(adapter)
    out = Path(out)
    report = Report("convert", adapter=adapter_summary(a, None), result={"written": False, "out": str(out), "to": to})
    if a.format == to:
        raise LorafitError(f"the adapter is already in the {to} format", a.path)
    why = _refusals(a)
    partial = a.format == "peft" and a.config.get("layers_to_transform") is not None
    if to == "mlx" and partial and base is None:
        why.append("layers_to_transform is set, so the base's layer count is needed (mlx-lm counts num_layers from "
                   "the top layer): pass --base")
    if why:
        report.findings.append(Finding("convert-refused", f"cannot convert to {to} exactly: {'; '.join(why)}"))
        return report
    with OutputDir(out, force=force, protect=[a.path]) as tmp:
        done = _to_mlx(a, tmp, _num_layers(base)) if to == "mlx" else _to_peft(a, tmp)
    report.findings.append(Finding("converted", f"wrote {out} ({to})"))
    report.result |= {"written": True, **done}
    return report

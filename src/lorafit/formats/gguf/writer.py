"""Write a PEFT adapter as a GGUF LoRA that llama.cpp applies exactly as PEFT does.

- Tensor names come from the gguf package's tensor-name map for the base's architecture, plus `.lora_a`/`.lora_b`.
- llama.cpp scales every pair by adapter.lora.alpha / rank (rank from that pair), and ignores use_rslora and
  patterns: one alpha is written, and a module trained with another scale gets the ratio folded into its lora_b.
- For the llama architecture, llama.cpp's converter regroups the rows of q_proj and k_proj (the rotary halves of
  each head), so their lora_b rows are regrouped the same way; lora_a is untouched.
- Tensors are written as F32: exact for F32, F16 and BF16 adapters.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter import Adapter
from ...version import __version__
from . import gguf_package

if TYPE_CHECKING:
    import numpy as np

# HF model_type -> (gguf architecture, whether llama.cpp regroups q/k rows). Only what a test proves is listed.
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}


@dataclass
class GgufPlan:
    """Where each adapted module goes: adapter module path -> (GGUF base tensor name, row regrouping or None)."""

    arch: str
    names: dict[str, tuple[str, tuple[int, int] | None]]
    unmapped: list[str]


def plan(a: Adapter, landing: dict[str, str], config: dict[str, Any]) -> GgufPlan | str:
    """The GGUF names of the adapter's modules on the base (`landing`: adapter path -> base module path), or why not."""
    gguf = gguf_package()

    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        return (f"lorafit writes GGUF adapters for {', '.join(sorted(ARCHITECTURES))} bases; this base is "
                f"{model_type!r}")
    arch_name, regroup = ARCHITECTURES[model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    tmap = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    names: dict[str, tuple[str, tuple[int, int] | None]] = {}
    unmapped = []
    for path, base_path in landing.items():
        name = tmap.get_name(base_path + ".weight", try_suffixes=(".weight",))
        if name is None:
            unmapped.append(path)
            continue
        rows = None
        if regroup and base_path.endswith("q_proj"):
            rows = (heads, heads)
        elif regroup and base_path.endswith("k_proj"):
            rows = (heads, kv_heads)
        names[path] = (name, rows)
    return GgufPlan(gguf.MODEL_ARCH_NAMES[arch], names, unmapped)


def regroup_rows(w: np.ndarray, n_head: int, n_kv_head: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q/k weights: within each head, the two rotary halves interleaved."""
    heads = n_kv_head if n_kv_head != n_head else n_head
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write(a: Adapter, p: GgufPlan, out_file: Path) -> dict[str, Any]:
    """Write the GGUF adapter; returns how (alpha, scales folded)."""
    gguf = gguf_package()
    import numpy as np

    mods = [m for m in a.modules.values() if m.path in p.names]
    alpha = Counter(round(m.scaling * m.rank, 12) for m in mods).most_common(1)[0][0]
    writer = gguf.GGUFWriter(str(out_file), p.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_string("lorafit.version", __version__)
    folded = 0
    for m in mods:
        name, rows = p.names[m.path]
        lora_a = a.tensor(m.keys["A"]).float().numpy()
        lora_b = a.tensor(m.keys["B"]).double().numpy()
        factor = m.scaling * m.rank / alpha
        if round(factor, 12) != 1.0:
            lora_b = lora_b * factor
            folded += 1
        if rows is not None:
            lora_b = regroup_rows(lora_b, *rows)
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(lora_a, dtype=np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(lora_b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": p.arch, "alpha": alpha, "scale_folded_into_lora_b": folded, "modules": len(mods)}

"""What the serving runtimes read off an adapter, worked out once for all their rules.

The serving runtimes (vLLM, SGLang, LoRAX, and llama.cpp's converter) read PEFT's own files, so these traits
are PEFT's config fields and tensor roles as those runtimes see them. Nothing here reads tensor data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ...adapter import Adapter
from ...formats.peft.reader import strip_root

# Module names under which multimodal models keep their vision tower and projector (HF layouts).
VISION_PARTS = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "vision_embed", "image_newline")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(path: str) -> int | None:
    """The decoder layer id in `path` as SGLang's get_layer_id finds it (`layers.N.`), or None."""
    m = _LAYER.search(path + ".")
    return int(m.group(1)) if m else None


def is_vision(path: str) -> bool:
    return any(part in VISION_PARTS for part in path.split("."))


@dataclass
class Traits:
    """An adapter as a serving runtime reads it."""

    format: str
    r: int
    alpha: float
    max_rank: int  # the largest rank any module's tensors have
    rslora: bool
    dora: bool
    lora_bias: bool  # lora_B.bias tensors, or lora_bias true
    bias: str  # PEFT's bias field ("none", "all", "lora_only")
    rank_pattern: dict[str, Any]
    alpha_pattern: dict[str, Any]
    init: Any  # init_lora_weights
    target_modules: Any
    modules: list[str]  # adapted module paths as saved, without base_model.model.
    names: set[str]  # the last component of each adapted module path
    full_weights: list[str]  # keys of saved full tensors (modules_to_save copies, saved embeddings)
    modules_to_save: list[str]

    @property
    def global_scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def traits_of(adapter: Adapter) -> Traits:
    """The traits of a PEFT adapter (another format gets its r and alpha from its modules)."""
    cfg = adapter.config if adapter.format == "peft" else {}
    mods = list(adapter.modules.values())
    r = int(cfg.get("r") or (mods[0].config_rank or mods[0].rank if mods else 1) or 1)
    alpha = float(cfg["lora_alpha"]) if cfg.get("lora_alpha") is not None else float(r)
    return Traits(
        format=adapter.format, r=r, alpha=alpha, max_rank=max([m.rank for m in mods if m.kind != "param"] or [r]),
        rslora=bool(cfg.get("use_rslora")), dora=any(m.has_dora for m in mods) or bool(cfg.get("use_dora")),
        lora_bias=any(m.has_bias for m in mods) or bool(cfg.get("lora_bias")), bias=str(cfg.get("bias") or "none"),
        rank_pattern=dict(cfg.get("rank_pattern") or {}), alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        init=cfg.get("init_lora_weights", True), target_modules=cfg.get("target_modules"),
        modules=[strip_root(m.path) for m in mods], names={m.path.rsplit(".", 1)[-1] for m in mods},
        full_weights=[x.key for x in adapter.extras], modules_to_save=list(cfg.get("modules_to_save") or []),
    )

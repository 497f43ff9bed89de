"""ModuleTree: the target's module paths with kind and shapes, as plain data.

A runtime builds it (targets/): transformers from a live module, a meta-device build, a blueprint or its cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .adapter import LoraKind


@dataclass(frozen=True)
class ModuleInfo:
    """One module of the target: kind, the features LoRA sees, and its direct parameters' shapes.

    For GPT-2's Conv1D the weight is stored [in, out], so weight_shape is the transpose of Linear's.
    `params` keeps the order the module registers them in: PEFT nests its wrappers of targeted parameters
    in that order.
    """

    kind: str  # Linear, Conv1D, Embedding, Conv2d, ..., or the class name of a container
    in_features: int | None = None
    out_features: int | None = None
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Fused MoE experts store each expert [in, out] (transformers' `is_transposed`, GPT-OSS) instead of [out, in].
    transposed: bool = False

    def param_features(self, name: str) -> tuple[int, int, int] | None:
        """(experts, in, out) a LoRA on the 2-D or 3-D parameter `name` sees, as PEFT reads them; None if not one."""
        shape = self.params.get(name)
        if shape is None or len(shape) not in (2, 3):
            return None
        if len(shape) == 2:
            return 1, shape[1], shape[0]
        experts, a, b = shape
        return (experts, a, b) if self.transposed else (experts, b, a)

    @property
    def lora_kind(self) -> LoraKind | None:
        """The LoraModule kind that can land on this module, or None when PEFT cannot adapt it."""
        if self.kind in ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear"):
            return "linear"
        if self.kind == "Embedding":
            return "embedding"
        if self.kind.startswith("Conv"):
            return "conv"
        return None


@dataclass(frozen=True)
class StoredPart:
    """A checkpoint tensor that holds part of a parameter as the model loads it.

    transformers v5 fuses per-expert weights on load (`experts.{e}.gate_proj.weight` and `...up_proj.weight`
    into `experts.gate_up_proj`): each is rows [start, stop) of expert `expert`. A renamed tensor is a whole
    part (expert None).
    """

    key: str
    expert: int | None = None
    start: int = 0
    stop: int = 0


@dataclass
class ModuleTree:
    """The module paths of the model PEFT will wrap, as plain data (align and diagnose need no torch)."""

    class_name: str
    modules: dict[str, ModuleInfo]
    model_type: str | None = None
    base_model_prefix: str = ""
    can_generate: bool = False
    implied_task_type: str | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    input_embeddings: str | None = None
    output_embeddings: str | None = None
    source: str | None = None
    converts_keys: bool = False  # PEFT renames adapter keys on load (transformers' conversion mapping)
    # Regexes matching every key that conversion touches (None: not known, ask PEFT whenever it converts).
    conversion_patterns: list[str] | None = None
    # Parameters that are one tensor under several names, beyond the input/output embedding tie that
    # tie_word_embeddings describes: alias "model.encoder.embed_tokens.weight" -> "model.shared.weight" (BART).
    tied: dict[str, str] = field(default_factory=dict)
    # Where the tree came from: "module" (a live model), "meta" (a meta-device build), "blueprint", "cache".
    origin: str | None = None

    def stored_names(self, name: str) -> list[str]:
        """The checkpoint names transformers loads the parameter `name` from: as is, prefixed, or stripped.

        A head class holds the backbone under base_model_prefix; a checkpoint saved from the backbone alone
        lacks that prefix, and one saved from a head class has it where the backbone does not.
        """
        prefix = self.base_model_prefix
        out = [name]
        if prefix:
            out.append(f"{prefix}.{name}")
            if name.startswith(prefix + "."):
                out.append(name[len(prefix) + 1:])
        return out

    def parameter_names(self) -> list[str]:
        """Every parameter's full name, each stored tensor once (tied aliases and tied output embeddings left out)."""
        out_emb = f"{self.output_embeddings}.weight" if self.tie_word_embeddings and self.output_embeddings else None
        names = [f"{p}.{n}" if p else n for p, info in self.modules.items() for n in info.params]
        return [n for n in names if n not in self.tied and n != out_emb]

    def summary(self) -> dict[str, Any]:
        return {
            "class": self.class_name, "model_type": self.model_type, "source": self.source,
            "base_model_prefix": self.base_model_prefix, "modules": len(self.modules),
            "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
            "tree_from": self.origin,
        }

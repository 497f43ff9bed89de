"""What a merge writes: for every tensor of the base checkpoint, where its value comes from and which deltas land on it.

Pure data from an Alignment, the ModuleTree and the checkpoint's key names; no torch, no IO. `merge`
executes the plan with PEFT's arithmetic and `verify-merge` checks a merged checkpoint against it in
higher precision.

Names: the plan speaks the *checkpoint's* tensor names. The tree's module paths depend on the class
(`layers.0...` for LlamaModel, `model.layers.0...` for LlamaForCausalLM), so a tree path is matched to
a checkpoint key the way transformers loads one: as is, with the base_model_prefix added, or stripped.

Tied embeddings follow PEFT: a LoRA on either side is merged into the one shared tensor (both sides
change); a modules_to_save copy of one side replaces that side only, so the two are written apart and
the config says tie_word_embeddings=false. Other tied names (ModuleTree.tied, e.g. BART's encoder and
decoder embed_tokens, stored once as model.shared) resolve to the stored tensor, and every delta of
every name lands on it in module order, as PEFT's in-place merges do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..adapter import Adapter, LoraKind
from ..align import Landing
from ..errors import LorafitError
from ..tree import ModuleTree

# Adapter features whose merge is not ΔW = B @ A (or DoRA); refused rather than merged wrongly.
UNSUPPORTED_CONFIG = ("target_parameters", "trainable_token_indices", "layer_replication", "alora_invocation_tokens",
                      "arrow_config", "use_bdlora", "velora_config", "monteclora_config", "kasa_config")


# How a delta is added: GPT-2's Conv1D stores the weight [in, out] (PEFT's fan_in_fan_out), so it is transposed.
DeltaKind = Literal["linear", "conv1d", "embedding", "conv"]


@dataclass(frozen=True)
class Delta:
    """One adapter module's change to one tensor: its kind, PEFT's scaling, and the adapter keys it reads."""

    module: str  # the module path as saved in the adapter
    target: str  # the module path in the tree
    kind: DeltaKind
    keys: Mapping[str, str]  # role (A, B, magnitude, bias) -> adapter key
    scaling: float
    dora: bool = False
    role: str = "weight"  # "weight", or "bias" for lora_bias


@dataclass
class TensorPlan:
    """One output tensor the adapter changes: start from `source` (or the adapter tensor `replace`), then add deltas."""

    name: str
    source: str  # base key: the starting value, and the dtype and shape of the output
    replace: str | None = None  # adapter key that replaces the base value (modules_to_save, saved base layer, bias)
    deltas: list[Delta] = field(default_factory=list)


@dataclass
class MergePlan:
    """Every output tensor in write order, its base source, and the plans of those the adapter changes."""

    order: list[str]
    sources: dict[str, str]  # output key -> base key (the same key unless an embedding was untied)
    changes: dict[str, TensorPlan]
    untied: list[str] = field(default_factory=list)  # tied embedding keys now written apart
    tied_shared: list[str] = field(default_factory=list)  # tied keys that changed together, as in PEFT

    @property
    def modules(self) -> list[str]:
        """Adapter module paths merged somewhere (each once)."""
        return sorted({d.module for p in self.changes.values() for d in p.deltas})


def _kind(adapter_kind: LoraKind, tree_kind: str) -> DeltaKind:
    if adapter_kind == "embedding":
        return "embedding"
    if adapter_kind == "linear":
        return "conv1d" if tree_kind == "Conv1D" else "linear"
    return adapter_kind


def _key_resolver(tree: ModuleTree, keys: set[str]) -> Any:
    prefix = tree.base_model_prefix

    def key_of(path: str, param: str) -> str | None:
        name = f"{path}.{param}" if path else param
        candidates = [name]
        if prefix:
            candidates.append(f"{prefix}.{name}")
            if name.startswith(prefix + "."):
                candidates.append(name[len(prefix) + 1:])
        return next((c for c in candidates if c in keys), None)

    return key_of


def build_plan(adapter: Adapter, tree: ModuleTree, mapping: Landing, keys: Sequence[str],
               where: Path | None = None) -> MergePlan:
    """Plan the merge of `adapter` (landed by `mapping` on `tree`) into a checkpoint holding `keys`, in order.

    Returns:
        the MergePlan; modules that `mapping` does not land are left out (check reports them).
    Raises:
        LorafitError: an adapted module has no weight in the checkpoint, or its kind cannot be merged.
    """
    cfg = adapter.config
    bad = [k for k in UNSUPPORTED_CONFIG if cfg.get(k)]
    if bad:
        raise LorafitError(f"the adapter uses {', '.join(bad)}, which lorafit merge does not support", adapter.path)
    key_of = _key_resolver(tree, set(keys))
    order_of = {p: i for i, p in enumerate(tree.modules)}
    deltas: dict[tuple[str, str], list[Delta]] = {}
    for src, dst in mapping.pairs.items():
        m = adapter.modules[src]
        kind = _kind(m.kind, tree.modules[dst].kind)
        if kind == "conv":
            raise LorafitError(f"cannot merge {src}: LoRA on convolution layers is not supported by lorafit merge",
                               adapter.path)
        sc = m.scaling
        deltas.setdefault((dst, "weight"), []).append(Delta(src, dst, kind, m.keys, sc, m.has_dora))
        if m.has_bias:
            deltas.setdefault((dst, "bias"), []).append(Delta(src, dst, kind, m.keys, sc, role="bias"))
    replaced: dict[tuple[str, str], str] = {}
    copies: set[tuple[str, str]] = set()  # replaced by a modules_to_save copy (a new module, not an in-place load)
    extras = {x.key: x for x in adapter.extras}
    for key, dst in mapping.tensor_pairs.items():
        slot = (dst, extras[key].param)
        replaced[slot] = key
        if extras[key].kind == "modules_to_save":
            copies.add(slot)

    def resolve(slot: tuple[str, str]) -> str:
        name = key_of(*slot)
        alias_of = tree.tied.get(f"{slot[0]}.{slot[1]}" if slot[0] else slot[1])
        if name is None and alias_of is not None:
            # A tied alias the checkpoint stores once (BART's encoder/decoder embed_tokens -> model.shared).
            path, _, param = alias_of.rpartition(".")
            name = key_of(path, param)
        if name is None:
            what = f"{slot[0]}.{slot[1]}"
            raise LorafitError(f"the base checkpoint has no tensor for {what} (tried {what!r} with and without "
                               f"the {tree.base_model_prefix!r} prefix); pass the --class it was saved with",
                               where)
        return str(name)

    changes: dict[str, TensorPlan] = {}
    extra_names: list[str] = []
    plan = MergePlan(order=[], sources={}, changes=changes)
    in_path, out_path = tree.input_embeddings, tree.output_embeddings
    tied = bool(tree.tie_word_embeddings and in_path and out_path and in_path != out_path)
    if tied and in_path is not None and out_path is not None and key_of(in_path, "weight") is not None:
        sides = [(in_path, "weight"), (out_path, "weight")]
        touched = [s for s in sides if s in deltas or s in replaced]
        if touched:
            in_key = resolve(sides[0])
            shared_replace = next((replaced[s] for s in sides if s in replaced and s not in copies), None)
            if any(s in copies for s in sides):
                # A trained copy of one side replaces that side only: the two tensors part, as PEFT's do.
                for s in sides:
                    name = key_of(*s) or f"{s[0]}.weight"
                    rep = replaced[s] if s in copies else shared_replace
                    changes[name] = TensorPlan(name, in_key, rep, list(deltas.get(s, [])))
                    if name not in keys:
                        extra_names.append(name)
                    plan.untied.append(name)
            else:
                # One shared tensor: every delta of either side lands on it, in PEFT's module order.
                both = sorted(deltas.get(sides[0], []) + deltas.get(sides[1], []), key=lambda d: order_of[d.target])
                for s in sides:
                    name = key_of(*s)
                    if name is not None:
                        changes[name] = TensorPlan(name, in_key, shared_replace, both)
                        plan.tied_shared.append(name)
            for s in sides:
                deltas.pop(s, None)
                replaced.pop(s, None)
    for slot in sorted(set(deltas) | set(replaced), key=lambda s: (order_of.get(s[0], -1), s[1])):
        name = resolve(slot)
        if name in changes:  # another name of the same tensor: PEFT adds each delta to the one parameter
            if replaced.get(slot) is not None or changes[name].replace is not None:
                raise LorafitError(f"cannot merge {slot[0]}: it shares its tensor {name} with another adapted "
                                   "module, and one of them is replaced by a trained copy", adapter.path)
            changes[name].deltas.extend(deltas.get(slot, []))
            if name not in plan.tied_shared:
                plan.tied_shared.append(name)
            continue
        changes[name] = TensorPlan(name, name, replaced.get(slot), list(deltas.get(slot, [])))
    plan.order = list(keys) + extra_names
    plan.sources = {k: k for k in keys} | {n: changes[n].source for n in extra_names}
    return plan

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
from typing import Literal

from ..adapter import Adapter, LoraKind
from ..align import Landing
from ..errors import LorafitError
from ..tree import ModuleTree, StoredPart

# Adapter features whose merge is not ΔW = B @ A (or DoRA); refused rather than merged wrongly.
UNSUPPORTED_CONFIG = ("trainable_token_indices", "layer_replication", "alora_invocation_tokens",
                      "arrow_config", "use_bdlora", "velora_config", "monteclora_config", "kasa_config")


# How a delta is added: GPT-2's Conv1D stores the weight [in, out] (PEFT's fan_in_fan_out), so it is transposed;
# "param" is a LoRA on a parameter (PEFT's ParamWrapper), per expert for fused MoE experts.
DeltaKind = Literal["linear", "conv1d", "embedding", "conv", "param"]


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
    experts: int = 1  # kind "param": the parameter's experts (1: a 2-D parameter)
    transposed: bool = False  # kind "param": experts stored [in, out] (transformers' is_transposed)


@dataclass
class TensorPlan:
    """One output tensor the adapter changes: start from `source` (or the adapter tensor `replace`), then add deltas."""

    name: str
    source: str  # base key: the starting value, and the dtype and shape of the output
    replace: str | None = None  # adapter key that replaces the base value (modules_to_save, saved base layer, bias)
    deltas: list[Delta] = field(default_factory=list)
    # The checkpoint stores the parameter the deltas change in parts (per-expert weights that transformers fuses
    # on load): this tensor is rows [start, stop) of expert `expert` of it.
    window: tuple[int, int, int] | None = None


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


Slot = tuple[str, str]  # (module path in the tree, parameter name): one tensor as the tree names it


def _kind(adapter_kind: LoraKind, tree_kind: str) -> DeltaKind:
    """How a LoRA module of `adapter_kind` is added to a tree module of `tree_kind` (Conv1D is stored transposed)."""
    if adapter_kind == "embedding":
        return "embedding"
    if adapter_kind == "linear":
        return "conv1d" if tree_kind == "Conv1D" else "linear"
    return adapter_kind


@dataclass(frozen=True)
class _CheckpointNames:
    """Finds the checkpoint key of a tree slot the way transformers loads one: as is, prefixed, or stripped."""

    tree: ModuleTree
    keys: set[str]  # the base checkpoint's tensor names
    where: Path | None  # the base checkpoint, named when a slot has no key
    stored: Mapping[str, Sequence[StoredPart]] = field(default_factory=dict)  # loaded name -> checkpoint parts

    def _candidates(self, path: str, param: str) -> list[str]:
        return self.tree.stored_names(f"{path}.{param}" if path else param)

    def key_of(self, path: str, param: str) -> str | None:
        """The key holding `path`.`param`, or None; the first of: as is, with the prefix, without it, renamed."""
        candidates = self._candidates(path, param)
        found = next((c for c in candidates if c in self.keys), None)
        if found is not None:
            return found
        renamed = (self.stored.get(c, ()) for c in candidates)  # a whole tensor under its checkpoint name
        return next((p[0].key for p in renamed if len(p) == 1 and p[0].expert is None), None)

    def parts_of(self, path: str, param: str) -> Sequence[StoredPart]:
        """The per-expert checkpoint tensors that hold `path`.`param` when transformers fuses them on load, else ()."""
        return next((p for c in self._candidates(path, param) for p in [self.stored.get(c, ())]
                     if p and p[0].expert is not None), ())

    def resolve(self, slot: Slot) -> str:
        """The key holding `slot`, also through a tied alias stored once; a slot with no key is an error.

        Raises:
            LorafitError: the checkpoint has no tensor for `slot` (saved with another class, most likely).
        """
        name = self.key_of(*slot)
        alias_of = self.tree.tied.get(f"{slot[0]}.{slot[1]}" if slot[0] else slot[1])
        if name is None and alias_of is not None:
            # A tied alias the checkpoint stores once (BART's encoder/decoder embed_tokens -> model.shared).
            path, _, param = alias_of.rpartition(".")
            name = self.key_of(path, param)
        if name is None:
            what = f"{slot[0]}.{slot[1]}"
            raise LorafitError(f"the base checkpoint has no tensor for {what} (tried {what!r} with and without "
                               f"the {self.tree.base_model_prefix!r} prefix); pass the --class it was saved with",
                               self.where)
        return str(name)


@dataclass
class _SlotChanges:
    """What the adapter does to each tree slot, before slots are matched to checkpoint keys."""

    deltas: dict[Slot, list[Delta]]  # in the order the mapping lands the modules
    replaced: dict[Slot, str]  # slot -> adapter key whose value replaces the base tensor
    copies: set[Slot]  # replaced by a modules_to_save copy (a new module, not an in-place load)

    def touches(self, slot: Slot) -> bool:
        """Whether the adapter adds to or replaces `slot`."""
        return slot in self.deltas or slot in self.replaced

    def forget(self, slot: Slot) -> None:
        """Drop `slot` once a step has planned it, so later steps do not plan it again."""
        self.deltas.pop(slot, None)
        self.replaced.pop(slot, None)


@dataclass(frozen=True)
class _TiedEmbeddings:
    """Tied word embeddings the adapter changes: both sides, the one stored tensor, and what replaces it in place."""

    sides: list[Slot]  # the input embeddings' weight, then the output embeddings'
    source: str  # the checkpoint key both sides start from (the input side's)
    shared_replace: str | None  # adapter key loaded into the shared tensor (a saved base layer, not a copy)


def _refuse_unsupported(adapter: Adapter) -> None:
    """Raise for adapter features whose merge is not ΔW = B @ A (or DoRA), rather than merge them wrongly."""
    bad = [k for k in UNSUPPORTED_CONFIG if adapter.config.get(k)]
    if bad:
        raise LorafitError(f"the adapter uses {', '.join(bad)}, which lorafit merge does not support", adapter.path)


def _deltas_by_slot(adapter: Adapter, tree: ModuleTree, mapping: Landing) -> dict[Slot, list[Delta]]:
    """The deltas of every landed LoRA module by tree slot: its weight, and its bias with lora_bias.

    Raises:
        LorafitError: a LoRA on a convolution, which lorafit merge cannot add.
    """
    deltas: dict[Slot, list[Delta]] = {}
    for src, dst in mapping.pairs.items():
        m = adapter.modules[src]
        if m.kind == "param":  # one parameter of the module, in the order PEFT nests its wrappers
            param, experts = mapping.params[src]
            deltas.setdefault((dst, param), []).append(Delta(src, dst, "param", m.keys, m.per_param[param][2],
                                                             experts=experts, transposed=tree.modules[dst].transposed))
            continue
        kind = _kind(m.kind, tree.modules[dst].kind)
        if kind == "conv":
            raise LorafitError(f"cannot merge {src}: LoRA on convolution layers is not supported by lorafit merge",
                               adapter.path)
        sc = m.scaling
        deltas.setdefault((dst, "weight"), []).append(Delta(src, dst, kind, m.keys, sc, m.has_dora))
        if m.has_bias:
            deltas.setdefault((dst, "bias"), []).append(Delta(src, dst, kind, m.keys, sc, role="bias"))
    return deltas


def _slot_changes(adapter: Adapter, tree: ModuleTree, mapping: Landing) -> _SlotChanges:
    """The deltas and the replacing saved tensors (modules_to_save, saved base layers) of every landed slot."""
    deltas = _deltas_by_slot(adapter, tree, mapping)
    replaced: dict[Slot, str] = {}
    copies: set[Slot] = set()
    extras = {x.key: x for x in adapter.extras}
    for key, dst in mapping.tensor_pairs.items():
        slot = (dst, extras[key].param)
        if slot in copies and extras[key].kind != "modules_to_save":
            continue  # a saved base weight beside a trained copy: merge_and_unload keeps the copy only
        replaced[slot] = key
        if extras[key].kind == "modules_to_save":
            copies.add(slot)
    return _SlotChanges(deltas, replaced, copies)


def _tied_embedding_sides(tree: ModuleTree, names: _CheckpointNames) -> list[Slot] | None:
    """The weights of the input and output embeddings if they are two tied modules the checkpoint stores, else None."""
    in_path, out_path = tree.input_embeddings, tree.output_embeddings
    if not (tree.tie_word_embeddings and in_path and out_path and in_path != out_path):
        return None
    if names.key_of(in_path, "weight") is None:
        return None
    return [(in_path, "weight"), (out_path, "weight")]


def _touched_tied_embeddings(tree: ModuleTree, names: _CheckpointNames,
                             slots: _SlotChanges) -> _TiedEmbeddings | None:
    """The tied word embeddings if the adapter changes either side, else None.

    They need a step of their own: PEFT changes both sides together, unless a trained copy parts them.
    """
    sides = _tied_embedding_sides(tree, names)
    if sides is None or not any(slots.touches(s) for s in sides):
        return None
    in_key = names.resolve(sides[0])
    shared_replace = next((slots.replaced[s] for s in sides if s in slots.replaced and s not in slots.copies), None)
    return _TiedEmbeddings(sides, in_key, shared_replace)


def _plan_untied_embeddings(plan: MergePlan, tied: _TiedEmbeddings, slots: _SlotChanges,
                            names: _CheckpointNames) -> list[str]:
    """Plan each side apart (a trained copy of one side replaces that side only, as in PEFT).

    Returns:
        the untied names the checkpoint does not hold, which the merged checkpoint adds.
    """
    extra_names = []
    for s in tied.sides:
        name = names.key_of(*s) or f"{s[0]}.weight"
        rep = slots.replaced[s] if s in slots.copies else tied.shared_replace
        plan.changes[name] = TensorPlan(name, tied.source, rep, list(slots.deltas.get(s, [])))
        if name not in names.keys:
            extra_names.append(name)
        plan.untied.append(name)
    return extra_names


def _plan_shared_embeddings(plan: MergePlan, tied: _TiedEmbeddings, slots: _SlotChanges,
                            names: _CheckpointNames, order_of: Mapping[str, int]) -> None:
    """Plan one shared tensor under both names: every delta of either side lands on it, in PEFT's module order."""
    both = sorted(slots.deltas.get(tied.sides[0], []) + slots.deltas.get(tied.sides[1], []),
                  key=lambda d: order_of[d.target])
    for s in tied.sides:
        name = names.key_of(*s)
        if name is not None:
            plan.changes[name] = TensorPlan(name, tied.source, tied.shared_replace, both)
            plan.tied_shared.append(name)


def _plan_tied_embeddings(plan: MergePlan, tree: ModuleTree, slots: _SlotChanges, names: _CheckpointNames,
                          order_of: Mapping[str, int]) -> list[str]:
    """Plan the tied word embeddings the adapter changes and take both sides out of `slots`.

    Returns:
        the names the merged checkpoint adds to the base's (an untied side the base stores no tensor for).
    """
    tied = _touched_tied_embeddings(tree, names, slots)
    if tied is None:
        return []
    extra_names: list[str] = []
    if any(s in slots.copies for s in tied.sides):
        extra_names = _plan_untied_embeddings(plan, tied, slots, names)
    else:
        _plan_shared_embeddings(plan, tied, slots, names, order_of)
    for s in tied.sides:
        slots.forget(s)
    return extra_names


def _join_planned_tensor(plan: MergePlan, slots: _SlotChanges, slot: Slot, name: str, where: Path) -> None:
    """Add the deltas of `slot`, another name of the planned tensor `name`, to it (PEFT adds each to the one parameter).

    Raises:
        LorafitError: one of the names is replaced by a trained copy, which a shared tensor cannot take.
    """
    if slots.replaced.get(slot) is not None or plan.changes[name].replace is not None:
        raise LorafitError(f"cannot merge {slot[0]}: it shares its tensor {name} with another adapted "
                           "module, and one of them is replaced by a trained copy", where)
    plan.changes[name].deltas.extend(slots.deltas.get(slot, []))
    if name not in plan.tied_shared:
        plan.tied_shared.append(name)


def _plan_slots(plan: MergePlan, slots: _SlotChanges, names: _CheckpointNames, order_of: Mapping[str, int],
                where: Path) -> None:
    """Plan every slot left in `slots`, in module order, each on the checkpoint tensor that holds it."""
    for slot in sorted(set(slots.deltas) | set(slots.replaced), key=lambda s: (order_of.get(s[0], -1), s[1])):
        parts = names.parts_of(*slot) if names.key_of(*slot) is None else ()
        if parts:
            _plan_parts(plan, slots, slot, parts, where)
            continue
        name = names.resolve(slot)
        if name in plan.changes:
            _join_planned_tensor(plan, slots, slot, name, where)
        else:
            plan.changes[name] = TensorPlan(name, name, slots.replaced.get(slot), list(slots.deltas.get(slot, [])))


def _plan_parts(plan: MergePlan, slots: _SlotChanges, slot: Slot, parts: Sequence[StoredPart], where: Path) -> None:
    """Plan a parameter the checkpoint stores per expert: each part takes its window of the same deltas.

    Raises:
        LorafitError: a saved tensor replaces the parameter, or a delta is not a non-transposed parameter LoRA
            (only those are laid out [experts, out, in], the rows the parts split).
    """
    deltas = slots.deltas.get(slot, [])
    if slot in slots.replaced or any(d.kind != "param" or d.transposed for d in deltas):
        raise LorafitError(f"cannot merge {slot[0]}.{slot[1]}: the checkpoint stores it split per expert, and the "
                           "adapter changes it in a way lorafit cannot split", where)
    for p in parts:
        plan.changes[p.key] = TensorPlan(p.key, p.key, None, list(deltas), window=(p.expert or 0, p.start, p.stop))


def build_plan(adapter: Adapter, tree: ModuleTree, mapping: Landing, keys: Sequence[str],
               where: Path | None = None, stored: Mapping[str, Sequence[StoredPart]] | None = None) -> MergePlan:
    """Plan the merge of `adapter` (landed by `mapping` on `tree`) into a checkpoint holding `keys`, in order.

    Returns:
        the MergePlan; modules that `mapping` does not land are left out (check reports them).
    Raises:
        LorafitError: an adapted module has no weight in the checkpoint, or its kind cannot be merged.

    `stored` says how the checkpoint stores parameters that transformers renames or fuses on load (conversion).
    """
    _refuse_unsupported(adapter)
    names = _CheckpointNames(tree, set(keys), where, stored or {})
    order_of = {p: i for i, p in enumerate(tree.modules)}
    slots = _slot_changes(adapter, tree, mapping)
    plan = MergePlan(order=[], sources={}, changes={})
    extra_names = _plan_tied_embeddings(plan, tree, slots, names, order_of)
    _plan_slots(plan, slots, names, order_of, adapter.path)
    plan.order = list(keys) + extra_names
    plan.sources = {k: k for k in keys} | {n: plan.changes[n].source for n in extra_names}
    return plan

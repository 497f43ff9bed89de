"""Load-time key conversion: what PEFT itself renames before matching, for transformers v5 models.

For model types with a registered checkpoint conversion (Llava and other refactored VLMs, some MoE),
PEFT >= 0.19 passes the adapter's keys through transformers' conversion mapping while loading. To say
what stock PEFT will do, lorafit asks PEFT's own conversion function (with meta tensors, so no data is
touched) how each key will be renamed. Only renamings that keep a tensor whole are modelled; a
conversion that fuses tensors (MoE experts) is reported by the caller as a key that could not be followed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ...adapter import Adapter
from ...formats.peft.reader import PEFT_PREFIX, split_key
from ...tree import StoredPart


def source_patterns(model_type: str | None) -> list[str]:
    """Regexes that match (at least) every key transformers' conversion for this model type renames or fuses.

    A renaming's source is a regex already; a fusion's is a tensor name whose `*` stands for an expert index,
    matched without its `.weight` against module paths. An adapter none of whose module paths any of them
    matches is loaded as saved, which a check can tell without PEFT or transformers.
    """
    out = []
    for rule in _conversion_rules(model_type):
        for pattern in getattr(rule, "source_patterns", None) or []:
            p = str(pattern)
            if type(rule).__name__ != "WeightRenaming":  # a tensor name: matched here against module paths
                p = re.escape(p.removesuffix(".weight")).replace(r"\*", ".*")
            out.append(p)
    return out


def may_convert(patterns: list[str], paths: list[str]) -> bool:
    """Whether some module path as saved may match a conversion pattern.

    PEFT's conversion first maps `base_model.model.model.` to `model.` and `base_model.model.` to nothing, so
    transformers' patterns meet the module path as saved; one no pattern matches keeps its name.
    """
    compiled = [re.compile(p) for p in patterns]
    return any(c.search(path) for c in compiled for path in paths)


def has_conversion(model_type: str | None) -> bool:
    """True when transformers registers a checkpoint conversion for this model type."""
    if not model_type:
        return False
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4: no load-time conversion
        return False
    try:
        return get_checkpoint_conversion_mapping(model_type) is not None
    except Exception:
        return False


def load_renames(adapter: Adapter, meta_model: Any) -> dict[str, str]:
    """Module path -> the path PEFT will load it under, for every LoRA module PEFT renames on load.

    Returns an empty dict when PEFT does not convert (older PEFT, or nothing matches).
    """
    import torch

    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers
    except ImportError:
        return {}
    allowed = set(LoraConfig.__dataclass_fields__)
    cfg = {k: v for k, v in adapter.config.items() if k in allowed and k not in ("peft_type", "task_type")}
    config = LoraConfig(**cfg)
    state = {k: torch.empty(adapter.infos[k].shape, device="meta") for k in adapter.module_keys()}
    try:
        converted = convert_peft_adapter_state_dict_for_transformers(
            model=meta_model, peft_config=config, adapter_state_dict=state, adapter_name="default")
    except Exception:
        return {}
    # Renamings keep the tensor object: follow each one from its old key to its new key.
    new_key_of = {id(t): k for k, t in converted.items()}
    renames: dict[str, str] = {}
    for key, tensor in state.items():
        new = new_key_of.get(id(tensor))
        if new is None or new == key:
            continue
        old_module, role, _ = split_key(key)
        new_module, new_role, _ = split_key(new if new.startswith(PEFT_PREFIX) else PEFT_PREFIX + new)
        if role == new_role:
            renames[old_module] = new_module
    return renames


def stored_layout(model_type: str | None, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[StoredPart]]:
    """Loaded tensor name -> the checkpoint tensors that hold it, for a checkpoint transformers converts on load.

    transformers v5 renames some checkpoint keys (Mixtral's `block_sparse_moe.` -> `mlp.`, Llava's
    `language_model.` -> `model.language_model.`) and fuses per-expert weights into one parameter
    (`experts.{e}.gate_proj.weight` and `experts.{e}.up_proj.weight` stacked and concatenated into
    `experts.gate_up_proj`). A merge must write the checkpoint's own keys, so it needs the way back.
    Renamings and the stack-then-concatenate fusion are followed; a name made by any other operation is
    left out, and merging into it is refused.
    """
    rules = _conversion_rules(model_type)
    if not rules:
        return {}
    renamings = [(re.compile(s), t) for c in rules if type(c).__name__ == "WeightRenaming"
                 for s, t in zip(c.source_patterns, c.target_patterns, strict=False)]
    fusions = [f for c in rules if (f := _fusion(c)) is not None]
    out: dict[str, list[StoredPart]] = {}
    experts: dict[str, dict[int, dict[int, str]]] = {}  # loaded name -> expert -> source index -> key
    for key in shapes:
        name = key
        for pattern, target in renamings:
            name = pattern.sub(target, name)
        fused = next(((f, m) for f in fusions for m in [f[0].search(name)] if m), None)
        if fused is None:
            if name != key:
                out[name] = [StoredPart(key)]
            continue
        (_, target), m = fused
        loaded = name[: m.start()] + target
        j = next(i for i, g in enumerate(m.groups()[1::2]) if g is not None)  # which source pattern matched
        experts.setdefault(loaded, {}).setdefault(int(m.group(2 * j + 2)), {})[j] = key
    for loaded, by_expert in experts.items():
        parts = _fused_parts(by_expert, shapes)
        if parts:
            out[loaded] = parts
    return out


def _conversion_rules(model_type: str | None) -> list[Any]:
    if not model_type:
        return []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        return list(get_checkpoint_conversion_mapping(model_type) or [])
    except Exception:  # transformers 4, or a model type it cannot map
        return []


def _fusion(rule: Any) -> tuple[re.Pattern[str], str] | None:
    """(regex over the source keys, loaded suffix) of a stack-then-concatenate rule, else None.

    The regex has two groups per source pattern: the whole match of that alternative and its expert index.
    """
    ops = [(type(o).__name__, getattr(o, "dim", None)) for o in getattr(rule, "operations", [])]
    targets = list(getattr(rule, "target_patterns", []) or [])
    if type(rule).__name__ != "WeightConverter" or len(targets) != 1:
        return None
    if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        return None
    sources = list(rule.source_patterns)
    alts = ["(" + re.escape(s).replace(r"\*", r"(\d+)") + ")" for s in sources]
    return re.compile("(?:" + "|".join(alts) + ")$"), targets[0]


def _fused_parts(by_expert: dict[int, dict[int, str]], shapes: Mapping[str, tuple[int, ...]]) -> list[StoredPart]:
    """The parts of one fused tensor, expert by expert and source by source; [] when experts or sources have gaps."""
    n_sources = max(len(s) for s in by_expert.values())
    if sorted(by_expert) != list(range(len(by_expert))):
        return []
    parts = []
    for e in range(len(by_expert)):
        sources = by_expert[e]
        if sorted(sources) != list(range(n_sources)):
            return []
        row = 0
        for j in range(n_sources):
            shape = shapes[sources[j]]
            if len(shape) != 2:
                return []
            parts.append(StoredPart(sources[j], e, row, row + shape[0]))
            row += shape[0]
    return parts

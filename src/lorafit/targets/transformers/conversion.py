"""Load-time key conversion: what PEFT itself renames before matching, for transformers v5 models.

For model types with a registered checkpoint conversion (Llava and other refactored VLMs, some MoE),
PEFT >= 0.19 passes the adapter's keys through transformers' conversion mapping while loading. To say
what stock PEFT will do, lorafit asks PEFT's own conversion function (with meta tensors, so no data is
touched) how each key will be renamed. Only renamings that keep a tensor whole are modelled; a
conversion that fuses tensors (MoE experts) is reported by the caller as a key that could not be followed.
"""

from __future__ import annotations

from typing import Any

from ...adapter import Adapter
from ...formats.peft.reader import PEFT_PREFIX, split_key


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

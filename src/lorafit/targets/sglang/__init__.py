"""SGLang: `--enable-lora --lora-paths`. Sources: docs/runtimes.md#sglang."""

from __future__ import annotations

from ...diagnose import plural
from ..serving import Context, Rule, ServingRuntime, Setting, Verdict, checks, register_serving
from ..serving.traits import is_vision, layer_of

_LORA = "python/sglang/srt/lora/"


def _string_target(ctx: Context) -> Verdict:
    tm = ctx.traits.target_modules
    if not isinstance(tm, str) or tm in ("all", "all-linear"):
        return None
    return (f"target_modules is the regex {tm!r}: ValueError 'Only 'all' or 'all-linear' can be used as the string "
            "for target module'", [])


def _qkv(ctx: Context) -> Verdict:
    """SGLang fuses q/k/v per layer and reads v_proj (and q_proj) whenever any of them is adapted."""
    by_layer: dict[str, set[str]] = {}
    for p in ctx.traits.modules:
        parent, _, name = p.rpartition(".")
        if name in ("q_proj", "k_proj", "v_proj"):
            by_layer.setdefault(parent, set()).add(name)
    bad = [f"{parent}.{'v_proj' if 'v_proj' not in names else 'q_proj'}" for parent, names in by_layer.items()
           if not {"q_proj", "v_proj"} <= names]
    return (f"{plural(len(bad), 'attention block')} adapt q/k/v without both q_proj and v_proj; SGLang fuses them "
            "into qkv_proj and raises KeyError on the missing one", bad) if bad else None


def _target_limit(ctx: Context) -> Verdict:
    """--lora-target-modules: the module names the server wraps; others in the adapter are refused."""
    allowed = ctx.settings.get("lora_target_modules")
    if not allowed or "all" in allowed:
        return None
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"}
    names = set(allowed) | {fused.get(n, n) for n in allowed}
    odd = sorted(n for n in ctx.traits.names if n not in names and fused.get(n, n) not in names)
    return (f"adapts {', '.join(odd)}, outside --lora-target-modules {','.join(allowed)}: the adapter is refused "
            "as incompatible with the LoRA memory pool", odd) if odd else None


RULES = (
    Rule("runtime-rank-limit", "will-not-load", f"{_LORA}mem_pool.py: LoRAMemoryPool.can_support",
         checks.rank_over("max_lora_rank", "ValueError: … is incompatible with the current LoRA memory pool "
                          "configuration"), lambda ctx: f"start SGLang with --max-lora-rank {ctx.traits.max_rank}"),
    Rule("runtime-dora", "will-not-load", f"{_LORA}lora_manager.py: LoRAManager.validate_new_adapter",
         checks.dora("LoRA serving currently doesn't support DoRA adapters")),
    Rule("runtime-target-modules", "will-not-load", f"{_LORA}utils.py: get_normalized_target_modules", _string_target,
         lambda ctx: "list the module names in target_modules"),
    Rule("runtime-target-modules", "will-not-load", f"{_LORA}mem_pool.py: LoRAMemoryPool.can_support", _target_limit),
    Rule("runtime-qkv-incomplete", "will-not-load", f"{_LORA}lora.py: LoRAAdapter.normalize_qkv_proj", _qkv),
    Rule("runtime-scale", "not-as-trained", f"{_LORA}lora.py: LoRAAdapter.__init__ (scaling = lora_alpha / r)",
         checks.wrong_scale(checks.global_alpha_over_r, "use_rslora, rank_pattern and alpha_pattern")),
    Rule("runtime-keys-unused", "not-as-trained", f"{_LORA}lora.py: LoRAAdapter.initialize_weights (get_layer_id)",
         checks.outside_layers("are dropped with no log: SGLang keeps only weights whose name has layers.N.")),
    Rule("runtime-vision-misplaced", "not-as-trained", f"{_LORA}lora.py: LoRAAdapter.initialize_weights",
         lambda ctx: _vision_in_layers(ctx)),
)


def _vision_in_layers(ctx: Context) -> Verdict:
    keys = [p for p in ctx.traits.modules if is_vision(p) and layer_of(p) is not None]
    return (f"{plural(len(keys), 'vision-tower module')} carry layers.N. in their path; SGLang files LoRA weights "
            "by that layer id alone, so they can land on language layer N", keys) if keys else None


register_serving(ServingRuntime(
    "sglang", "SGLang", ("0.4.0", "0.5.9"), RULES,
    settings=(Setting("max_lora_rank", None, "SGLang's --max-lora-rank (default: the largest initial adapter's)"),
              Setting("lora_target_modules", None, "SGLang's --lora-target-modules (default: the adapters')"))))

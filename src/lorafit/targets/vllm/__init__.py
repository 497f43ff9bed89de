"""vLLM: `--enable-lora` with adapters from `--lora-modules` or a LoRARequest. Sources: docs/runtimes.md#vllm."""

from __future__ import annotations

from ...diagnose import plural
from ..serving import Context, Rule, ServingRuntime, Setting, Verdict, checks, register_serving

_HELPER = "vllm/lora/peft_helper.py: PEFTHelper"


def _modules_to_save(ctx: Context) -> Verdict:
    mts = ctx.traits.modules_to_save
    return (f"modules_to_save {mts} is refused (ValueError: vLLM only supports modules_to_save being None)", mts) \
        if mts else None


def _full_weights(ctx: Context) -> Verdict:
    # the base's own copy saved beside a targeted embedding is skipped (is_base_embeddding_weights)
    keys = [k for k in ctx.traits.full_weights
            if not k.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight"))]
    return (f"{plural(len(keys), 'full tensor')} besides lora_A/lora_B: ValueError '<key> is unsupported LoRA "
            "weight' (PEFT saves full embed_tokens/lm_head weights after a vocabulary resize)", keys) if keys else None


def _not_linear(ctx: Context) -> Verdict:
    """vLLM puts LoRA on its linear and vocabulary layers only; other kinds are unexpected target modules."""
    if ctx.base is None:
        return None
    params = {m.path for m in ctx.adapter.modules.values() if m.kind == "param"}  # judged by their own rules
    odd = [p for p, kind in ctx.base.kinds.items() if kind not in ("linear", "embedding") and p not in params]
    return (f"{plural(len(odd), 'module')} adapt layers vLLM cannot wrap: ValueError 'While loading …, expected "
            "target modules in [...] but received [...]'", odd) if odd else None


def _rank_hint(ctx: Context) -> str:
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    need = next(n for n in allowed if n >= max(ctx.traits.max_rank, ctx.traits.r)) if ctx.traits.max_rank <= 512 \
        else None
    return f"start vLLM with --max-lora-rank {need}" if need else "vLLM's largest --max-lora-rank is 512"


RULES = (
    Rule("runtime-rank-limit", "will-not-load", f"{_HELPER}.validate_legal",
         checks.rank_over("max_lora_rank", "ValueError: LoRA rank … is greater than max_lora_rank"), _rank_hint),
    Rule("runtime-dora", "will-not-load", f"{_HELPER}._validate_features",
         checks.dora("ValueError: vLLM does not yet support DoRA")),
    Rule("runtime-lora-bias", "will-not-load", f"{_HELPER}._validate_features",
         checks.lora_bias("ValueError: Adapter bias is not supported")),
    Rule("runtime-rslora", "will-not-load", f"{_HELPER}._validate_features",
         lambda ctx: ("use_rslora is refused (ValueError: vLLM does not yet support RSLoRA)", [])
         if ctx.traits.rslora else None, until="0.7.0"),
    Rule("runtime-modules-to-save", "will-not-load", f"{_HELPER}._validate_features", _modules_to_save),
    Rule("runtime-full-weights", "will-not-load", "vllm/lora/utils.py: parse_fine_tuned_lora_name", _full_weights),
    Rule("runtime-target-modules", "will-not-load",
         "vllm/lora/lora_model.py: LoRAModel.from_local_checkpoint.check_unexpected_modules", _not_linear,
         needs_base=True),
    Rule("runtime-scale", "not-as-trained", f"{_HELPER}.__post_init__ and from_dict (patterns are dropped)",
         checks.wrong_scale(checks.global_scale, "rank_pattern and alpha_pattern")),
    Rule("runtime-keys-unused", "not-as-trained", "vllm/lora/model_manager.py: LoRAModelManager._create_lora_modules",
         checks.vision_keys("get no LoRA layer unless vLLM runs with --enable-tower-connector-lora: they are "
                            "ignored with only a warning"),
         lambda ctx: "start vLLM with --enable-tower-connector-lora (where the model supports it)"),
    Rule("runtime-keys-unused", "not-as-trained", "vllm/lora/model_manager.py: LoRAModelManager.activate_adapter",
         checks.unused_in_base("are never applied: vLLM matches each LoRA to a module by its exact path and logs "
                               "nothing for keys that match none"), checks.unused_hint, needs_base=True),
)

register_serving(ServingRuntime(
    "vllm", "vLLM", ("0.6.6", "0.26.0"), RULES,
    settings=(Setting("max_lora_rank", 16, "vLLM's --max-lora-rank (1, 8, 16, 32, 64, 128, 256, 320, 512)"),
              Setting("enable_tower_connector_lora", False, "vLLM's --enable-tower-connector-lora"))))

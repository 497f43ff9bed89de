"""LoRAX (and TGI's multi-LoRA, which shares its loader). Sources: docs/runtimes.md#lorax."""

from __future__ import annotations

from ...diagnose import plural
from ..serving import Context, Rule, ServingRuntime, Verdict, checks, register_serving
from ..serving.traits import layer_of

_LORA = "server/lorax_server/adapters/lora.py"


def _unrooted(ctx: Context) -> Verdict:
    keys = list(ctx.adapter.unrooted_keys) + ctx.traits.full_weights
    return (f"reads only base_model.model.<module>.lora_A/B.weight; {plural(len(keys), 'tensor')} outside that "
            "pattern are left unused with only a warning", keys) if keys else None


def _dropped_types(ctx: Context) -> Verdict:
    """A module name missing from any layer is dropped for every layer (LoraWeights.load returns None)."""
    by_name: dict[str, set[int]] = {}
    for p in ctx.traits.modules:
        layer = layer_of(p)
        if layer is not None:
            by_name.setdefault(p.rsplit(".", 1)[-1], set()).add(layer)
    layers = set().union(*by_name.values()) if by_name else set()
    if ctx.base is not None and ctx.base.num_layers:
        layers = set(range(ctx.base.num_layers))
    partial = sorted(n for n, got in by_name.items() if got != layers)
    return (f"drops {', '.join(partial)} in every layer, because some layers lack it (layers_to_transform or a "
            "partial target): LoRAX loads a module type only when every layer has it", partial) if partial else None


RULES = (
    Rule("runtime-dora", "not-as-trained", f"{_LORA}: LoraConfig.load",
         checks.dora("the magnitudes are not read, so it applies plain LoRA")),
    Rule("runtime-keys-unused", "not-as-trained", f"{_LORA}: LoraConfig.map_weights_for_model", _unrooted),
    Rule("runtime-module-dropped", "not-as-trained", f"{_LORA}: LoraWeights.load", _dropped_types),
    Rule("runtime-scale", "not-as-trained", f"{_LORA}: LoraWeights.load (get_scaling_factor with the global r)",
         checks.wrong_scale(checks.global_scale, "rank_pattern and alpha_pattern")),
    Rule("runtime-keys-unused", "not-as-trained", "server/lorax_server/models/model.py: Model.load_adapter",
         checks.unused_in_base("are never applied: LoRAX looks up each weight by the base's module names"),
         checks.unused_hint, needs_base=True),
)

register_serving(ServingRuntime("lorax", "LoRAX", ("0.10.0", "0.12.1"), RULES))

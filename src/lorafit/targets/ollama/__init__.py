"""Ollama: `ADAPTER` in a Modelfile (safetensors adapters converted by convert/convert.go). Sources:
docs/runtimes.md#ollama."""

from __future__ import annotations

from ...diagnose import plural
from ..serving import Context, Rule, ServingRuntime, Verdict, checks, convert_command, register_serving

_ARCHS = ("llama", "gemma2")
_RENAMED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _architecture(ctx: Context) -> Verdict:
    mt = ctx.base.model_type if ctx.base else None
    return (f"converts adapters of {' and '.join(_ARCHS)} models only; the base is {mt!r}: 'unsupported "
            "architecture'", []) if mt not in _ARCHS else None


def _names(ctx: Context) -> Verdict:
    odd = sorted(n for n in ctx.traits.names if n not in _RENAMED)
    return (f"renames only {', '.join(_RENAMED)} to GGUF names; {plural(len(odd), 'other module name')} "
            f"({', '.join(odd)}) keep HF names that no tensor of the base has, which llama.cpp refuses", odd) \
        if odd else None


def _mlx_scale(ctx: Context) -> Verdict:
    """An mlx-lm adapter's lora_parameters.scale is parsed and never written: llama.cpp then applies alpha/rank."""
    params = ctx.adapter.config.get("lora_parameters") or {}
    alpha = params.get("alpha") or ctx.adapter.config.get("alpha") or 0
    rank = params.get("rank") or 1
    applied = alpha / rank if alpha else 1.0
    scale = params.get("scale")
    if scale is None or abs(applied - float(scale)) <= 1e-6 * abs(float(scale)):
        return None
    return (f"ignores lora_parameters.scale {scale} and applies {applied:.6g} "
            f"({float(scale) / applied:.3g}x too weak or strong), with no error", [])


RULES = (
    Rule("runtime-architecture", "will-not-load", "convert/convert.go: ConvertAdapter", _architecture,
         needs_base=True),
    Rule("runtime-target-modules", "will-not-load", "convert/convert_llama_adapter.go: llamaAdapter.Replacements",
         _names, formats=("peft",)),
    Rule("runtime-full-weights", "will-not-load", "convert/convert_llama_adapter.go: llamaAdapter.Replacements",
         checks.full_weights("they have no GGUF adapter name"), formats=("peft",)),
    Rule("runtime-scale", "not-as-trained", "convert/convert.go: AdapterParameters.KV; src/llama-adapter.h: get_scale",
         checks.wrong_scale(checks.tensor_rank_scale, "use_rslora and alpha_pattern"),
         lambda ctx: convert_command(ctx.adapter, "gguf"), formats=("peft",)),  # then ADAPTER ./<name>.gguf
    Rule("runtime-scale", "not-as-trained", "convert/convert.go: AdapterParameters.KV", _mlx_scale, formats=("mlx",)),
    Rule("runtime-keys-unused", "will-not-load", "convert/convert_llama_adapter.go: llamaAdapter.Replacements",
         checks.unused_in_base("are not renamed to the base's GGUF names, so llama.cpp refuses them"),
         checks.unused_hint, needs_base=True, formats=("peft",)),
)

register_serving(ServingRuntime("ollama", "Ollama", ("0.3.0", "0.13.0"), RULES, reads=("peft", "mlx", "gguf"),
                                format_source="convert/convert.go: ConvertAdapter"))

"""llama.cpp: convert_lora_to_gguf.py, then `--lora` / llama_adapter_lora_init. Sources: docs/runtimes.md#llamacpp.

A PEFT adapter reaches llama.cpp through its converter, so the converter's rules come first; `lorafit convert
--to gguf` writes the GGUF itself and folds what the converter ignores (use_rslora, alpha_pattern).
"""

from __future__ import annotations

from ..serving import Context, Rule, ServingRuntime, checks, convert_command, register_serving

_CONVERT = "convert_lora_to_gguf.py: LoraModel.get_tensors"
_EXIT = "the converter exits: Unexpected name '…': Not a lora_A or lora_B tensor"


def _convert_hint(ctx: Context) -> str:
    return convert_command(ctx.adapter, "gguf")  # lorafit folds the scale into lora_b


RULES = (
    Rule("runtime-dora", "will-not-load", _CONVERT, checks.dora(_EXIT)),
    Rule("runtime-lora-bias", "will-not-load", _CONVERT, checks.lora_bias(_EXIT)),
    Rule("runtime-full-weights", "will-not-load", _CONVERT, checks.full_weights(_EXIT)),
    Rule("runtime-scale", "not-as-trained",
         "convert_lora_to_gguf.py: LoraModel.set_gguf_parameters; src/llama-adapter.h: get_scale (alpha / rank)",
         checks.wrong_scale(checks.tensor_rank_scale, "use_rslora and alpha_pattern"), _convert_hint),
    Rule("runtime-keys-unused", "not-as-trained", "convert_lora_to_gguf.py: LoraModel.modify_tensors",
         checks.vision_keys("are not converted: the GGUF adapter holds the language model only")),
    Rule("runtime-keys-unused", "will-not-load", "src/llama-adapter.cpp: llama_adapter_lora_init_impl",
         checks.unused_in_base("map to no tensor of the base: the converter stops ('Can not map tensor') or "
                               "the loader refuses ('LoRA tensor … does not exist in base model')"),
         checks.unused_hint, needs_base=True),
)

register_serving(ServingRuntime("llama.cpp", "llama.cpp", ("b3600", "b7200"), RULES))

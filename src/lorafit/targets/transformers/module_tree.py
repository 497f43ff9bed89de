"""The ModuleTree of a transformers model: from a live module (a PeftModel is unwrapped) or a meta-device build.

Building from config + class never reads a weight byte: the model is instantiated under
`torch.device("meta")`, so a 70B config costs the same as a 1B one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...tree import ModuleInfo, ModuleTree

if TYPE_CHECKING:
    import torch


# PEFT wraps modules; these parts of a path belong to the wrapper, not to the model underneath.
_WRAPPER_SEGMENTS = {"base_layer", "original_module"}
_ADAPTER_SEGMENTS = ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B",
                     "lora_magnitude_vector", "modules_to_save", "lora_variant")


def _describe(module: torch.nn.Module) -> ModuleInfo:
    import torch

    params = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
    kind = type(module).__name__
    if isinstance(module, torch.nn.Linear):
        return ModuleInfo("Linear", module.in_features, module.out_features, params)
    if isinstance(module, torch.nn.Embedding):
        return ModuleInfo("Embedding", module.num_embeddings, module.embedding_dim, params)
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return ModuleInfo(kind, module.in_channels, module.out_channels, params)
    if kind == "Conv1D" and "weight" in params:  # transformers' GPT-2 layer: weight is [in, out]
        w = params["weight"]
        return ModuleInfo("Conv1D", w[0], w[1], params)
    return ModuleInfo(kind, None, None, params, transposed=bool(getattr(module, "is_transposed", False)))


def _clean_path(name: str) -> str | None:
    """Map a module name inside a PeftModel to the base model's path; None for PEFT's own submodules."""
    parts = name.split(".") if name else []
    if any(p in _ADAPTER_SEGMENTS for p in parts):
        return None
    return ".".join(p for p in parts if p not in _WRAPPER_SEGMENTS)


def tree_from_module(model: Any, source: str | None = None) -> ModuleTree:
    """Build the tree of a live model (a PeftModel is unwrapped to the model PEFT wraps)."""
    import torch

    from .conversion import has_conversion, source_patterns

    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    modules: dict[str, ModuleInfo] = {}
    for name, mod in model.named_modules():
        path = _clean_path(name)
        if path is None or path in modules and name != path:
            continue
        while isinstance(getattr(mod, "base_layer", None), torch.nn.Module):
            mod = mod.base_layer  # PEFT nests one wrapper per targeted parameter
        modules[path] = _describe(mod)
    config = getattr(model, "config", None)
    in_emb = out_emb = None
    ids = {id(m): n for n, m in model.named_modules()}
    for attr in ("get_input_embeddings", "get_output_embeddings"):
        try:
            emb = getattr(model, attr)()
        except (AttributeError, NotImplementedError):
            emb = None
        name = _clean_path(ids.get(id(emb), "")) if emb is not None else None
        if attr == "get_input_embeddings":
            in_emb = name
        else:
            out_emb = name
    cls = type(model)
    return ModuleTree(
        tied=_tied_aliases(model, in_emb, out_emb), origin="module",
        class_name=cls.__name__, modules=modules,
        model_type=getattr(config, "model_type", None),
        base_model_prefix=getattr(model, "base_model_prefix", "") or "",
        can_generate=hasattr(model, "prepare_inputs_for_generation"),
        implied_task_type=implied_task_type(cls.__name__, getattr(config, "model_type", None)),
        vocab_size=_text_config_attr(config, "vocab_size"),
        tie_word_embeddings=bool(_tied(config)),
        input_embeddings=in_emb, output_embeddings=out_emb, source=source,
        converts_keys=has_conversion(getattr(config, "model_type", None)),
        conversion_patterns=source_patterns(getattr(config, "model_type", None)),
    )


def _tied_aliases(model: Any, in_emb: str | None, out_emb: str | None) -> dict[str, str]:
    """alias -> first name of every parameter reachable under several names (meta tensors are tied too)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        module, _, param = name.rpartition(".")
        path = _clean_path(module)
        if path is not None:
            groups.setdefault(id(p), []).append(f"{path}.{param}" if path else param)
    embedding_pair = {f"{in_emb}.weight", f"{out_emb}.weight"}
    tied: dict[str, str] = {}
    for names in groups.values():
        canonical, *aliases = list(dict.fromkeys(names))
        for alias in aliases:
            if not {alias, canonical} <= embedding_pair:
                tied[alias] = canonical
    return tied


def _text_config_attr(config: Any, name: str) -> Any:
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, name, None)


def _tied(config: Any) -> bool:
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


# PEFT task type -> the Auto class that serves it (PEFT's own pairing, see PeftModelFor* docs).
TASK_TO_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}
# The name tables transformers keeps for each Auto class (model_type -> class name); cheap to import.
_AUTO_NAME_TABLES = {
    "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "FEATURE_EXTRACTION": "MODEL_MAPPING_NAMES",
}


def implied_task_type(class_name: str, model_type: str | None = None) -> str | None:
    """The PEFT task_type that fits a concrete transformers class, from transformers' Auto name tables."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return None
    for task, table in _AUTO_NAME_TABLES.items():
        names = getattr(modeling_auto, table, {})
        values = names.values() if model_type is None or model_type not in names else [names[model_type]]
        for v in values:
            if class_name == v or (isinstance(v, (tuple, list)) and class_name in v):
                return task
    return None

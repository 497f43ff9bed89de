"""Hypothesis strategies of fuzz cases, one per untrusted input kind: each edits one file of a valid fixture.

A case edits fields of a real file (or damages the whole of it) and runs one of the commands that reads that
file, with or without --json. The four kinds:
  safetensors     the header of adapter_model.safetensors (and of the base's or merged model's weights)
  adapter_config  adapter_config.json
  base_config     the base model's config.json (and the merged model's)
  shard_index     model.safetensors.index.json of a sharded base (and of a sharded merged model)
"""

from __future__ import annotations

from typing import Any

from fuzz_case import COMMANDS, Case
from fuzz_values import (
    MARKUP,
    big_ints,
    bool_like,
    field_edits,
    int_like,
    markup,
    names_or_regexes,
    raw_values,
    regexes,
    short_text,
    weird_json,
    whole_document,
)
from hypothesis import strategies as st

KIND_COMMANDS = {
    "safetensors": COMMANDS,
    "adapter_config": COMMANDS,
    "base_config": ("check", "fix", "merge", "verify-merge"),
    "shard_index": ("check", "fix", "merge", "verify-merge"),
}
KINDS = tuple(KIND_COMMANDS)

# Custom code a config may point to through auto_map: if it ever runs, it leaves a marker (invariant.MARKER_ENV).
CUSTOM_CODE = (
    "import os, pathlib\n"
    "pathlib.Path(os.environ.get('LORAFIT_FUZZ_MARKER', pathlib.Path(__file__).with_name('PWNED'))).write_text('ran')\n"
    "from transformers import LlamaConfig as XConfig, LlamaForCausalLM as XForCausalLM, LlamaModel as XModel\n"
)
AUTO_MAP = {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel",
            "AutoModelForCausalLM": "modeling_x.XForCausalLM"}


def _one_of(*values: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(values)


# ----------------------------------------------------------------------------- adapter_config.json

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION", None,
              "causal_lm", "", "NOPE", 5, "[/]")
pattern_dicts = st.dictionaries(names_or_regexes, int_like, max_size=3)
ADAPTER_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "r": int_like, "lora_alpha": int_like,
    "target_modules": st.lists(names_or_regexes, max_size=4) | names_or_regexes | weird_json,
    "rank_pattern": pattern_dicts, "alpha_pattern": pattern_dicts,
    "modules_to_save": st.none() | st.lists(names_or_regexes, max_size=3) | names_or_regexes,
    "exclude_modules": st.none() | st.lists(names_or_regexes, max_size=3) | regexes,
    "layers_to_transform": st.none() | st.integers(-2, 5) | st.lists(st.integers(-3, 10**6), max_size=4) | big_ints,
    "layers_pattern": st.none() | names_or_regexes | _one_of("layers", "h", "blocks") | st.lists(regexes, max_size=2),
    "task_type": _one_of(*TASK_TYPES), "peft_type": _one_of("LORA", "lora", "IA3", "LOHA", None, 5, "[bold]", ""),
    "use_dora": bool_like, "use_rslora": bool_like, "fan_in_fan_out": bool_like, "inference_mode": bool_like,
    "base_model_name_or_path": markup | _one_of("/etc/passwd", "../..", "org/name", "", None, 5) | short_text,
    "bias": _one_of("none", "all", "lora_only", "x", 5, None), "init_lora_weights": bool_like | _one_of("gaussian"),
    "lora_dropout": int_like, "layer_replication": weird_json | _one_of([[0, 1]], [[0, 4]], [[1, 0]]),
    "trainable_token_indices": weird_json | _one_of([0, 1], {"embed_tokens": [0, 99]}),
    "target_parameters": st.none() | st.lists(names_or_regexes, max_size=2), "revision": markup | st.none(),
    "lora_bias": bool_like, "megatron_config": weird_json,
}


@st.composite
def adapter_config_edits(draw: st.DrawFn, target: str) -> dict[str, list[dict[str, Any]]]:
    ops = draw(whole_document()) if draw(st.integers(0, 5)) == 0 else draw(field_edits(ADAPTER_FIELDS))
    return {target: ops}


# ----------------------------------------------------------------------------- config.json of a model

DTYPE_NAMES = _one_of("float32", "float16", "bfloat16", "nope", "float8_e4m3fn", "int8", "auto", 5, None)
size_like = int_like | _one_of(10**6, 10**9, 10**18)
BASE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "architectures": _one_of(5, ["LlamaForCausalLM"], "LlamaForCausalLM", [], ["Nope"], [5], None, ["AutoModel"],
                             ["LlamaForCausalLM", "GPT2LMHeadModel"], ["[/]"], ["LlamaModel"], ["OPTForCausalLM"]),
    "model_type": _one_of("llama", "x-custom", "", "gpt2", "bert", "[/]", "LLAMA", "mistral", "t5", None, 5),
    "text_config": _one_of("x", 5, {}, {"model_type": "llama"}, {"model_type": "x"}, [], None) | weird_json,
    "hidden_act": _one_of("nope", "silu", "gelu", "", None, 5, "[/]", ["silu"]),
    "num_key_value_heads": size_like, "num_attention_heads": size_like, "hidden_size": size_like,
    "intermediate_size": size_like, "vocab_size": size_like, "num_hidden_layers": size_like, "head_dim": size_like,
    "max_position_embeddings": size_like, "pad_token_id": int_like | _one_of(63, 64, 65),
    "bos_token_id": int_like, "eos_token_id": int_like | st.lists(int_like, max_size=3),
    "tie_word_embeddings": bool_like, "dtype": DTYPE_NAMES, "torch_dtype": DTYPE_NAMES,
    "rope_parameters": weird_json | _one_of({"rope_type": "nope"}, {"rope_type": "linear", "factor": 0}),
    "rope_scaling": weird_json | _one_of({"rope_type": "yarn"}, {"type": "linear", "factor": -1}),
    "quantization_config": _one_of({"quant_method": "bitsandbytes", "load_in_4bit": True}, {"quant_method": "gptq"},
                                   {"quant_method": "nope"}, "x") | weird_json,
    "layer_types": _one_of(["full_attention"], ["x", "y"], 5) | weird_json,
    "transformers_version": _one_of("99.0.0", "x", 5), "attention_bias": bool_like, "rms_norm_eps": int_like,
    "auto_map": _one_of(AUTO_MAP, {"AutoConfig": "configuration_x.XConfig"}, {"AutoModel": "x--y.Z"}, "x", 5),
}


@st.composite
def base_config_edits(draw: st.DrawFn, target: str) -> dict[str, list[dict[str, Any]]]:
    choice = draw(st.integers(0, 6))
    if choice == 0:
        return {target: draw(whole_document())}
    edits = {target: draw(field_edits(BASE_FIELDS))}
    if choice == 1:  # custom code the config points to; lorafit must never run it
        edits[target] += [{"set": [["auto_map"], AUTO_MAP]},
                          {"set": [["model_type"], draw(_one_of("x-custom", "llama"))]}]
    if choice == 1 or any("auto_map" in op.get("set", [[None]])[0] for op in edits[target]):
        folder = target.rsplit("/", 1)[0]
        for module in ("configuration_x.py", "modeling_x.py"):
            edits[f"{folder}/{module}"] = [{"content": {"text": CUSTOM_CODE}}]
    return edits


# ----------------------------------------------------------------------------- model.safetensors.index.json

SHARD_NAMES = _one_of(
    "../outside.safetensors", "/etc/passwd", "/dev/zero", "missing.safetensors", "", ".", "..", "config.json",
    "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "./model-00001-of-00002.safetensors", "model-00001-of-00002.safetensors/../model-00002-of-00002.safetensors",
    "a" * 300 + ".safetensors", "x\x00.safetensors", "~/x.safetensors", "[/].safetensors",
    "../adapter/adapter_model.safetensors", "MODEL-00001-OF-00002.SAFETENSORS", "model-00001-of-00002.safetensors ",
)
TENSOR_NAMES = _one_of(
    "model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
    "model.layers.99.self_attn.q_proj.weight", "", "[/]", "a" * 300,
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
    "base_model.model.model.layers.0.self_attn.[/].lora_A.weight", "base_model.model.lm_head.weight",
    "base_model.model.model.layers.-1.self_attn.q_proj.lora_A.weight", "lora_A",
) | short_text | st.sampled_from(MARKUP)


@st.composite
def shard_index_edits(draw: st.DrawFn, target: str) -> dict[str, list[dict[str, Any]]]:
    ops: list[dict[str, Any]] = []
    i = st.integers(0, 40)
    for _ in range(draw(st.integers(1, 3))):
        ops.append(draw(st.one_of(
            st.tuples(i, SHARD_NAMES | weird_json).map(lambda t: {"set": [["weight_map", t[0]], t[1]]}),
            st.tuples(i, SHARD_NAMES).map(lambda t: {"set": [["weight_map", t[0]], t[1]]}),
            st.tuples(TENSOR_NAMES, SHARD_NAMES).map(lambda t: {"set": [["weight_map", t[0]], t[1]]}),
            i.map(lambda n: {"delete": ["weight_map", n]}),
            i.map(lambda n: {"duplicate": ["weight_map", n]}),
            st.tuples(i, TENSOR_NAMES).map(lambda t: {"rename": [["weight_map", t[0]], t[1]]}),
            weird_json.map(lambda v: {"set": [["weight_map"], v]}),
            st.just({"delete": ["weight_map"]}),
            weird_json.map(lambda v: {"set": [["metadata"], v]}),
            int_like.map(lambda v: {"set": [["metadata", "total_size"], v]}),
            raw_values.map(lambda v: {"set_raw": [["weight_map", 0], v]}),
        )))
    if draw(st.integers(0, 7)) == 0:
        ops = draw(whole_document())
    edits = {target: ops}
    if draw(st.booleans()):  # "../outside.safetensors" then names a real, valid checkpoint outside the model
        edits["outside.safetensors"] = [{"copy_from": "base/model-00001-of-00002.safetensors"}]
    return edits


# ----------------------------------------------------------------------------- safetensors headers

DTYPES = _one_of("F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U64", "C64",
                 "F4", "f32", "", "F33", "F32 ")
SHAPES = st.one_of(
    st.lists(st.integers(-3, 40), max_size=4), st.lists(big_ints, min_size=1, max_size=3),
    _one_of([4, "16"], [4.0, 16.0], [True, 16], None, "4x16", {}, [[4, 16]], [16, 4], [4, 16], [2, 2, 16]),
)
OFFSETS = st.one_of(
    st.lists(st.integers(-10, 4000), min_size=2, max_size=2), st.lists(big_ints, min_size=2, max_size=2),
    _one_of([0], [0, 1, 2], [], [0.0, 256.0], ["0", "256"], [True, False], None, "0-256", [None, None]),
)
ENTRY_FIELDS = {"dtype": DTYPES | weird_json, "shape": SHAPES, "data_offsets": OFFSETS}
GOOD_ENTRY = {"dtype": "F32", "shape": [4, 16], "data_offsets": [0, 256]}
LENGTHS = _one_of(0, 1, 7, 8, 2**63, 2**64 - 1, 100_000_001, 99_999_999) | st.integers(0, 5000)


def _header_op(n: int, f: str) -> st.SearchStrategy[dict[str, Any]]:
    """One edit of the header around its n-th entry (mod the number of entries) and that entry's field f."""
    return st.one_of(
        ENTRY_FIELDS[f].map(lambda v: {"set": [[n, f], v]}),
        ENTRY_FIELDS[f].map(lambda v: {"set": [[n, f], v]}),
        raw_values.map(lambda v: {"set_raw": [[n, f], v]}),
        st.integers(0, 40).map(lambda m: {"copy": [[m, "data_offsets"], [n, "data_offsets"]]}),  # overlapping
        st.just({"reverse": [n, "data_offsets"]}),  # swapped
        st.just({"delete": [n]}), st.just({"delete": [n, f]}), st.just({"duplicate": [n]}),
        TENSOR_NAMES.map(lambda name: {"rename": [[n], name]}),
        TENSOR_NAMES.map(lambda name: {"set": [[name], GOOD_ENTRY]}),  # an extra tensor aliasing another
        weird_json.map(lambda v: {"set": [[n], v]}),
        (weird_json | _one_of(5, [], "x", {"format": 5}, {"format": "np"}, {"a": {"b": 1}})).map(
            lambda v: {"set": [["__metadata__"], v]}),
        raw_values.map(lambda v: {"set_raw": [["__metadata__"], v]}),
        LENGTHS.map(lambda v: {"length": v}),
    )


@st.composite
def safetensors_edits(draw: st.DrawFn, target: str) -> dict[str, list[dict[str, Any]]]:
    ops = [draw(_header_op(draw(st.integers(0, 40)), draw(st.sampled_from(sorted(ENTRY_FIELDS)))))
           for _ in range(draw(st.integers(1, 3)))]
    if draw(st.integers(0, 7)) == 0:
        ops = draw(whole_document())
    return {target: ops}


# ----------------------------------------------------------------------------- cases

def _targets(kind: str, command: str) -> list[str]:
    reads_models = command in ("merge", "verify-merge")
    merged = command == "verify-merge"
    return {
        "safetensors": ["adapter/adapter_model.safetensors"] + ["base/model.safetensors"] * reads_models
        + ["merged/model.safetensors"] * merged,
        "adapter_config": ["adapter/adapter_config.json"],
        "base_config": ["base/config.json"] + ["merged/config.json"] * merged,
        "shard_index": ["base/model.safetensors.index.json"] + ["merged/model.safetensors.index.json"] * merged,
    }[kind]


EDITS = {"safetensors": safetensors_edits, "adapter_config": adapter_config_edits,
         "base_config": base_config_edits, "shard_index": shard_index_edits}


@st.composite
def cases(draw: st.DrawFn, kind: str) -> Case:
    """A mutated input of `kind` for one of the commands that read it."""
    command = draw(st.sampled_from(KIND_COMMANDS[kind]))
    target = draw(st.sampled_from(_targets(kind, command)))
    edits = draw(EDITS[kind](target))
    return Case(command, draw(st.booleans()), "sharded" if kind == "shard_index" else "plain", edits, kind=kind)


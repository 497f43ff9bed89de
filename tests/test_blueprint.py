"""Blueprints give exactly the tree that transformers builds on the meta device, or nothing.

The oracle is tree_from_module(build_meta_model(...)) on configs chosen here, independently of the
probes tools/make_blueprints.py used: the tiny test configs, GQA, a head_dim that is not
hidden/heads, tied embeddings, other label counts, and config.json files as save_pretrained writes
them (only what differs from the defaults) and in full.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BLUEPRINT_CHECK, make_adapter
from helpers import python
from lorafit.targets.transformers import blueprint
from lorafit.targets.transformers.blueprint import tree_from_blueprint
from lorafit.targets.transformers.module_tree import tree_from_module
from lorafit.targets.transformers.resolve import build_meta_model, load_config, resolve_class
from lorafit.tree import ModuleTree

DATA = blueprint._load(blueprint.data_file(blueprint.installed_transformers() or ""))
TYPES = sorted(DATA["model_types"]) if DATA else []

# Small configs per model type, chosen by hand (not by the generator's probes).
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "llama": [
        dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0),
        dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=10, tie_word_embeddings=True, num_labels=5),
        dict(vocab_size=70, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=8),
    ],
    "mistral": [dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=6, sliding_window=None)],
    "qwen2": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=1)],
    "qwen3": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=12, tie_word_embeddings=True)],
    "gemma": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=8)],
    "gemma2": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8)],
    "phi3": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0)],
    "gpt2": [dict(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64),
             dict(vocab_size=80, n_embd=24, n_layer=3, n_head=3, num_labels=4, tie_word_embeddings=False)],
    "qwen2_vl": [dict(text_config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2),
                      vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                                         patch_size=2, spatial_merge_size=2, temporal_patch_size=2))],
    "qwen2_5_vl": [dict(text_config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2),
                        vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2,
                                           out_hidden_size=32, patch_size=2, spatial_merge_size=2,
                                           temporal_patch_size=2, window_size=8))],
    # OPT's blueprint is for the shape whose projection is as wide as its hidden size at 768 (opt-125m/350m):
    # project_in/out exist or not by the two sizes' equality, which a size expression cannot say.
    "opt": [dict(vocab_size=64, hidden_size=768, ffn_dim=32, num_hidden_layers=2, num_attention_heads=12,
                 max_position_embeddings=64, word_embed_proj_dim=768, pad_token_id=1)],
    "bert": [dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=64, num_labels=3)],
    "mixtral": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2)],
    "qwen3_moe": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=5,
                       num_experts_per_tok=2)],
    "qwen2_moe": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                       shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)],
    "deepseek_v3": [dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                         n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                         q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)],
    "gpt_oss": [dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                     layer_types=["full_attention", "sliding_attention"])],
    "gemma3_text": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)],
    "olmo2": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)],
    "granite": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)],
    "phi": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4)],
    "falcon": [dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)],
    "gpt_neox": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4)],
    "starcoder2": [dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)],
    "roberta": [dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=64, pad_token_id=1, num_labels=3)],
    "deberta-v2": [dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=3)],
    "whisper": [dict(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                     max_source_positions=16, max_target_positions=16, pad_token_id=0)],
    "t5": [dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=4)],
    "bart": [dict(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)],
    "llava": [dict(text_config=dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
                   vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4,
                                      projection_dim=16),
                   image_token_index=63)],
    # cross_attention_layers is pinned to its default (every 5th of 40 from 3): 17 runs of unlike layers
    "mllama": [dict(text_config=dict(vocab_size=96, pad_token_id=0, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=42, num_attention_heads=4, num_key_value_heads=2),
                    # likewise intermediate_layers_indices (3, 7, 15, 23, 30 of 32)
                    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=32, num_global_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=96))],
    "gemma3": [dict(text_config=dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8),
                    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
                    mm_tokens_per_image=4)],
    "idefics3": [dict(text_config=dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14),
                      scale_factor=2)],
}


def _config_json(tmp: Path, model_type: str, kw: dict[str, Any], full: bool) -> dict[str, Any]:
    config = transformers.AutoConfig.for_model(model_type, **kw)
    if full:
        return config.to_dict()
    config.save_pretrained(tmp)
    return json.loads((tmp / "config.json").read_text())


def _built(config_json: dict[str, Any], class_name: str) -> ModuleTree:
    """The meta build the way lorafit does it without a blueprint: config.json on disk, AutoConfig.from_pretrained
    (with its rewrites, e.g. mistral + layer_types -> ministral), the class, the meta device."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(config_json))
        config = load_config(Path(d))
        return tree_from_module(build_meta_model(resolve_class(class_name, config), config))


def assert_right_or_none(config_json: dict[str, Any], class_name: str) -> ModuleTree | None:
    """A blueprint may decline (None); when it answers, it is the meta build, which must then succeed."""
    drawn = tree_from_blueprint(config_json, class_name)
    if drawn is not None:
        assert_same_tree(drawn, _built(config_json, class_name))
    return drawn


def assert_same_tree(drawn: ModuleTree, built: ModuleTree) -> None:
    assert list(drawn.modules.items()) == list(built.modules.items())
    for f in ("class_name", "model_type", "base_model_prefix", "can_generate", "implied_task_type", "vocab_size",
              "tie_word_embeddings", "input_embeddings", "output_embeddings", "converts_keys", "tied"):
        assert getattr(drawn, f) == getattr(built, f), f


def test_blueprints_ship_for_the_pinned_transformers() -> None:
    assert DATA is not None, ("no blueprints for this transformers version: run `make blueprints` "
                              "and commit src/lorafit/blueprints/")
    assert {"llama", "gpt2", "bert"} <= set(TYPES)


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("full", [False, True], ids=["saved", "full"])
def test_blueprint_equals_the_meta_build(tmp_path: Path, model_type: str, full: bool) -> None:
    assert model_type in VARIANTS, f"add hand-picked configs for {model_type} to VARIANTS"
    spec = blueprint.specs_of(DATA, model_type)[0]
    for i, kw in enumerate(VARIANTS[model_type]):
        cj = _config_json(tmp_path / str(i), model_type, kw, full)
        for auto, concrete in spec["auto"].items():
            drawn = tree_from_blueprint(cj, auto)
            assert drawn is not None, (model_type, auto, kw)
            assert_same_tree(drawn, _built(cj, concrete))
            assert tree_from_blueprint(cj, concrete) is not None


def test_a_pinned_field_transformers_derives_is_right_or_declines() -> None:
    """OPT's word_embed_proj_dim is hidden_size when left out, and any other value adds project_in/out: the
    blueprint answers OPT-1.3b (which gives it equal) with the meta build's tree, and declines a config that gives
    another value, even the default config's (768 beside hidden_size 2048 once answered with no projection)."""
    cj = json.loads((Path(__file__).resolve().parent.parent / "bench" / "configs" / "opt-1.3b.json").read_text())
    drawn = tree_from_blueprint(cj, "AutoModelForCausalLM")
    assert drawn is not None
    assert_same_tree(drawn, _built(cj, "AutoModelForCausalLM"))
    assert tree_from_blueprint({k: v for k, v in cj.items() if k != "word_embed_proj_dim"}, "OPTModel") is not None
    for other in (768, 1024):
        assert tree_from_blueprint({**cj, "word_embed_proj_dim": other}, "AutoModelForCausalLM") is None
        assert "decoder.project_in" in _built({**cj, "word_embed_proj_dim": other}, "AutoModel").modules


@pytest.mark.parametrize("name", ["gpt-oss-20b", "deepseek-v3"])
def test_real_quantized_configs_are_their_meta_builds(name: str) -> None:
    """GPT-OSS (MXFP4) and DeepSeek-V3 (FP8) as published: the blueprint answers, with the meta build's tree."""
    cj = json.loads((Path(__file__).resolve().parent.parent / "bench" / "configs" / f"{name}.json").read_text())
    drawn = tree_from_blueprint(cj, "AutoModelForCausalLM")
    assert drawn is not None and "quantization_config" in cj
    assert_same_tree(drawn, _built(cj, "AutoModelForCausalLM"))


def test_real_configs_of_structural_variants_are_their_meta_builds(tmp_path: Path) -> None:
    """Each spec a model type has beyond its first was made for the structure of a real config (flan-T5's gated FFN,
    Gemma-3's vision tower without its head): those real configs get a tree, and it is the meta build."""
    configs = Path(__file__).resolve().parent.parent / "bench" / "configs"
    checked = 0
    for path in sorted(configs.glob("*.json")):
        cj = json.loads(path.read_text())
        specs = blueprint.specs_of(DATA, cj.get("model_type", ""))
        if len(specs) < 2:
            continue
        for auto in specs[0]["auto"]:
            drawn = tree_from_blueprint(cj, auto)
            assert drawn is not None, (path.name, auto)
            assert_same_tree(drawn, _built(cj, auto))
            checked += 1
        # Left out, a structural field takes the class default, not the variant's value: right or no answer.
        for spec in specs[1:]:
            for key in [k for k in spec["base"] if "." not in k and k in cj]:
                assert_right_or_none({k: v for k, v in cj.items() if k != key}, specs[0]["auto"]["AutoModel"])
    assert checked


AUTOS = ["AutoModelForCausalLM", "AutoModel", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
         "AutoModelForQuestionAnswering"]


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 6), kv_div=st.sampled_from([1, 2, 3]), head_dim=st.integers(1, 5).map(lambda n: 2 * n),
       explicit_head_dim=st.booleans(), layers=st.integers(1, 4), inter=st.integers(1, 70), vocab=st.integers(2, 90),
       tie=st.booleans(), labels=st.integers(1, 6), auto=st.sampled_from(AUTOS))
def test_llama_blueprint_on_any_sizes(heads: int, kv_div: int, head_dim: int, explicit_head_dim: bool, layers: int,
                                      inter: int, vocab: int, tie: bool, labels: int, auto: str) -> None:
    kv = heads // kv_div if heads % kv_div == 0 else heads
    kw: dict[str, Any] = dict(vocab_size=vocab, hidden_size=heads * (head_dim + (2 if explicit_head_dim else 0)),
                              intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=kv, tie_word_embeddings=tie, num_labels=labels)
    if explicit_head_dim:
        kw["head_dim"] = head_dim
    cj = transformers.LlamaConfig(**kw).to_diff_dict()
    if not explicit_head_dim:
        cj.pop("head_dim", None)  # as in older config.json files: derived from hidden_size / heads
    drawn = tree_from_blueprint(cj, auto)
    assert drawn is not None
    assert_same_tree(drawn, _built(cj, auto))


BASE = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2)


@pytest.mark.parametrize(("change", "why"), [
    ({"unknown_future_key": 3}, "a key the blueprint does not know"),
    ({"attention_bias": True}, "a pinned structural flag with another value"),
    ({"hidden_act": "gelu"}, "another activation module"),
    ({"hidden_size": 16.0}, "a size that is not an int"),
    ({"hidden_size": 0}, "a size transformers would reject"),
    ({"hidden_size": 15}, "heads do not divide hidden_size and head_dim is not given"),
    ({"model_type": "no-such-type"}, "an unknown model type"),
])
def test_outside_the_blueprint_there_is_no_tree(change: dict[str, Any], why: str) -> None:
    assert tree_from_blueprint(BASE, "AutoModelForCausalLM") is not None
    assert tree_from_blueprint({**BASE, **change}, "AutoModelForCausalLM") is None, why


def test_auto_map_on_a_built_in_type_is_the_built_in_tree() -> None:
    """lorafit never runs custom code: for a model type transformers knows, the tree is its own class either way
    (Phi-3 and Phi-4 hub configs carry auto_map), and check reports the custom code as a finding."""
    cj = {**BASE, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    drawn = tree_from_blueprint(cj, "AutoModelForCausalLM")
    assert drawn is not None
    assert_same_tree(drawn, _built(cj, "AutoModelForCausalLM"))


@pytest.mark.parametrize("quant", [{"quant_method": "fp8", "weight_block_size": [128, 128]}, {"quant_method": "mxfp4"}])
def test_a_quantized_base_is_the_tree_before_quantizing_with_a_note(bases: dict[str, Path], tmp_path: Path,
                                                                    quant: dict[str, Any]) -> None:
    """quantization_config acts in from_pretrained: the blueprint's tree is the meta build's (GPT-OSS's and
    DeepSeek-V3's hub configs carry one), and check says what that means."""
    import shutil

    import lorafit

    cj = {**BASE, "quantization_config": quant}
    drawn = tree_from_blueprint(cj, "AutoModelForCausalLM")
    assert drawn is not None
    assert_same_tree(drawn, _built(cj, "AutoModelForCausalLM"))
    base = tmp_path / "llama-base"
    shutil.copytree(bases["llama"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"quantization_config": quant}))
    make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a")
    report = lorafit.check(tmp_path / "a", base, "AutoModelForCausalLM")
    note = next(f for f in report.findings if f.code == "quantized-base")
    assert report.ok and note.severity == "info" and quant["quant_method"] in note.message


def test_layers_of_kinds_a_list_sets_are_right_or_decline() -> None:
    """Mllama's cross-attention layers sit where text_config.cross_attention_layers says: its default list is in
    the blueprint (Llama 3.2 11B Vision's), and another list is the meta build's to answer."""
    kw = VARIANTS["mllama"][0]
    for layers, answers in (([3, 8, 13, 18, 23, 28, 33, 38], True), ([1], False), ([3, 8], False)):
        cj = transformers.AutoConfig.for_model(
            "mllama", **{**kw, "text_config": {**kw["text_config"], "cross_attention_layers": layers}}).to_dict()
        drawn = assert_right_or_none(cj, "AutoModelForImageTextToText")
        assert (drawn is not None) == answers, layers
        if drawn is not None:
            assert sum(p.endswith("cross_attn") for p in drawn.modules) == len(layers)


def test_a_config_alias_is_read_as_its_field() -> None:
    """Qwen3-MoE hub configs say num_experts, which transformers' config stores as num_local_experts."""
    spec = {"aliases": {"num_experts": "num_local_experts"}}
    assert blueprint.canonical_keys(spec, {"num_experts": 128, "x": 1}) == {"num_local_experts": 128, "x": 1}
    assert blueprint.canonical_keys(spec, {"num_experts": 128, "num_local_experts": 64}) is None


def test_a_null_default_that_sizes_a_module_is_pinned() -> None:
    """GPT-2's n_inner is null (4 * n_embd) by default; set, it sizes the MLP: the blueprint does not guess."""
    gpt2 = dict(model_type="gpt2", vocab_size=64, n_embd=16, n_layer=2, n_head=2)
    assert tree_from_blueprint(gpt2, "AutoModelForCausalLM") is not None
    assert tree_from_blueprint({**gpt2, "n_inner": 40}, "AutoModelForCausalLM") is None


def test_unknown_class_or_other_transformers_version_has_no_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tree_from_blueprint(BASE, "BertModel") is None
    assert tree_from_blueprint(BASE, "AutoModelForSeq2SeqLM") is None
    monkeypatch.setattr(blueprint, "installed_transformers", lambda: "0.0.1")
    assert tree_from_blueprint(BASE, "AutoModelForCausalLM") is None


def test_a_config_outside_the_blueprint_is_still_checked_right(bases: dict[str, Path], tmp_path: Path) -> None:
    """attention_bias=True is not in the blueprint: the meta build answers, and check still finds the adapter."""
    import lorafit
    from conftest import save_base

    base = save_base(tmp_path, "llama", attention_bias=True)
    assert tree_from_blueprint(json.loads((base / "config.json").read_text()), "AutoModelForCausalLM") is None
    make_adapter(base, "AutoModelForCausalLM", tmp_path / "a")
    report = lorafit.check(tmp_path / "a", base, "AutoModelForCausalLM")
    assert report.ok and report.target["modules"] == len(_built(json.loads((base / "config.json").read_text()),
                                                               "AutoModelForCausalLM").modules)


def test_check_from_a_blueprint_imports_neither_torch_nor_transformers(bases: dict[str, Path],
                                                                       cold_start: dict[str, Any]) -> None:
    """BLUEPRINT_CHECK in a fresh Python (conftest.cold_start, shared with test_cli's cold import); then, with
    blueprints off, in another: the tree comes from the meta build, which imports both."""
    assert cold_start["blueprint_check"].split() == ["True", "False", "False", "blueprint"]
    env = {"LORAFIT_NO_CACHE": "1", "LORAFIT_NO_BLUEPRINTS": "1"}
    out = python("import sys, lorafit\n" + BLUEPRINT_CHECK, cold_start["adapter"], bases["llama"], env=env,
                 check=True).out.split()
    assert out == ["True", "True", "True", "meta"]


def test_a_derived_field_left_out_is_never_taken_for_its_default() -> None:
    """A pinned or size field that transformers derives from others has no default to fall back on."""
    spec = {"sizes": {"hidden": 8, "head_dim": 4}, "pinned": {"window": None}, "free": [], "bools": {},
            "derived": {"head_dim": "hidden/2", "window": None}}
    assert blueprint.resolve_sizes(spec, {"hidden": 10, "window": None}) == {"hidden": 10, "head_dim": 5}
    assert blueprint.resolve_sizes(spec, {"hidden": 10}) is None  # window would be derived: unknown
    assert blueprint.resolve_sizes(spec, {"hidden": 9, "window": None}) is None  # 9/2 is not exact
    assert blueprint.evaluate("3*n_embd/2", {"n_embd": 8}) == 12
    assert blueprint.evaluate("hidden*kv/heads", {"hidden": 12, "kv": 2, "heads": 3}) == 8
    assert blueprint.evaluate("2*hidden*kv/heads+hidden", {"hidden": 12, "kv": 2, "heads": 3}) == 28
    assert blueprint.evaluate("2*hidden*kv/heads+hidden", {"hidden": 12, "kv": 1, "heads": 5}) is None


SMALL_LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2)
SMALL_MISTRAL = dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.mark.parametrize(("config", "class_name", "answers"), [
    # qwen2 splits hidden_size with floor division when heads do not divide it: the blueprint declines
    (dict(model_type="qwen2", vocab_size=64, hidden_size=30, intermediate_size=40, num_hidden_layers=1,
          num_attention_heads=4, num_key_value_heads=4), "AutoModelForCausalLM", False),
    # transformers applies num_labels last; id2label keys count as ints
    ({**SMALL_LLAMA, "id2label": {"0": "NEG", "1": "POS"}, "num_labels": 1}, "AutoModelForSequenceClassification",
     True),
    ({**SMALL_LLAMA, "id2label": {"0": "a", "00": "b"}}, "AutoModelForSequenceClassification", True),
    ({**SMALL_LLAMA, "id2label": {"0": "a", "1": "b", "2": "c"}}, "AutoModelForTokenClassification", True),
    # AutoConfig reads mistral + layer_types as ministral
    ({**SMALL_MISTRAL, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
     "AutoModelForCausalLM", False),
    ({**SMALL_LLAMA, "pad_token_id": 64}, "AutoModelForCausalLM", False),  # Embedding rejects it
    # Phi-3's fused qkv width is a sum of two terms; with heads that do not divide hidden_size it declines
    (dict(model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=1, pad_token_id=0), "AutoModelForCausalLM", True),
    (dict(model_type="phi3", vocab_size=64, hidden_size=30, intermediate_size=40, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=1, pad_token_id=0), "AutoModelForCausalLM", False),
    ({**SMALL_LLAMA, "head_dim": None, "num_key_value_heads": None}, "AutoModel", True),  # null: derived
    (dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
          num_attention_heads=4, layer_types=["full_attention"]), "AutoModelForCausalLM", False),
    (dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
          num_attention_heads=4, layer_types=["full_attention", "sliding_attention"]), "AutoModel", True),
    # keys hub configs carry that no 5.24 model code reads
    (dict(model_type="gpt2", vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_ctx=64,
          task_specific_params={"text-generation": {"do_sample": True}}), "AutoModelForCausalLM", True),
    (dict(model_type="bert", vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
          intermediate_size=32, position_embedding_type="absolute"), "AutoModel", True),
])
def test_blueprint_is_right_or_declines(config: dict[str, Any], class_name: str, answers: bool) -> None:
    assert (assert_right_or_none(config, class_name) is not None) == answers


@st.composite
def any_small_config(draw: Any) -> tuple[dict[str, Any], str]:
    """Small sizes with no care for validity: heads need not divide anything, head_dim may be odd."""
    model_type = draw(st.sampled_from(TYPES))
    n = st.integers(1, 40)
    if model_type == "gpt2":
        cj: dict[str, Any] = dict(vocab_size=draw(n), n_embd=draw(n), n_layer=draw(st.integers(1, 3)),
                                  n_head=draw(st.integers(1, 6)), n_positions=draw(n))
    elif model_type == "bert":
        cj = dict(vocab_size=draw(n), hidden_size=draw(n), num_hidden_layers=draw(st.integers(1, 3)),
                  num_attention_heads=draw(st.integers(1, 6)), intermediate_size=draw(n),
                  max_position_embeddings=draw(n), type_vocab_size=draw(st.integers(1, 3)))
    else:
        cj = dict(vocab_size=draw(n), hidden_size=draw(n), intermediate_size=draw(n),
                  num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=draw(st.integers(1, 6)),
                  num_key_value_heads=draw(st.integers(1, 6)))
        if draw(st.booleans()):
            cj["head_dim"] = draw(st.integers(1, 12))
    if draw(st.booleans()):
        cj["tie_word_embeddings"] = draw(st.booleans())
    if draw(st.booleans()):
        cj["num_labels"] = draw(st.integers(1, 5))
    spec = blueprint.specs_of(DATA, model_type)[0]
    return {"model_type": model_type, **cj}, draw(st.sampled_from(sorted(spec["auto"])))


@settings(max_examples=120, deadline=None)
@given(any_small_config())
def test_on_any_config_a_blueprint_tree_is_the_meta_build(case: tuple[dict[str, Any], str]) -> None:
    """The safety property: whatever the sizes, an answer equals the meta build. Declining is always allowed;
    so is answering for a config transformers then refuses to build (documented: loading fails there anyway)."""
    config, class_name = case
    drawn = tree_from_blueprint(config, class_name)
    if drawn is None:
        return
    try:
        built = _built(config, class_name)
    except Exception:  # transformers refuses the config: its error is what the user will see on load
        return
    assert_same_tree(drawn, built)

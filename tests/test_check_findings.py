"""Each check finding on a real case, with stock PEFT showing that the failure it names is real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import load_model, make_adapter, save_base
from helpers import cli, cli_json, codes


def test_trained_head_absent_from_target_class(bases: dict[str, Path], tmp_path: Path) -> None:
    """A SEQ_CLS adapter's trained `score` head has no place on a CausalLM: PEFT drops it silently."""
    adapter = tmp_path / "cls"
    make_adapter(bases["llama"], "AutoModelForSequenceClassification", adapter, task_type="SEQ_CLS")
    keys = json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"]
    assert "score" in keys

    # Stock PEFT: loads on CausalLM without an error, the head is nowhere.
    stock = PeftModel.from_pretrained(load_model(bases["llama"], "AutoModelForCausalLM"), adapter)
    assert not any("score" in n for n, _ in stock.named_parameters())

    code, report = cli_json("check", adapter, "--base", bases["llama"], "--class", "AutoModelForCausalLM")
    assert code == 1
    absent = next(f for f in report["findings"] if f["code"] == "modules-to-save-absent")
    assert absent["severity"] == "error"
    assert any("score" in k for k in absent["keys"])

    out = tmp_path / "out"
    code, stdout, _ = cli("fix", adapter, "--base", bases["llama"], "--class", "AutoModelForCausalLM", "-o", out)
    assert code == 1 and not out.exists()
    assert "modules-to-save-absent" in stdout


def test_task_type_needs_generation(bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "causal"
    make_adapter(bases["llama"], "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM")
    with pytest.raises(AttributeError, match="prepare_inputs_for_generation"):
        PeftModel.from_pretrained(load_model(bases["llama"], "AutoModel"), adapter)
    code, report = cli_json("check", adapter, "--base", bases["llama"], "--class", "AutoModel")
    # the class is the cause: the paths show it (layout-mismatch), and the task_type finding is shown under it
    assert code == 1 and codes(report, "error") == {"layout-mismatch"}
    (task,) = [f for f in report["findings"] if f["code"] == "task-type-incompatible"]
    assert task["caused_by"] == "layout-mismatch"
    # paths that land as saved, with a task_type the class cannot serve: the task_type is the cause
    alone = tmp_path / "alone"
    make_adapter(bases["llama"], "AutoModel", alone)
    config = json.loads((alone / "adapter_config.json").read_text())
    (alone / "adapter_config.json").write_text(json.dumps(config | {"task_type": "CAUSAL_LM"}))
    with pytest.raises(AttributeError, match="prepare_inputs_for_generation"):
        PeftModel.from_pretrained(load_model(bases["llama"], "AutoModel"), alone)
    code, report = cli_json("check", alone, "--base", bases["llama"], "--class", "AutoModel")
    assert code == 1 and codes(report, "error") == {"task-type-incompatible"}


def test_task_head_without_trained_copy_raises_keyerror_in_peft(bases: dict[str, Path], tmp_path: Path) -> None:
    """task_type SEQ_CLS makes PEFT wrap `classifier`; with no saved copy PEFT raises KeyError."""
    adapter = tmp_path / "fe"
    make_adapter(bases["bert"], "AutoModel", adapter, task_type="FEATURE_EXTRACTION")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["task_type"] = "SEQ_CLS"
    cfg["target_modules"] = ["bert.encoder.layer.0.attention.self.query"]  # irrelevant: fails before
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    (broken / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    code, report = cli_json("check", broken, "--base", bases["bert"],
                            "--class", "AutoModelForSequenceClassification")
    assert "modules-to-save-missing" in codes(report, "error")
    with pytest.raises(KeyError):
        PeftModel.from_pretrained(load_model(bases["bert"], "AutoModelForSequenceClassification"), broken)


def test_resized_vocabulary(tmp_path: Path) -> None:
    """An adapter trained after resize_token_embeddings does not fit the original vocabulary."""
    base = save_base(tmp_path, "llama")
    model = load_model(base, "AutoModelForCausalLM")
    model.resize_token_embeddings(80)
    torch.manual_seed(3)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False,
                                          task_type="CAUSAL_LM"))
    adapter = tmp_path / "resized"
    pm.save_pretrained(adapter)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load_model(base, "AutoModelForCausalLM"), adapter)
    code, report = cli_json("check", adapter, "--base", base)
    assert code == 1
    emb = next(f for f in report["findings"] if f["code"] == "embedding-size")
    assert "resize_token_embeddings" in emb["hint"]
    assert "shape-mismatch" not in codes(report)


def test_tied_embeddings_touched(bases: dict[str, Path], tmp_path: Path) -> None:
    gpt2 = load_model(bases["gpt2"], "AutoModelForCausalLM")
    assert gpt2.config.tie_word_embeddings
    adapter = tmp_path / "wte"
    make_adapter(bases["gpt2"], "AutoModelForCausalLM", adapter, target_modules=["wte", "c_attn"],
                 task_type="CAUSAL_LM")
    code, report = cli_json("check", adapter, "--base", bases["gpt2"])
    assert code == 0
    assert "tied-embeddings" in codes(report, "warning")


def test_wrong_base_shapes(bases: dict[str, Path], tmp_path: Path) -> None:
    other = save_base(tmp_path, "llama", intermediate_size=48)
    adapter = tmp_path / "a"
    make_adapter(bases["llama"], "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM")
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load_model(other, "AutoModelForCausalLM"), adapter)
    code, report = cli_json("check", adapter, "--base", other)
    assert code == 1
    shape = next(f for f in report["findings"] if f["code"] == "shape-mismatch")
    assert all("down_proj" in k for k in shape["keys"])


def test_user_key_mapping(bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    src = make_adapter(bases["llama"], "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM")
    out = tmp_path / "fixed"
    code, _, err = cli("fix", adapter, "--base", bases["llama"], "--class", "AutoModel", "-o", out,
                       "--key-mapping", r"^model\.=")
    assert code == 0, err
    loaded = PeftModel.from_pretrained(load_model(bases["llama"], "AutoModel"), out)
    a = src.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    b = loaded.base_model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.equal(a, b)
    code, _, err = cli("check", adapter, "--base", bases["llama"], "--key-mapping", "([unclosed=x")
    assert code == 2 and "not a valid regex" in err


def test_fix_rewrites_prefixed_patterns(bases: dict[str, Path], tmp_path: Path) -> None:
    """rank/alpha patterns spelled with the old prefix would stop matching: fix keeps every module's r and alpha."""
    adapter = tmp_path / "a"
    src = make_adapter(bases["llama"], "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM",
                       rank_pattern={"model.layers.1.self_attn.q_proj": 2},
                       alpha_pattern={"model.layers.0.self_attn.v_proj": 32})
    out = tmp_path / "fixed"
    code, _, err = cli("fix", adapter, "--base", bases["llama"], "--class", "AutoModel", "-o", out)
    assert code == 0, err
    loaded = PeftModel.from_pretrained(load_model(bases["llama"], "AutoModel"), out)
    for path in ("layers.0.self_attn.v_proj", "layers.1.self_attn.q_proj", "layers.0.mlp.down_proj"):
        a = src.base_model.model.model.get_submodule(path)
        b = loaded.base_model.model.get_submodule(path)
        assert (a.r["default"], a.scaling["default"]) == (b.r["default"], b.scaling["default"]), path


def test_class_defaults_to_task_type(bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    make_adapter(bases["llama"], "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM")
    _, report = cli_json("check", adapter, "--base", bases["llama"])
    assert report["target"]["class"] == "LlamaForCausalLM"
    assert report["ok"] is True


def test_concrete_class_name(bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    make_adapter(bases["llama"], "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM")
    code, report = cli_json("check", adapter, "--base", bases["llama"], "--class", "LlamaModel")
    assert code == 1 and report["target"]["class"] == "LlamaModel"
    assert "layout-mismatch" in codes(report, "error")
    code, _, err = cli("check", adapter, "--base", bases["llama"], "--class", "LlamaModell")
    assert code == 2 and "LlamaModel" in err  # the suggestion


def test_the_task_type_hint_says_what_fix_writes(bases: dict[str, Path], tmp_path: Path) -> None:
    """On a classification class whose head the adapter never trained, fix writes task_type null, and check says so
    beforehand; fix then lists the change."""
    adapter = tmp_path / "causal"
    make_adapter(bases["llama"], "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM")
    seq = "AutoModelForSequenceClassification"
    code, report = cli_json("check", adapter, "--base", bases["llama"], "--class", seq)
    hints = [f["hint"] for f in report["findings"] if f["code"].startswith("task-type")]
    assert hints and all(h.startswith("`lorafit fix` rewrites task_type to null") for h in hints), hints
    code, fixed = cli_json("fix", adapter, "--base", bases["llama"], "--class", seq, "-o", tmp_path / "f")
    assert fixed["result"]["config_changes"]["task_type"] == {"from": "CAUSAL_LM", "to": None}
    assert json.loads((tmp_path / "f" / "adapter_config.json").read_text())["task_type"] is None

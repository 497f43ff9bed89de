"""An adapter saved after resize_token_embeddings, with embed_tokens in modules_to_save: PEFT's
save_embedding_layers="auto" then saves the whole embedding layers too (embed_tokens.{weight,
modules_to_save.weight, original_module.weight} and lm_head.weight). On the resized base stock PEFT loads every
tensor; check, verify and merge must agree with it (they reported modules-to-save-absent and dropped-tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import load_model
from helpers import cli, cli_json, codes

VOCAB = 72  # the tiny Llama's vocabulary after adding tokens


@pytest.fixture(scope="module")
def resized(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resized")
    torch.manual_seed(3)
    model = load_model(bases["llama"], "AutoModelForCausalLM")  # base_model_name_or_path: the unresized base
    model.resize_token_embeddings(VOCAB)
    model.save_pretrained(root / "base")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          modules_to_save=["embed_tokens"], init_lora_weights=False,
                                          task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained copy that differs from the base's rows
        pm.base_model.model.model.embed_tokens.modules_to_save["default"].weight.add_(0.5)
    pm.save_pretrained(root / "adapter")
    return {"base": root / "base", "adapter": root / "adapter", "small": bases["llama"]}


def test_peft_saved_the_whole_embedding_layers(resized: dict[str, Path]) -> None:
    with safe_open(str(resized["adapter"] / "adapter_model.safetensors"), "pt") as f:
        extra = {k for k in f.keys() if "lora_" not in k}
    assert extra == {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight",
                     "base_model.model.model.embed_tokens.modules_to_save.weight",
                     "base_model.model.model.embed_tokens.original_module.weight"}


def test_check_and_stock_verify_agree_with_peft(resized: dict[str, Path]) -> None:
    code, report = cli_json("check", resized["adapter"], "--base", resized["base"])
    assert code == 0 and not codes(report, "error"), report["findings"]
    code, report = cli_json("verify", resized["adapter"], "--base", resized["base"])
    assert code == 0, report["findings"]
    assert report["result"]["tensors_bit_equal"] == report["result"]["tensors_expected"] == 12


def test_merge_is_bit_identical_to_peft(resized: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    code, _, err = cli("merge", resized["adapter"], "--base", resized["base"], "-o", out)
    assert code == 0, err
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    pm = PeftModel.from_pretrained(load_model(resized["base"], "AutoModelForCausalLM"), str(resized["adapter"]))
    want = pm.merge_and_unload().state_dict()
    assert set(merged) == set(want)
    for k, v in want.items():
        assert torch.equal(merged[k], v), k
    base = load_model(resized["base"], "AutoModelForCausalLM").state_dict()
    assert not torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # the copy won
    code, _, err = cli("verify-merge", out, "--base", resized["base"], "--adapter", resized["adapter"])
    assert code == 0, err


def test_the_unresized_base_is_one_error_naming_the_size_and_peft_s_exception(resized: dict[str, Path]) -> None:
    code, report = cli_json("check", resized["adapter"], "--base", resized["small"])
    assert code == 1 and codes(report, "error") == {"embedding-size"}  # before: also modules-to-save-missing
    (finding,) = [f for f in report["findings"] if f["code"] == "embedding-size"]
    assert finding["hint"] == f"model.resize_token_embeddings({VOCAB}) before loading"
    assert "size-mismatch RuntimeError" in finding["message"]
    with pytest.raises(RuntimeError, match="size mismatch"):  # what stock PEFT really raises
        PeftModel.from_pretrained(load_model(resized["small"], "AutoModelForCausalLM"), str(resized["adapter"]))
    resized_model = load_model(resized["small"], "AutoModelForCausalLM")
    resized_model.resize_token_embeddings(VOCAB)  # the hint, followed: stock PEFT loads
    PeftModel.from_pretrained(resized_model, str(resized["adapter"]))

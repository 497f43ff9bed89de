"""The text-only class of a VLM checkpoint is a target like any other, with stock PEFT and transformers as oracles.

`check --class MllamaForCausalLM` on an mllama checkpoint exited 2 ("a 'mllama_text_model' class, but the base
model is 'mllama'"), yet MllamaForCausalLM.from_pretrained reads that checkpoint's language weights and stock
PEFT then lands none of a VLM adapter's tensors. Gemma3ForCausalLM finds none of a gemma3 checkpoint's weights:
transformers leaves them random, which lorafit must say, naming the class that loads them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    MllamaConfig,
    MllamaForCausalLM,
    MllamaForConditionalGeneration,
)

from helpers import adapter_tensors, cli, cli_json, codes, snapshot

TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
MLLAMA = MllamaConfig(text_config=dict(TEXT, pad_token_id=0, cross_attention_layers=[1]),
                      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_global_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                                         vision_output_dim=32, intermediate_layers_indices=[0]))
GEMMA3 = Gemma3Config(text_config=dict(TEXT, head_dim=8), mm_tokens_per_image=4,
                      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14))
LANGUAGE_ONLY = r".*language_model.*\.(q_proj|v_proj)"


def _adapter(model: torch.nn.Module, out: Path, targets: object) -> Path:
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():  # trained: B != 0
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mllama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mllama")
    torch.manual_seed(0)
    MllamaForConditionalGeneration(MLLAMA).save_pretrained(root / "base")
    vlm = MllamaForConditionalGeneration.from_pretrained(str(root / "base"))
    return {"base": root / "base",
            "text": _adapter(MllamaForCausalLM.from_pretrained(str(root / "base")), root / "text",
                             ["q_proj", "v_proj"]),
            "vlm": _adapter(vlm, root / "vlm", LANGUAGE_ONLY),
            "vlm_tower": _adapter(MllamaForConditionalGeneration.from_pretrained(str(root / "base")), root / "tower",
                                  ["q_proj", "v_proj"])}


def _stock(adapter: Path, base: Path, cls: type) -> dict[str, torch.Tensor]:
    """The adapter tensors stock PEFT holds after loading, keyed as PEFT saves them."""
    return dict(get_peft_model_state_dict(PeftModel.from_pretrained(cls.from_pretrained(str(base)), str(adapter))))


def test_the_text_class_of_a_vlm_checkpoint_is_checked(mllama: dict[str, Path]) -> None:
    code, report = cli_json("check", mllama["text"], "--base", mllama["base"], "--class", "MllamaForCausalLM")
    assert code == 0 and not codes(report), report["findings"]  # before: exit 2, "a 'mllama_text_model' class"
    assert report["target"]["class"] == "MllamaForCausalLM"
    saved, loaded = adapter_tensors(mllama["text"]), _stock(mllama["text"], mllama["base"], MllamaForCausalLM)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())


@pytest.mark.parametrize(("adapter", "cls", "other"), [("vlm", "MllamaForCausalLM", "text"),
                                                       ("text", "MllamaForConditionalGeneration", "vlm")])
def test_fix_moves_an_adapter_between_the_vlm_and_its_text_class(mllama: dict[str, Path], adapter: str, cls: str,
                                                                 other: str, tmp_path: Path) -> None:
    target = {"MllamaForCausalLM": MllamaForCausalLM,
              "MllamaForConditionalGeneration": MllamaForConditionalGeneration}[cls]
    code, report = cli_json("check", mllama[adapter], "--base", mllama["base"], "--class", cls)
    assert code == 1 and "layout-mismatch" in codes(report, "error")
    try:  # stock PEFT lands nothing: B stays 0, or its regex target_modules match nothing and it raises
        stock = _stock(mllama[adapter], mllama["base"], target)
    except ValueError as e:
        assert "not found in the base model" in str(e)
        stock = {}
    assert not any(v.any() for k, v in stock.items() if "lora_B" in k)
    out = tmp_path / "fixed"
    code, _, err = cli("fix", mllama[adapter], "--base", mllama["base"], "--class", cls, "-o", out)
    assert code == 0, err
    saved, loaded = adapter_tensors(mllama[adapter]), _stock(out, mllama["base"], target)
    assert len(loaded) == len(saved)
    # The fixed adapter is keyed as the one trained on that class: the same module paths.
    assert set(adapter_tensors(out)) == set(adapter_tensors(mllama[other]))
    assert all(any(torch.equal(v, w) for w in loaded.values()) for v in saved.values())


def test_vision_tower_loras_have_no_place_in_the_text_class(mllama: dict[str, Path], tmp_path: Path) -> None:
    before = snapshot(mllama["vlm_tower"])
    code, report = cli_json("fix", mllama["vlm_tower"], "--base", mllama["base"], "--class", "MllamaForCausalLM",
                            "-o", tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists() and snapshot(mllama["vlm_tower"]) == before
    (dropped,) = [f for f in report["findings"] if f["code"] == "dropped-tensors"]
    assert "model.vision_model adapt a part of the trained model that MllamaForCausalLM does not have" in \
        dropped["message"]
    assert all("vision_model" in k for k in dropped["keys"])


def test_merge_on_the_text_class_is_bit_identical_to_peft(mllama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    code, _, err = cli("merge", mllama["text"], "--base", mllama["base"], "--class", "MllamaForCausalLM", "-o", out)
    assert code == 0, err
    got = load_file(str(next(out.glob("*.safetensors"))))
    pm = PeftModel.from_pretrained(MllamaForCausalLM.from_pretrained(str(mllama["base"])), str(mllama["text"]))
    want = pm.merge_and_unload().state_dict()
    for name, value in want.items():  # the checkpoint keeps its own names: language_model.<name>
        assert torch.equal(got[f"language_model.{name}"], value), name
    base = load_file(str(mllama["base"] / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in base.items() if not k.startswith("language_model."))
    assert cli("verify-merge", out, "--base", mllama["base"], "--adapter", mllama["text"],
               "--class", "MllamaForCausalLM").code == 0


def test_a_text_class_that_finds_no_weights_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(GEMMA3).save_pretrained(tmp_path / "base")
    vlm = Gemma3ForConditionalGeneration.from_pretrained(str(tmp_path / "base"))
    adapter = _adapter(vlm, tmp_path / "adapter", LANGUAGE_ONLY)
    text = Gemma3ForCausalLM.from_pretrained(str(tmp_path / "base"))  # what transformers really does
    stored = load_file(str(tmp_path / "base" / "model.safetensors"))["language_model.model.embed_tokens.weight"]
    assert not torch.equal(text.model.embed_tokens.weight, stored)  # random, not the checkpoint's
    code, report = cli_json("check", adapter, "--base", tmp_path / "base", "--class", "Gemma3ForCausalLM")
    assert code == 1
    (finding,) = [f for f in report["findings"] if f["code"] == "weights-not-loaded"]
    assert "finds 0 of" in finding["message"] and "random init" in finding["message"]
    works = "Gemma3ForConditionalGeneration"
    assert finding["hint"] == f"load the base with {works} (--class {works})"
    code, report = cli_json("check", adapter, "--base", tmp_path / "base", "--class", "Gemma3ForConditionalGeneration")
    assert code == 0, report["findings"]

"""verify-merge passes a correct merge (lorafit's or PEFT's own) and names what is wrong in a bad one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file, save_file

from conftest import load_model, make_adapter, save_base
from helpers import cli
from lorafit import merge, verify_merge

CLS = "AutoModelForCausalLM"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bf16 tiny Llama, a DoRA-free adapter on q/v/down, and lorafit's merge of it; shared by the module."""
    root = tmp_path_factory.mktemp("vm")
    base = save_base(root, "llama")
    load_model(base, CLS).to(torch.bfloat16).save_pretrained(base)
    make_adapter(base, CLS, root / "adapter")
    assert merge(root / "adapter", base, root / "merged").ok
    return {"root": root, "base": base, "adapter": root / "adapter", "merged": root / "merged"}


def peft_merged(base: Path, adapter: Path, out: Path, safe: bool = False) -> Path:
    """Merge with stock PEFT and save_pretrained: an independent merged checkpoint."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload(safe_merge=safe).save_pretrained(out)
    return out


def edited_copy(src: Path, dst: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    """Copy a single-file checkpoint with some tensors replaced (or removed, for None)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for k, v in edit.items():
        if v is None:
            del tensors[k]
        else:
            tensors[k] = v.contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_passes_on_lorafit_merge(llama: dict[str, Path]) -> None:
    report = verify_merge(llama["merged"], llama["base"], llama["adapter"])
    assert report.ok, report.dumps()
    assert report.result["adapted"] == report.result["adapted_ok"] == 6
    assert report.result["bit_identical"] == report.result["tensors"] - 6
    # one rounding of the exact sum: half an ulp, at most half an epsilon relative to the operands
    assert all(row["ok"] and not row["unchanged"] and row["max_error_eps"] <= 0.5 for row in report.modules)


@pytest.mark.parametrize("safe", [False, True], ids=["unsafe", "safe"])
def test_passes_on_peft_merge(llama: dict[str, Path], tmp_path: Path, safe: bool) -> None:
    out = peft_merged(llama["base"], llama["adapter"], tmp_path / "peft", safe)
    assert verify_merge(out, llama["base"], llama["adapter"]).ok


def test_passes_on_dora_gpt2_tied_and_untied(tmp_path: Path, bases: dict[str, Path]) -> None:
    """fp32 GPT-2: DoRA on Conv1D and the tied embedding; then a modules_to_save head that unties them."""
    make_adapter(bases["gpt2"], CLS, tmp_path / "a", target_modules=["wte", "c_attn"], use_dora=True)
    assert merge(tmp_path / "a", bases["gpt2"], tmp_path / "m").ok
    assert verify_merge(tmp_path / "m", bases["gpt2"], tmp_path / "a").ok
    pm = make_adapter(bases["gpt2"], CLS, tmp_path / "b", modules_to_save=["lm_head"])
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(1.0)
    pm.save_pretrained(tmp_path / "b")
    report = merge(tmp_path / "b", bases["gpt2"], tmp_path / "n")
    assert "weights-untied" in report.codes()
    assert verify_merge(tmp_path / "n", bases["gpt2"], tmp_path / "b").ok
    config = json.loads((tmp_path / "n" / "config.json").read_text())
    config["tie_word_embeddings"] = True  # a merge that forgot to say so: loading would re-tie and lose the head
    (tmp_path / "n" / "config.json").write_text(json.dumps(config))
    assert "merge-delta-wrong" in verify_merge(tmp_path / "n", bases["gpt2"], tmp_path / "b").codes()


def test_unchanged_model_is_caught(llama: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(llama["base"], tmp_path / "copy")
    report = verify_merge(tmp_path / "copy", llama["base"], llama["adapter"])
    assert report.codes() == ["merge-unchanged"]
    assert report.findings[0].count == 6


def test_wrong_scaling_is_caught(llama: dict[str, Path], tmp_path: Path) -> None:
    """Merged with lora_alpha doubled (the classic alpha/r vs alpha/sqrt(r) or wrong-pattern mistake)."""
    wrong = tmp_path / "wrong-adapter"
    shutil.copytree(llama["adapter"], wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= 2
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    assert merge(wrong, llama["base"], tmp_path / "m").ok
    report = verify_merge(tmp_path / "m", llama["base"], llama["adapter"])
    assert report.codes() == ["merge-delta-wrong"]
    assert report.findings[0].count == 6 and "unchanged" not in report.findings[0].message
    assert all(not row["ok"] and row["max_error_eps"] > 2 for row in report.modules)


def test_half_the_layers_merged_is_caught(llama: dict[str, Path], tmp_path: Path) -> None:
    """Layer 1 left at the base values: merge-delta-wrong names exactly those tensors."""
    base = load_file(str(llama["base"] / "model.safetensors"))
    layer1 = [k for k in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                          "model.layers.1.mlp.down_proj.weight")]
    edited_copy(llama["merged"], tmp_path / "half", {k: base[k] for k in layer1})
    report = verify_merge(tmp_path / "half", llama["base"], llama["adapter"])
    assert report.codes() == ["merge-delta-wrong"]
    finding = report.findings[0]
    assert sorted(finding.keys) == sorted(layer1) and finding.count == 3
    assert "3 of them unchanged from the base" in finding.message


def test_extra_change_and_missing_tensor_are_caught(llama: dict[str, Path], tmp_path: Path) -> None:
    merged = load_file(str(llama["merged"] / "model.safetensors"))
    norm = "model.layers.0.input_layernorm.weight"
    edited_copy(llama["merged"], tmp_path / "bad", {norm: merged[norm] * 1.5, "model.norm.weight": None,
                                                    "extra.weight": torch.zeros(2)})
    report = verify_merge(tmp_path / "bad", llama["base"], llama["adapter"])
    assert sorted(report.codes()) == ["merge-extra-change", "merge-missing-tensor"]
    by_code = {f.code: f for f in report.findings}
    assert norm in by_code["merge-extra-change"].keys
    assert any("extra.weight" in k for k in by_code["merge-extra-change"].keys)
    assert by_code["merge-missing-tensor"].keys == ["model.norm.weight"]


def test_cli_exit_codes(llama: dict[str, Path], tmp_path: Path) -> None:
    ok = cli("verify-merge", llama["merged"], "--base", llama["base"], "--adapter", llama["adapter"], "--json")
    assert ok.code == 0, ok.output
    data = json.loads(ok.out)
    assert data["command"] == "verify-merge" and len(data["modules"]) == 6
    bad = cli("verify-merge", llama["base"], "--base", llama["base"], "--adapter", llama["adapter"])
    assert bad.code == 1 and "merge-unchanged" in bad.out


def test_bart_shared_embedding_both_ways(tmp_path: Path) -> None:
    """LoRA on BART's encoder and decoder embed_tokens lands twice on model.shared, the one stored tensor.

    verify-merge passes on lorafit's and on PEFT's merge, and catches a merge that added only one of the two.
    """
    base = save_base(tmp_path, "bart")
    make_adapter(base, "AutoModelForSeq2SeqLM", tmp_path / "a", target_modules=["embed_tokens", "q_proj"])
    assert merge(tmp_path / "a", base, tmp_path / "m").ok
    assert verify_merge(tmp_path / "m", base, tmp_path / "a").ok
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(base))
    PeftModel.from_pretrained(model, str(tmp_path / "a")).merge_and_unload().save_pretrained(tmp_path / "p")
    assert verify_merge(tmp_path / "p", base, tmp_path / "a").ok
    # Only the encoder's delta: what a merge that skips the second alias would write.
    enc = PeftModel.from_pretrained(transformers.AutoModelForSeq2SeqLM.from_pretrained(str(base)), str(tmp_path / "a"))
    layer = enc.base_model.model.model.encoder.embed_tokens
    shared = load_model(base, "AutoModelForSeq2SeqLM").state_dict()["model.shared.weight"]
    one = shared + layer.get_delta_weight("default")
    half = edited_copy(tmp_path / "m", tmp_path / "half", {"model.shared.weight": one})
    report = verify_merge(half, base, tmp_path / "a")
    assert not report.ok

"""Cases a demanding user hits: keys without PEFT's prefix, trainable tokens, broken config fields,
outputs that would overwrite inputs, user mappings that land nothing, targets that select nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import lorafit
from conftest import load_model, make_adapter
from helpers import cli, cli_json, codes, snapshot


@pytest.fixture()
def causal(bases: dict[str, Path], tmp_path: Path) -> tuple[Path, PeftModel]:
    out = tmp_path / "causal"
    return out, make_adapter(bases["llama"], "AutoModelForCausalLM", out, task_type="CAUSAL_LM")


def _loaded_equals(model: PeftModel, reference: PeftModel) -> bool:
    got, want = get_peft_model_state_dict(model), get_peft_model_state_dict(reference)
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_keys_without_peft_prefix(bases: dict[str, Path], causal: tuple[Path, PeftModel], tmp_path: Path) -> None:
    """Keys saved without `base_model.model.`: PEFT loads none of them; check says so, fix adds the prefix."""
    adapter, src = causal
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(adapter / "adapter_config.json", bare)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()},
              str(bare / "adapter_model.safetensors"))
    stock = PeftModel.from_pretrained(load_model(bases["llama"], "AutoModelForCausalLM"), bare)
    assert not _loaded_equals(stock, src)

    code, report = cli_json("check", bare, "--base", bases["llama"])
    assert code == 1 and "unprefixed-keys" in codes(report, "error")
    assert report["alignment"]["lands_as_is"] == 0
    out = tmp_path / "fixed"
    code, _, err = cli("fix", bare, "--base", bases["llama"], "-o", out)
    assert code == 0, err
    fixed = PeftModel.from_pretrained(load_model(bases["llama"], "AutoModelForCausalLM"), out)
    assert _loaded_equals(fixed, src)


def test_trainable_tokens_land(bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "tt"
    src = make_adapter(bases["llama"], "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM",
                       trainable_token_indices=[1, 2, 3])
    assert any("trainable_tokens_delta" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    stock = PeftModel.from_pretrained(load_model(bases["llama"], "AutoModelForCausalLM"), adapter)
    assert _loaded_equals(stock, src)
    code, report = cli_json("check", adapter, "--base", bases["llama"])
    assert code == 0, report["findings"]


BROKEN_FIELDS = [
    ("task_type", "FOO", "task_type"),
    ("rank_pattern", ["q_proj"], "rank_pattern"),
    ("rank_pattern", {"q_proj[": 2}, "not a valid regex"),
    ("alpha_pattern", {"q_proj": "x"}, "alpha_pattern"),
    ("target_modules", "((", "not a valid regex"),
    ("target_modules", 5, "target_modules"),
    ("exclude_modules", "((", "not a valid regex"),
    ("layers_to_transform", "0", "layers_to_transform"),
    ("modules_to_save", "lm_head", "modules_to_save"),
    ("lora_alpha", float("inf"), "lora_alpha"),
    ("r", 0, "positive integer"),
]


@pytest.mark.parametrize(("field", "value", "said"), BROKEN_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BROKEN_FIELDS])
def test_broken_config_field_is_one_line_exit_2(field: str, value: object, said: str, bases: dict[str, Path],
                                                causal: tuple[Path, PeftModel]) -> None:
    adapter, _ = causal
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg[field] = value
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    for args in (["inspect", adapter], ["check", adapter, "--base", bases["llama"]]):
        code, out, err = cli(*args)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and "adapter_config.json" in err and said in err
        assert "Traceback" not in err


def test_concrete_class_of_another_model_type(bases: dict[str, Path], causal: tuple[Path, PeftModel]) -> None:
    code, _, err = cli("check", causal[0], "--base", bases["llama"], "--class", "BertModel")
    assert code == 2 and "'bert'" in err and "'llama'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("mapping", [r"^model\.=\9", r"^model\.=\g<x>"])
def test_key_mapping_with_a_bad_replacement(mapping: str, bases: dict[str, Path],
                                            causal: tuple[Path, PeftModel]) -> None:
    code, _, err = cli("check", causal[0], "--base", bases["llama"], "--key-mapping", mapping)
    assert code == 2 and "replacement" in err


def test_output_may_not_replace_an_input(bases: dict[str, Path], causal: tuple[Path, PeftModel],
                                         tmp_path: Path) -> None:
    adapter, _ = causal
    before = snapshot(adapter)
    for out in (adapter, adapter.parent, bases["llama"]):
        code, _, err = cli("fix", adapter, "--base", bases["llama"], "--class", "AutoModel", "-o", out, "--force")
        assert code == 2 and "would replace the input" in err, err
    assert snapshot(adapter) == before
    assert (bases["llama"] / "config.json").exists()


def test_user_mapping_that_lands_nothing_is_reported(bases: dict[str, Path], causal: tuple[Path, PeftModel]) -> None:
    code, report = cli_json("check", causal[0], "--base", bases["llama"], "--key-mapping", r"^model\.=")
    assert code == 1
    dropped = next(f for f in report["findings"] if f["code"] == "dropped-tensors")
    assert "--key-mapping" in dropped["message"]
    assert report["alignment"]["rewrite"]["description"] == r"^model\.="


def test_regex_targets_that_select_nothing(bases: dict[str, Path], tmp_path: Path) -> None:
    """A regex target_modules spelled with the head class's prefix selects nothing on AutoModel: PEFT raises."""
    adapter = tmp_path / "regex"
    src = make_adapter(bases["llama"], "AutoModelForCausalLM", adapter,
                       target_modules=r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)")
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(load_model(bases["llama"], "AutoModel"), adapter)
    code, report = cli_json("check", adapter, "--base", bases["llama"], "--class", "AutoModel")
    assert code == 1 and codes(report, "error") == {"layout-mismatch"}  # the cause; what PEFT raises follows from it
    (nothing,) = [f for f in report["findings"] if f["code"] == "targets-nothing"]
    assert nothing["caused_by"] == "layout-mismatch" and "NoMatchingPeftModuleError" in nothing["message"]
    out = tmp_path / "fixed"
    assert lorafit.fix(adapter, bases["llama"], out, class_name="AutoModel").ok
    fixed = PeftModel.from_pretrained(load_model(bases["llama"], "AutoModel"), out)
    want = {k.replace("base_model.model.model.", "base_model.model."): v
            for k, v in get_peft_model_state_dict(src).items()}
    got = get_peft_model_state_dict(fixed)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_tied_embeddings_quiet_when_trained_tied(bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "tied"
    make_adapter(bases["gpt2"], "AutoModelForCausalLM", adapter, target_modules=["wte", "c_attn"],
                 task_type="CAUSAL_LM", ensure_weight_tying=True)
    code, report = cli_json("check", adapter, "--base", bases["gpt2"])
    assert "tied-embeddings" not in codes(report)


def test_targets_nothing_although_every_key_matches_a_path(bases: dict[str, Path], tmp_path: Path) -> None:
    """Keys that land on module paths do not help when target_modules selects nothing: PEFT injects no layer."""
    from peft.utils.error import NoMatchingPeftModuleError

    adapter = tmp_path / "adapter"
    make_adapter(bases["llama"], "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["nothing_matches"]}))
    with pytest.raises(NoMatchingPeftModuleError):
        PeftModel.from_pretrained(load_model(bases["llama"], "AutoModelForCausalLM"), adapter)
    code, report = cli_json("check", adapter, "--base", bases["llama"])
    assert code == 1 and "targets-nothing" in codes(report, "error")  # before: exit 0, "ok"

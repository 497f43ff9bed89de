"""MoE adapters on transformers v5 fused experts, with stock PEFT as the oracle.

PEFT 0.21 turns gate_proj/up_proj/down_proj on a fused experts module into target_parameters: nested
ParamWrappers saved as `...mlp.experts.lora_A.weight` (the last registered parameter, down_proj) and
`...mlp.experts.base_layer.lora_A.weight` (gate_up_proj), each with r x num_experts rows. lorafit reported
rank-mismatch, shape-mismatch and dropped-tensors where PEFT loads every tensor, fix wrote nothing, and merge
refused. Qwen3-MoE stores experts per expert in its checkpoint (transformers fuses them on load); GPT-OSS
stores them fused and transposed ([experts, in, out]).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from helpers import adapter_tensors, cli, cli_json, codes

QWEN3_MOE = Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
GPT_OSS = GptOssConfig(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, layer_types=["full_attention", "sliding_attention"])


def _make(root: Path, model: torch.nn.Module, dtype: torch.dtype, **lora: object) -> dict[str, Path]:
    torch.manual_seed(0)
    model.to(dtype).save_pretrained(root / "base")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **lora))
    with torch.no_grad():  # trained: B != 0 everywhere
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pm.save_pretrained(root / "adapter")
    return {"base": root / "base", "adapter": root / "adapter"}


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _make(tmp_path_factory.mktemp("qwen3moe"), Qwen3MoeForCausalLM(QWEN3_MOE), torch.bfloat16,
                 target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _make(tmp_path_factory.mktemp("gptoss"), GptOssForCausalLM(GPT_OSS), torch.float32,
                 target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


def _copy(src: Path, dst: Path, **config: object) -> Path:
    """The adapter with some config fields changed (the tensors as saved)."""
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text()) | config
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return dst


def _stock_loaded(adapter: Path, base: Path, auto: type) -> dict[str, torch.Tensor]:
    """What stock PEFT holds after loading, keyed as saved (PEFT's own state-dict view)."""
    from peft import get_peft_model_state_dict

    pm = PeftModel.from_pretrained(auto.from_pretrained(str(base)), str(adapter))
    return dict(get_peft_model_state_dict(pm))


def _merged(out: Path) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    return merged


def test_peft_saves_nested_parameter_wrappers(qwen3_moe: dict[str, Path]) -> None:
    code, report = cli_json("inspect", qwen3_moe["adapter"])
    assert code == 0 and report["adapter"]["coverage"]["by_module"] == {
        "experts[down_proj/gate_up_proj]": "0-1", "q_proj": "0-1", "v_proj": "0-1"}  # not "base_layer"
    cfg = json.loads((qwen3_moe["adapter"] / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["down_proj", "gate_up_proj"] and cfg["rank_pattern"]
    keys = set(adapter_tensors(qwen3_moe["adapter"]))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.experts.lora_B.weight" in keys


@pytest.mark.parametrize("fixture", ["qwen3_moe", "gpt_oss"])
def test_check_and_verify_agree_with_stock_peft(fixture: str, request: pytest.FixtureRequest) -> None:
    paths = request.getfixturevalue(fixture)
    code, report = cli_json("check", paths["adapter"], "--base", paths["base"])
    assert code == 0 and not codes(report), report["findings"]  # before: rank-, shape-mismatch, dropped-tensors
    saved = adapter_tensors(paths["adapter"])
    loaded = _stock_loaded(paths["adapter"], paths["base"], AutoModelForCausalLM)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k].to(loaded[k].dtype)) for k in saved)
    code, report = cli_json("verify", paths["adapter"], "--base", paths["base"])
    assert code == 0 and report["result"]["tensors_bit_equal"] == len(saved), report["findings"]


def test_fix_lands_a_moe_adapter_on_the_bare_backbone(qwen3_moe: dict[str, Path], tmp_path: Path) -> None:
    code, report = cli_json("check", qwen3_moe["adapter"], "--base", qwen3_moe["base"], "--class", "AutoModel")
    assert code == 1 and "layout-mismatch" in codes(report, "error")
    out = tmp_path / "fixed"
    code, _, err = cli("fix", qwen3_moe["adapter"], "--base", qwen3_moe["base"], "--class", "AutoModel", "-o", out)
    assert code == 0, err
    saved = adapter_tensors(qwen3_moe["adapter"])
    loaded = _stock_loaded(out, qwen3_moe["base"], AutoModel)
    assert len(loaded) == len(saved)
    for key, value in saved.items():  # the nested wrapper keeps its place: experts.base_layer stays gate_up_proj
        new = key.replace("base_model.model.model.", "base_model.model.")
        assert torch.equal(loaded[new], value.to(loaded[new].dtype)), new


@pytest.mark.parametrize("fixture", ["qwen3_moe", "gpt_oss"])
def test_merge_is_bit_identical_to_merge_and_unload(fixture: str, request: pytest.FixtureRequest,
                                                    tmp_path: Path) -> None:
    paths = request.getfixturevalue(fixture)
    out = tmp_path / "merged"
    code, _, err = cli("merge", paths["adapter"], "--base", paths["base"], "-o", out)
    assert code == 0, err
    base = AutoModelForCausalLM.from_pretrained(str(paths["base"]))
    PeftModel.from_pretrained(base, str(paths["adapter"])).merge_and_unload().save_pretrained(tmp_path / "peft")
    want, got = _merged(tmp_path / "peft"), _merged(out)
    assert set(got) == set(want)  # Qwen3-MoE: per-expert keys, as the base stores them
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    base_sd = _merged(paths["base"])
    assert sum(not torch.equal(got[k], base_sd[k]) for k in got if "experts" in k) >= 4  # the experts did change
    code, _, err = cli("verify-merge", out, "--base", paths["base"], "--adapter", paths["adapter"])
    assert code == 0, err


def test_verify_merge_catches_one_wrong_expert(qwen3_moe: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert cli("merge", qwen3_moe["adapter"], "--base", qwen3_moe["base"], "-o", out).code == 0
    (shard,) = out.glob("*.safetensors")
    tensors = {k: v.clone() for k, v in load_file(str(shard)).items()}
    key = "model.layers.1.mlp.experts.2.up_proj.weight"  # the second half of expert 2's gate_up_proj
    tensors[key] = load_file(str(qwen3_moe["base"] / "model.safetensors"))[key]  # the adapter left out there
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, report = cli_json("verify-merge", out, "--base", qwen3_moe["base"], "--adapter", qwen3_moe["adapter"])
    assert code == 1
    bad = [t["path"] for t in report["modules"] if not t["ok"]]
    assert bad == [key]


def test_dropout_is_refused_by_peft_and_mended_by_fix(qwen3_moe: dict[str, Path], tmp_path: Path) -> None:
    adapter = _copy(qwen3_moe["adapter"], tmp_path / "dropout", lora_dropout=0.05)
    with pytest.raises(ValueError, match="lora_dropout"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(qwen3_moe["base"])), str(adapter))
    code, report = cli_json("inspect", adapter)
    assert code == 1 and codes(report, "error") == {"parameter-dropout"}
    out = tmp_path / "fixed"
    code, _, err = cli("fix", adapter, "--base", qwen3_moe["base"], "-o", out)
    assert code == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0
    assert len(_stock_loaded(out, qwen3_moe["base"], AutoModelForCausalLM)) == len(adapter_tensors(adapter))


def test_a_wrong_rank_per_expert_is_the_size_mismatch_peft_raises(qwen3_moe: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    adapter = _copy(qwen3_moe["adapter"], tmp_path / "rank", rank_pattern={})  # gate_up_proj was saved at r=8
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(qwen3_moe["base"])), str(adapter))
    code, report = cli_json("check", adapter, "--base", qwen3_moe["base"])
    assert code == 1 and codes(report, "error") == {"rank-mismatch"}
    (finding,) = report["findings"]
    assert "gate_up_proj" in finding["keys"][0] and "4 experts" in finding["keys"][0]


def test_a_first_check_of_a_moe_adapter_imports_nothing_heavy(qwen3_moe: dict[str, Path]) -> None:
    """Qwen3-MoE has a blueprint, and transformers converts its keys on load: the blueprint's conversion patterns
    show that none of this adapter's paths is converted, so neither PEFT, transformers nor torch is needed."""
    from helpers import python

    script = ("import sys, lorafit; r = lorafit.check(sys.argv[1], sys.argv[2]); "
              "print(r.ok, r.target['tree_from'], sorted(m for m in ('torch', 'transformers', 'peft') "
              "if m in sys.modules))")
    out = python(script, qwen3_moe["adapter"], qwen3_moe["base"], env={"LORAFIT_NO_CACHE": "1"}, check=True).out
    assert out.strip() == "True blueprint []"


def test_target_parameters_as_a_string_is_bad_input(qwen3_moe: dict[str, Path], tmp_path: Path) -> None:
    """PEFT takes target_parameters only as a list; read as a string it would be matched letter by letter."""
    from helpers import assert_one_line_error

    adapter = _copy(qwen3_moe["adapter"], tmp_path / "str", target_parameters="gate_up_proj")
    code, out, err = cli("inspect", adapter)
    assert_one_line_error(code, out, err, "adapter_config.json", "target_parameters must be a list of names")

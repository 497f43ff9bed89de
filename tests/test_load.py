"""load_adapter and verify: load through PEFT with proof, on any class; verify any PeftModel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import lorafit
from conftest import load_model, make_adapter, save_base
from helpers import cli_json, codes, hidden
from lorafit.errors import AdapterMismatchError

IDS = torch.tensor([[3, 1, 4, 1, 5]])


@pytest.fixture(scope="module")
def causal(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PeftModel]:
    out = tmp_path_factory.mktemp("load") / "causal"
    return out, make_adapter(bases["llama"], "AutoModelForCausalLM", out, task_type="CAUSAL_LM")


@pytest.mark.parametrize("cls", ["AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"])
def test_load_adapter_any_class(cls: str, bases: dict[str, Path], causal: tuple[Path, PeftModel]) -> None:
    adapter, src = causal
    pm = lorafit.load_adapter(load_model(bases["llama"], cls), adapter)
    assert isinstance(pm, PeftModel)
    assert pm.lorafit_report.ok
    assert pm.lorafit_report.result["tensors_bit_equal"] == pm.lorafit_report.result["tensors_expected"] > 0
    assert torch.equal(hidden(pm, IDS), hidden(src, IDS))


def test_load_adapter_into_existing_peft_model(bases: dict[str, Path], causal: tuple[Path, PeftModel],
                                              tmp_path: Path) -> None:
    adapter, src = causal
    other = tmp_path / "other"
    make_adapter(bases["llama"], "AutoModel", other, seed=9, task_type="FEATURE_EXTRACTION")
    pm = lorafit.load_adapter(load_model(bases["llama"], "AutoModel"), other)
    pm = lorafit.load_adapter(pm, adapter, adapter_name="second")
    assert set(pm.peft_config) == {"default", "second"}
    pm.set_adapter("second")
    assert torch.equal(hidden(pm, IDS), hidden(src, IDS))


def test_strict_raises_on_shape_mismatch(causal: tuple[Path, PeftModel], tmp_path: Path) -> None:
    other = save_base(tmp_path, "llama", intermediate_size=48)
    with pytest.raises(AdapterMismatchError) as err:
        lorafit.load_adapter(load_model(other, "AutoModelForCausalLM"), causal[0])
    assert "down_proj" in str(err.value)


def test_verify_catches_stock_peft_zeros(bases: dict[str, Path], causal: tuple[Path, PeftModel],
                                         tmp_path: Path) -> None:
    """task_type null + AutoModel: stock PEFT loads with every lora_B at zero; verify says so."""
    nulled = tmp_path / "nulled"
    shutil.copytree(causal[0], nulled)
    cfg = json.loads((nulled / "adapter_config.json").read_text())
    (nulled / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": None}))
    stock = PeftModel.from_pretrained(load_model(bases["llama"], "AutoModel"), nulled)
    report = lorafit.verify(stock, nulled)
    assert not report.ok
    assert {"not-bit-equal"} <= set(report.codes())


def test_verify_catches_meta_tensors(bases: dict[str, Path], causal: tuple[Path, PeftModel], tmp_path: Path) -> None:
    nulled = tmp_path / "nulled"
    shutil.copytree(causal[0], nulled)
    cfg = json.loads((nulled / "adapter_config.json").read_text())
    (nulled / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": None}))
    stock = PeftModel.from_pretrained(load_model(bases["llama"], "AutoModel"), nulled, low_cpu_mem_usage=True)
    assert any(p.device.type == "meta" for p in stock.parameters())
    report = lorafit.verify(stock, nulled)
    assert "meta-tensors" in report.codes()


def test_verify_catches_tampering_and_probe(bases: dict[str, Path], causal: tuple[Path, PeftModel]) -> None:
    adapter, _ = causal
    pm = PeftModel.from_pretrained(load_model(bases["llama"], "AutoModelForCausalLM"), adapter)
    assert lorafit.verify(pm, adapter, probe=True).ok
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] += 1e-6
    report = lorafit.verify(pm, adapter)
    assert report.codes() == ["not-bit-equal"]
    assert report.findings[0].keys == ["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    layer.scaling["default"] = 0.0  # the adapter is present but contributes nothing
    probed = lorafit.verify(pm, adapter, probe=True)
    dead = next(f for f in probed.findings if f.code == "no-output-change")
    assert dead.keys == ["model.layers.1.self_attn.v_proj"]


def test_cli_verify_stock_and_lorafit_load(bases: dict[str, Path], causal: tuple[Path, PeftModel]) -> None:
    code, report = cli_json("verify", causal[0], "--base", bases["llama"], "--class", "AutoModel")
    assert code == 1 and codes(report) == {"load-failed"}
    code, report = cli_json("verify", causal[0], "--base", bases["llama"], "--class", "AutoModel",
                            "--lorafit-load", "--probe")
    assert code == 0 and report["ok"]

"""Base class <-> head class, both directions, on Llama, GPT-2 and BERT, with real PEFT as the oracle.

For each pair: check flags the mismatch (exit 1), fix writes an adapter that stock PEFT loads on the
other class with every LoRA tensor bit-equal, and the shared backbone's hidden states equal those of the
original adapter on its own class. Clean pairs exit 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from conftest import load_model, make_adapter
from helpers import adapter_tensors, backbone, cli, cli_json, codes, hidden, snapshot

# (family, class trained on, task_type, class loaded with, prefix in the trained layout, prefix in the target)
PAIRS = [
    ("llama", "AutoModelForCausalLM", "CAUSAL_LM", "AutoModel", "model.", ""),
    ("llama", "AutoModel", "FEATURE_EXTRACTION", "AutoModelForCausalLM", "", "model."),
    ("gpt2", "AutoModelForCausalLM", "CAUSAL_LM", "AutoModel", "transformer.", ""),
    ("gpt2", "AutoModel", None, "AutoModelForCausalLM", "", "transformer."),
    ("bert", "AutoModelForSequenceClassification", None, "AutoModel", "bert.", ""),
    ("opt", "AutoModelForCausalLM", "CAUSAL_LM", "AutoModel", "model.", ""),
    ("opt", "AutoModel", None, "AutoModelForCausalLM", "", "model."),
    ("bert", "AutoModel", "FEATURE_EXTRACTION", "AutoModelForTokenClassification", "", "bert."),
]
IDS = torch.tensor([[1, 5, 9, 13, 2, 7]])


@pytest.fixture(scope="module")
def trained(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("pairs")
    out = {}
    for i, (family, src, task, *_rest) in enumerate(PAIRS):
        pm = make_adapter(bases[family], src, root / f"adapter-{i}", seed=i + 1, task_type=task)
        out[i] = (root / f"adapter-{i}", pm)
    return out


def _peft_missing_and_unexpected(base: Path, cls: str, adapter: Path) -> tuple[set[str], set[str]]:
    """What stock PEFT itself reports when this adapter is put on `cls` (missing/unexpected LoRA modules)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    allowed = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in cfg.items() if k in allowed and k not in ("task_type", "peft_type")})
    pm = get_peft_model(load_model(base, cls), config)
    result = set_peft_model_state_dict(pm, adapter_tensors(adapter))

    def module(k: str) -> str:
        k = k.removeprefix("base_model.model.")
        return k.split(".lora_")[0]

    missing = {module(k) for k in result.missing_keys if ".lora_" in k}
    return missing, set(result.unexpected_keys)


@pytest.mark.parametrize("i", range(len(PAIRS)), ids=[f"{p[0]}:{p[1]}->{p[3]}" for p in PAIRS])
def test_pair(i: int, bases: dict[str, Path], trained: dict[int, tuple[Path, object]], tmp_path: Path) -> None:
    family, src_cls, _task, dst_cls, src_prefix, dst_prefix = PAIRS[i]
    base = bases[family]
    adapter, src_pm = trained[i]
    before = snapshot(adapter)

    # check flags the mismatch, and its missing list is exactly what PEFT itself leaves at init.
    code, report = cli_json("check", adapter, "--base", base, "--class", dst_cls)
    assert code == 1
    assert "layout-mismatch" in codes(report, "error")
    assert report["alignment"]["rewrite"]["from"] == src_prefix
    assert report["alignment"]["rewrite"]["to"] == dst_prefix
    peft_missing, _ = _peft_missing_and_unexpected(base, dst_cls, adapter)
    ours = next(f for f in report["findings"] if f["code"] == "missing-adapter-weights")
    assert ours["count"] == len(peft_missing) > 0
    assert set(ours["keys"]) <= peft_missing

    # fix writes an adapter stock PEFT loads completely on the other class.
    out = tmp_path / "fixed"
    code, _, err = cli("fix", adapter, "--base", base, "--class", dst_cls, "-o", out)
    assert code == 0, err
    assert snapshot(adapter) == before, "fix must never modify its input"
    peft_missing, peft_unexpected = _peft_missing_and_unexpected(base, dst_cls, out)
    assert peft_missing == set() and peft_unexpected == set()

    loaded = PeftModel.from_pretrained(load_model(base, dst_cls), out).eval()
    got = get_peft_model_state_dict(loaded)
    source = adapter_tensors(adapter)
    assert len(got) == len(source)
    for key, tensor in source.items():
        body = key.removeprefix("base_model.model.").removeprefix(src_prefix)
        new_key = f"base_model.model.{dst_prefix}{body}"
        assert torch.equal(got[new_key], tensor), new_key

    # The backbone computes exactly what the original adapter computes on its own class.
    assert torch.equal(hidden(loaded, IDS), hidden(src_pm, IDS))
    assert not torch.equal(hidden(loaded, IDS), hidden(load_model(base, dst_cls), IDS))


@pytest.mark.parametrize("i", range(len(PAIRS)), ids=[f"{p[0]}:{p[1]}" for p in PAIRS])
def test_clean_pair_exits_zero(i: int, bases: dict[str, Path], trained: dict[int, tuple[Path, object]]) -> None:
    family, src_cls, *_ = PAIRS[i]
    adapter, _ = trained[i]
    code, report = cli_json("check", adapter, "--base", bases[family], "--class", src_cls)
    assert code == 0, report["findings"]
    assert report["ok"] is True
    assert codes(report, "error") == set()
    assert report["alignment"]["lands_as_is"] == report["alignment"]["total"]


def test_backbone_helper_finds_shared_body(bases: dict[str, Path]) -> None:
    # Guards the oracle above: the helper must return the body, not the head model.
    m = load_model(bases["llama"], "AutoModelForCausalLM")
    assert type(backbone(m)).__name__ == "LlamaModel"

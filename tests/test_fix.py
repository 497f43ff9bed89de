"""fix writes atomically, never touches its input, refuses to overwrite, and records provenance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

import lorafit
import lorafit.formats.peft.writer
from conftest import make_adapter
from helpers import cli, snapshot


@pytest.fixture()
def adapter(bases: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "adapter"
    make_adapter(bases["llama"], "AutoModelForCausalLM", out, task_type="CAUSAL_LM")
    return out


def test_provenance_and_config(adapter: Path, bases: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = lorafit.fix(adapter, bases["llama"], out, class_name="AutoModel")
    assert report.ok and report.result["written"] is True
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["lorafit.rewrite"] == "strip prefix 'model.'"
    assert meta["lorafit.target_class"] == "LlamaModel"
    assert meta["lorafit.source_sha256"] == hashlib.sha256(
        (adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "FEATURE_EXTRACTION"
    assert "fixed" in report.codes()


def test_refuses_to_overwrite_without_force(adapter: Path, bases: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("fix", adapter, "--base", bases["llama"], "--class", "AutoModel", "-o", out)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"
    code, _, _ = cli("fix", adapter, "--base", bases["llama"], "--class", "AutoModel", "-o", out, "--force")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()


def test_interrupted_fix_leaves_nothing(adapter: Path, bases: dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the tensors are written but before the config: no OUT, no temp dir, input intact."""
    before = snapshot(adapter)

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lorafit.formats.peft.writer, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lorafit.fix(adapter, bases["llama"], tmp_path / "out", class_name="AutoModel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert snapshot(adapter) == before


def test_already_landing_adapter_is_copied(adapter: Path, bases: dict[str, Path], tmp_path: Path) -> None:
    report = lorafit.fix(adapter, bases["llama"], tmp_path / "copy")
    assert report.ok
    fixed = next(f for f in report.findings if f.code == "fixed")
    assert "already landed" in fixed.message

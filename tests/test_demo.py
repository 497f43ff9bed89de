"""`lorafit demo` tells the whole story and checks each step of it."""

from __future__ import annotations

from pathlib import Path

from helpers import cli


def test_demo_runs_and_keeps_files(tmp_path: Path) -> None:
    code, out, err = cli("demo", "--keep", tmp_path / "demo")
    assert code == 0, out + err
    assert "demo OK" in out
    assert "AttributeError" in out  # stock PEFT on AutoModel
    assert "layout-mismatch" in out  # check names the cause
    assert "hidden states equal the trained adapter's on its own class: True" in out
    fixed = tmp_path / "demo" / "counting-lora-automodel"
    assert (fixed / "adapter_model.safetensors").exists() and (fixed / "adapter_config.json").exists()
    assert not [line for line in out.splitlines() if line != line.rstrip()]  # reads cleanly in a log
    assert "s with start-up and imports" in out.splitlines()[-1]


def test_demo_in_a_machine_format_prints_its_diagnosis(tmp_path: Path) -> None:
    import json

    code, out, err = cli("demo", "--format", "json")
    assert code == 0, err
    report = json.loads(out)  # nothing but the document on stdout
    assert report["command"] == "check" and not report["ok"]
    assert [f["code"] for f in report["findings"] if f["severity"] == "error"] == ["layout-mismatch"]

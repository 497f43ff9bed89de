"""Integrity manifests: fix, merge and convert write SHA-256 sums of their outputs, inspect --manifest writes an
adapter's, and verify-files finds any file changed, missing or added since."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import make_adapter
from helpers import assert_one_line_error, cli, cli_json, snapshot

CAUSAL = "AutoModelForCausalLM"


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_fix_output_carries_a_manifest_that_verify_files_checks(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], "AutoModel", tmp_path / "a")
    assert cli("fix", tmp_path / "a", "--class", CAUSAL, "-o", tmp_path / "f").code == 0
    manifest = json.loads((tmp_path / "f" / "lorafit-manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in (tmp_path / "f").iterdir()
                                               if p.name != "lorafit-manifest.json")
    code, report = cli_json("verify-files", tmp_path / "f")
    assert code == 0 and [f["code"] for f in report["findings"]] == ["files-verified"]
    (tmp_path / "f" / "notes.txt").write_text("added later")
    code, report = cli_json("verify-files", tmp_path / "f")
    assert code == 0 and {f["code"] for f in report["findings"]} == {"file-unlisted", "files-verified"}
    _flip_a_byte(tmp_path / "f" / "adapter_model.safetensors")
    (tmp_path / "f" / "README.md").unlink()
    code, report = cli_json("verify-files", tmp_path / "f")
    by_code = {f["code"]: f["keys"] for f in report["findings"]}
    assert code == 1 and by_code["file-changed"] == ["adapter_model.safetensors"]
    assert by_code["file-missing"] == ["README.md"]


def test_merge_and_convert_outputs_carry_manifests(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], CAUSAL, tmp_path / "a")
    assert cli("merge", tmp_path / "a", "-o", tmp_path / "m").code == 0
    assert cli("verify-files", tmp_path / "m").code == 0
    assert cli("convert", tmp_path / "a", "--to", "mlx", "-o", tmp_path / "x").code == 0
    assert cli("verify-files", tmp_path / "x").code == 0


def test_inspect_writes_an_adapters_manifest_outside_it(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], CAUSAL, tmp_path / "a")
    before = snapshot(tmp_path / "a")
    code, report = cli_json("inspect", tmp_path / "a", "--manifest", tmp_path / "a.sha256.json")
    assert code == 0 and report["result"]["manifest"] == str(tmp_path / "a.sha256.json")
    assert snapshot(tmp_path / "a") == before
    assert cli("verify-files", tmp_path / "a", "--manifest", tmp_path / "a.sha256.json").code == 0
    config = tmp_path / "a" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 4', '"r": 8'))
    code, report = cli_json("verify-files", tmp_path / "a", "--manifest", tmp_path / "a.sha256.json")
    assert code == 1 and report["findings"][0]["keys"] == ["adapter_config.json"]
    code, out, err = cli("inspect", tmp_path / "a", "--manifest", tmp_path / "a" / "m.json")
    assert_one_line_error(code, out, err, "inside the input")


def test_bad_manifests(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert_one_line_error(*cli("verify-files", tmp_path / "d"), "no manifest here")
    (tmp_path / "m.json").write_text('{"files": []}')
    assert_one_line_error(*cli("verify-files", tmp_path / "d", "--manifest", tmp_path / "m.json"),
                          "m.json", "is not a lorafit manifest")
    assert_one_line_error(*cli("verify-files", tmp_path / "nope"), "is not a directory")

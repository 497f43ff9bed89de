"""--format sarif against the SARIF 2.1.0 schema (as Microsoft's SARIF multitool ships it) and the multitool's own
validator: a log GitHub code scanning and other SARIF consumers accept. make test-clients installs the tool."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest

from conftest import make_adapter
from helpers import cli

TOOL = Path(os.environ.get("LORAFIT_SARIF_TOOL", "build/sarif/node_modules/@microsoft/sarif-multitool-linux"))


@pytest.fixture(scope="module")
def logs(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """SARIF logs of a check with errors, a runtime check with a warning-free error set, and a clean inspect."""
    root = tmp_path_factory.mktemp("sarif")
    make_adapter(bases["llama"], "AutoModel", root / "a", use_rslora=True)
    runs = {"check": ["check", root / "a", "--class", "AutoModelForCausalLM"],
            "runtimes": ["check", root / "a", "--runtime", "vllm,llama.cpp", "--base", bases["llama"]],
            "inspect": ["inspect", root / "a"]}
    out = []
    for name, args in runs.items():
        code, text, err = cli(*args, "--format", "sarif")
        assert code in (0, 1), err
        (root / f"{name}.sarif").write_text(text)
        out.append(root / f"{name}.sarif")
    return out


def test_every_log_is_valid_against_the_sarif_schema(logs: list[Path]) -> None:
    schema = json.loads((TOOL / "sarif-2.1.0.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for log in logs:
        found = validator.iter_errors(json.loads(log.read_text()))
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in found]
        assert errors == [], (log.name, errors)
    broken = json.loads(logs[0].read_text()) | {"version": "2.0"}  # the check can fail
    assert list(validator.iter_errors(broken))


def test_the_multitool_finds_no_error(logs: list[Path], tmp_path: Path) -> None:
    for log in logs:
        out = tmp_path / f"{log.stem}.validation.sarif"
        done = subprocess.run([str(TOOL / "Sarif.Multitool"), "validate", str(log), "--output", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        results = json.loads(out.read_text())["runs"][0]["results"]
        assert [r for r in results if r.get("level") == "error"] == [], (log.name, results)

"""The CLI as a user meets it: --help, fast start-up, the JSON schema, the documented catalog."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import make_adapter
from helpers import cli, cli_json, python
from lorafit.findings import CATALOG

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["inspect", "check", "fix", "verify", "merge", "verify-merge", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_each_command(command: str) -> None:
    code, out, _ = cli(command, "--help")
    assert code == 0
    assert "Usage:" in out and command in out
    if command in ("check", "fix"):
        assert "--class" in out and "--base" in out and "--json" in out
    if command in ("check", "fix", "merge"):  # where the module tree comes from, and how to force the meta build
        assert "tree_from" in out and "LORAFIT_NO_BLUEPRINTS=1" in out


def test_version_names_the_libraries() -> None:
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("lorafit ") and "peft" in out and "transformers" in out


def test_usage_error_exits_2() -> None:
    code, _, _ = cli("check")
    assert code == 2
    code, _, _ = cli("no-such-command")
    assert code == 2


def test_cli_import_is_light(cold_start: dict[str, Any]) -> None:
    """A fresh Python that imports lorafit.cli has not imported torch, transformers or peft (the same fresh Python
    then checks through a blueprint for test_blueprint: see conftest.cold_start)."""
    assert cold_start["cli_imports"] == "[]"


def test_warm_check_imports_no_torch(bases: dict[str, Path], tmp_path: Path) -> None:
    """The module tree is cached: a repeated check needs neither torch nor transformers (blueprints off, so
    that the first check builds the tree on the meta device; test_blueprint covers the blueprint path)."""
    adapter = tmp_path / "a"
    make_adapter(bases["llama"], "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM")
    env = {"LORAFIT_CACHE": str(tmp_path / "cache"), "LORAFIT_NO_BLUEPRINTS": "1"}
    script = (f"import sys; from lorafit.api.check import check; r = check({str(adapter)!r}, {str(bases['llama'])!r}, "
              "'AutoModel'); print(r.ok, [f.code for f in r.findings if f.severity == 'error'][:1], "
              "r.target['tree_from'], 'torch' in sys.modules)")
    cold = python(script, env=env, check=True).out.strip()
    warm = python(script, env=env, check=True).out.strip()
    verdict_cold, torch_cold = cold.rsplit(" ", 1)
    verdict_warm, torch_warm = warm.rsplit(" ", 1)
    assert verdict_cold == "False ['layout-mismatch'] meta" and verdict_warm == "False ['layout-mismatch'] cache"
    assert (torch_cold, torch_warm) == ("True", "False")


def test_json_schema_is_stable(bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    make_adapter(bases["gpt2"], "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM")
    code, report = cli_json("check", adapter, "--base", bases["gpt2"], "--class", "AutoModel")
    assert code == 1
    assert report["schema"] == "lorafit.report/1"
    assert set(report) >= {"ok", "findings", "counts", "adapter", "target", "alignment", "command"}
    assert report["ok"] is False and report["counts"]["error"] >= 1
    for f in report["findings"]:
        assert {"code", "severity", "message", "keys", "count", "hint"} <= set(f) <= {
            "code", "severity", "message", "keys", "count", "hint", "caused_by", "runtime", "source", "effect"}
        assert f["count"] == len(f["keys"]) or not f["keys"]
        assert f["severity"] in ("error", "warning", "info")
        assert f["code"] in CATALOG
    documented = (ROOT / "docs" / "json-schema.md").read_text()
    for field in ("ok", "findings", "counts", "alignment", "lands_as_is", "rewrite"):
        assert f"`{field}`" in documented


def test_every_finding_code_is_documented() -> None:
    doc = (ROOT / "docs" / "findings.md").read_text()
    documented = set(re.findall(r"^### `([a-z0-9-]+)`", doc, flags=re.M))
    assert documented == set(CATALOG)


def test_readme_opens_with_the_two_commands() -> None:
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:10])
    assert "make demo" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_json_is_pure_stdout(bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    make_adapter(bases["bert"], "AutoModelForSequenceClassification", adapter)
    code, out, _ = cli("inspect", adapter, "--json")
    assert code == 0
    assert json.loads(out)["command"] == "inspect"


def test_api_names_survive_submodule_imports() -> None:
    """A submodule named like an API function would replace it on import (lorafit.fix -> module)."""
    out = python("import importlib, pkgutil, lorafit; "
                 "[importlib.import_module(f'lorafit.{m.name}') for m in pkgutil.iter_modules(lorafit.__path__)]; "
                 "print(all(callable(getattr(lorafit, n)) for n in lorafit.__all__ if n != '__version__'))",
                 check=True).out.strip()
    assert out == "True"


def test_short_help_and_python_dash_m() -> None:
    for args in (["-h"], ["check", "-h"], ["merge", "-h"]):
        code, out, _ = cli(*args)
        assert code == 0 and "Usage:" in out and "--help" in out, (args, out)
    done = subprocess.run([sys.executable, "-m", "lorafit", "check", "-h"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "Usage: python -m lorafit check" in done.stdout, done.stderr

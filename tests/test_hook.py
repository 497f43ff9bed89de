"""The pre-commit hook: `lorafit-hook check|inspect [OPTIONS] FILE...` runs lorafit once per adapter directory among
the adapter_config.json files a commit touches, and exits with the worst code. .pre-commit-hooks.yaml names it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from conftest import make_adapter

ROOT = Path(__file__).resolve().parents[1]
HOOK = Path(sys.executable).parent / "lorafit-hook"


def _hook(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HOOK), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_one_run_per_adapter_and_the_worst_exit_code(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "good")
    make_adapter(bases["llama"], "AutoModel", tmp_path / "other-class")
    files = [tmp_path / "good" / "adapter_config.json", tmp_path / "other-class" / "adapter_config.json",
             tmp_path / "good" / "adapter_config.json"]
    done = _hook("check", "--class", "AutoModelForCausalLM", *files)
    assert done.returncode == 1, done.stdout + done.stderr
    runs = [line for line in done.stdout.splitlines() if line.startswith("lorafit check ")]
    assert runs == [f"lorafit check {tmp_path / 'good'}", f"lorafit check {tmp_path / 'other-class'}"]
    assert _hook("check", "--class", "AutoModelForCausalLM", files[0]).returncode == 0
    assert _hook("inspect", *files).returncode == 0


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    done = _hook("merge", tmp_path / "adapter_config.json")
    assert done.returncode == 2 and done.stderr.startswith("lorafit-hook: error: usage")
    (tmp_path / "a").mkdir()
    done = _hook("check", "--bogus", tmp_path / "a" / "adapter_config.json")
    assert done.returncode == 2 and "No such option: --bogus" in done.stderr


def test_pre_commit_hooks_name_installed_commands() -> None:
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    scripts = {line.split("=")[0].strip() for line in (ROOT / "pyproject.toml").read_text().split(
        "[project.scripts]")[1].split("[")[0].strip().splitlines()}
    assert {h["id"] for h in hooks} == {"lorafit-check", "lorafit-inspect"}
    for h in hooks:
        assert h["entry"].split()[0] in scripts and h["entry"].split()[1] in ("check", "inspect")
        assert h["files"] == r"(^|/)adapter_config\.json$" and h["language"] == "python"


def test_the_workflow_example_gates_on_github_annotations() -> None:
    workflow = yaml.safe_load((ROOT / "docs" / "examples" / "lorafit-check.yml").read_text())
    steps = workflow["jobs"]["adapters"]["steps"]
    check = next(s["run"] for s in steps if s.get("name") == "Check every adapter")
    assert "lorafit check" in check and "--format github" in check and "exit $status" in check

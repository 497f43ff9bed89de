"""Shared test helpers: run the CLI in-process, read PEFT's own view of a loaded adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafit.cli import app


def cli(*args: str) -> tuple[int, str, str]:
    """Run `lorafit ARGS` in-process; returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def cli_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = cli(*args, "--json")
    return code, json.loads(out)


def codes(report_json: dict[str, Any], severity: str | None = None) -> set[str]:
    return {f["code"] for f in report_json["findings"] if severity is None or f["severity"] == severity}


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def backbone(model: Any) -> Any:
    """The shared transformer body of any head class (LlamaModel inside LlamaForCausalLM, and so on)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(m, m.base_model_prefix, m)


def hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone(model)(input_ids=ids).last_hidden_state


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file below `path` with its bytes: to prove an input was not modified."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


LORAFIT = Path(sys.executable).with_name("lorafit")


def assert_one_line_error(code: int, out: str, err: str, *must_contain: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr naming what it must, no traceback, no catch-all."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err and "please report it" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafit: error: "), err
    for text in must_contain:
        assert text in lines[0], (text, lines[0])


def run_lorafit(*args: object, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the installed `lorafit` in a child process (for hangs, signals and races), with a time limit."""
    return subprocess.run([str(LORAFIT), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)

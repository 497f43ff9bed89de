"""Shared test helpers, each defined once: the one way to run the `lorafit` CLI (in-process or as a real process),
a fresh Python, the one-line-error assertion, finding codes, snapshots of input directories, and PEFT's own view
of a loaded adapter."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafit.cli import app

LORAFIT = Path(sys.executable).with_name("lorafit")  # the installed console script
# What `hook` runs after its own source: the CLI's entry point, with the arguments given to the child.
_CLI_MAIN = "import sys\nfrom lorafit.cli import main\nsys.argv = ['lorafit', *sys.argv[1:]]\nmain()\n"


# ----------------------------------------------------------------------------- running lorafit


@dataclass(frozen=True)
class Run:
    """One run of the CLI or of a Python: unpacks (and indexes) as (exit code, stdout, stderr)."""

    code: int  # a child killed by a signal: minus the signal number
    out: str
    err: str
    output: str = ""  # stdout and stderr as a terminal shows them (in-process: interleaved; a child: out + err)
    exception: BaseException | None = None  # in-process with catch=True: what escaped the CLI (never SystemExit)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.code, self.out, self.err))

    def __getitem__(self, i: int) -> Any:
        return tuple(self)[i]


def cli(*args: object, process: bool = False, hook: str | None = None, env: Mapping[str, str | None] | None = None,
        catch: bool = False, timeout: float = 120, **popen: Any) -> Run:
    """Run `lorafit ARGS`; the one runner of every test.

    In-process by default (typer's CliRunner over lorafit.cli.app, stdout and stderr apart): an exception that
    escapes the CLI is raised, or with catch=True returned in Run.exception.
    process=True runs the installed console script in a child process, for what needs a real one: signals, a pty,
    rlimits, the environment it inherits, cold imports, hangs. hook=SOURCE runs the CLI in a child Python after
    SOURCE (dedented) has run, to patch lorafit's internals first. A child has `timeout` seconds and /dev/null as
    stdin unless given; other keywords (stdin, preexec_fn, ...) go to subprocess.run.
    env: variables set on top of os.environ (a value of None unsets one), in both modes.
    """
    argv = [str(a) for a in args]
    if hook is not None:
        return python(textwrap.dedent(hook) + "\n" + _CLI_MAIN, *argv, env=env, timeout=timeout, **popen)
    if process:
        return _child([str(LORAFIT), *argv], env, timeout, popen)
    if popen:
        raise TypeError(f"{sorted(popen)} need a child process: pass process=True")
    result = CliRunner().invoke(app, argv, env=env)
    # A SystemExit is how typer exits; any other exception escaped the CLI's error handling.
    escaped = None if isinstance(result.exception, SystemExit) else result.exception
    if escaped is not None and not catch:
        raise escaped
    return Run(result.exit_code, result.stdout, result.stderr, result.output, escaped)


def cli_json(*args: object) -> tuple[int, dict[str, Any]]:
    """`lorafit ARGS --json` in-process: (exit code, the report)."""
    code, out, _ = cli(*args, "--json")
    return code, json.loads(out)


def python(code: str, *args: object, env: Mapping[str, str | None] | None = None, timeout: float | None = None,
           check: bool = False, **popen: Any) -> Run:
    """`python -c CODE ARGS` in a fresh interpreter of this venv: cold imports, the process environment.
    check=True: the exit code must be 0."""
    done = _child([sys.executable, "-c", code, *map(str, args)], env, timeout, popen)
    if check:
        assert done.code == 0, (done.code, done.err)
    return done


def _child(argv: list[str], env: Mapping[str, str | None] | None, timeout: float | None,
           popen: dict[str, Any]) -> Run:
    environ = None if env is None else {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=environ,
                          **{"stdin": subprocess.DEVNULL, **popen})
    return Run(done.returncode, done.stdout, done.stderr, done.stdout + done.stderr)


# ----------------------------------------------------------------------------- what a run says


def assert_one_line_error(code: int, out: str, err: str, *must_contain: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr ("lorafit: error: ...") containing each of `must_contain`;
    no traceback and no "please report it" catch-all."""
    assert code == 2, (code, out, err)
    assert out == "", (out, err)
    assert "Traceback" not in out + err and "please report it" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafit: error: "), err
    for text in must_contain:
        assert text in lines[0], (text, lines[0])


def codes(report: Any, severity: str | None = None) -> set[str]:
    """The finding codes of a report (a Report, or its JSON as a dict), those of one severity if given."""
    if isinstance(report, Mapping):
        found = [(f["code"], f["severity"]) for f in report["findings"]]
    else:
        found = [(f.code, f.severity) for f in report.findings]
    return {code for code, sev in found if severity is None or sev == severity}


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[Any, ...]]:
    """Every entry below `root` but `skip`, to prove that nothing there was modified, added or removed: files with
    their mode and bytes; links with their target (and its bytes if it is a file); directories and special files
    with their type and mode. A FIFO or a device is never opened."""
    snap: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                try:
                    target = p.read_bytes() if stat.S_ISREG(os.stat(p).st_mode) else None
                except OSError:  # dangling, a loop, or unreadable
                    target = None
                snap[str(p.relative_to(root))] = ("link", os.readlink(p), target)
            elif stat.S_ISREG(st.st_mode):
                snap[str(p.relative_to(root))] = ("file", mode, p.read_bytes())
            else:
                snap[str(p.relative_to(root))] = ("other", stat.S_IFMT(st.st_mode), mode)
    return snap


# ----------------------------------------------------------------------------- PEFT's view of a model


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def backbone(model: Any) -> Any:
    """The shared transformer body of any head class (LlamaModel inside LlamaForCausalLM, and so on)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(m, m.base_model_prefix, m)


def hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone(model)(input_ids=ids).last_hidden_state

"""Output that survives any terminal, log or pipe: one-line usage errors, JSON on exit 2, commands in hints never
split, no trailing spaces, counts that agree in number, -q/-v/--no-color, and the CI formats (github, sarif)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import make_adapter
from helpers import assert_one_line_error, cli, cli_json

CAUSAL = "AutoModelForCausalLM"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def automodel(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained on AutoModel: on the causal LM it gives three error findings and a fix command."""
    out = tmp_path_factory.mktemp("out") / "a-with-a-long-name-so-that-the-fix-command-is-longer-than-eighty-columns"
    make_adapter(bases["llama"], "AutoModel", out)
    return out


@pytest.mark.parametrize(("args", "expected"), [
    (["check"], "Missing argument"),
    (["check", "x", "--bogus"], "No such option: --bogus"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["merge", "x", "--base", "y", "-o", "z", "--workers", "0"], "--workers"),
])
def test_a_usage_error_is_one_line(args: list[str], expected: str) -> None:
    code, out, err = cli(*args)
    assert_one_line_error(code, out, err, expected, "-h")


def test_bad_input_with_json_prints_json_too(tmp_path: Path) -> None:
    for args in (["--json"], ["--format", "json"]):
        code, out, err = cli("inspect", tmp_path / "missing", *args)
        assert code == 2 and err.startswith("lorafit: error: ") and len(err.strip().splitlines()) == 1
        doc = json.loads(out)
        assert doc["ok"] is False and doc["exit_code"] == 2 and doc["command"] == "inspect"
        assert doc["error"]["type"] == "AdapterNotFoundError" and doc["error"]["path"] == str(tmp_path / "missing")


def _check(automodel: Path, bases: dict[str, Path], *extra: str, env: dict[str, str] | None = None) -> Any:
    return cli(*extra, "check", automodel, "--base", bases["llama"], "--class", CAUSAL,
               env={"COLUMNS": "80", **(env or {})})


def test_at_80_columns_the_fix_command_stands_alone_and_nothing_trails(automodel: Path,
                                                                        bases: dict[str, Path]) -> None:
    code, out, _ = _check(automodel, bases)
    assert code == 1
    lines = out.splitlines()
    command = next(line for line in lines if line.startswith("lorafit fix "))
    assert len(command) > 80  # longer than the terminal, still one line: it can be pasted
    assert lines[lines.index(command) - 1].strip() == "fix:"
    assert not [line for line in lines if line != line.rstrip()]  # no trailing spaces anywhere
    findings = [i for i, line in enumerate(lines) if re.match(r"^(error|warning|info) ", line)]
    for start, end in zip(findings, findings[1:] + [len(lines) - 1], strict=True):
        body = [line for line in lines[start + 1:end] if not line.startswith("lorafit fix ")]
        assert all(line.startswith(" " * 10) for line in body if line.strip() != "fix:"), body  # wrapped lines
    assert lines[-1] == "check: FAIL (1 error finding)"


def test_one_error_is_one_error_finding(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], CAUSAL, tmp_path / "a", use_dora=True)
    code, out, _ = cli("check", tmp_path / "a", "--runtime", "vllm")
    assert code == 1 and out.splitlines()[-1] == "check: FAIL (1 error finding)"


def test_quiet_verbose_and_no_color(automodel: Path, bases: dict[str, Path]) -> None:
    _, normal, _ = _check(automodel, bases)
    _, quiet, _ = _check(automodel, bases, "-q")
    _, verbose, _ = _check(automodel, bases, "--verbose")
    assert normal.startswith("adapter ") and not quiet.startswith("adapter ") and "error   layout-mismatch" in quiet
    assert normal.count("e.g. ") == 9 and verbose.count("e.g. ") == 18  # 3 of each finding, or all 6
    colored = _check(automodel, bases, env={"FORCE_COLOR": "1", "TERM": "xterm-256color"}).out
    plain = _check(automodel, bases, "--no-color", env={"FORCE_COLOR": "1", "TERM": "xterm-256color"}).out
    no_color = _check(automodel, bases, env={"FORCE_COLOR": "1", "NO_COLOR": "1"}).out
    assert ANSI.search(colored) and not ANSI.search(plain) and not ANSI.search(no_color)
    assert ANSI.sub("", colored) == plain


def test_inspect_reads_at_80_columns_and_piped(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], CAUSAL, tmp_path / "a", rank_pattern={"down_proj": 8})
    code, out, _ = cli("inspect", tmp_path / "a", env={"COLUMNS": "80"})
    assert code == 0 and "│" not in out
    rows = out.split("modules\n", 1)[1].split("runtimes", 1)[0].strip().splitlines()
    assert rows == ["model.layers.*.mlp.down_proj [0-1] linear r=8 alpha=8.0 scaling=1.0 32->16 F32 ok",
                    "model.layers.*.self_attn.q_proj [0-1] linear r=4 alpha=8.0 scaling=2.0 16->16 F32 ok",
                    "model.layers.*.self_attn.v_proj [0-1] linear r=4 alpha=8.0 scaling=2.0 16->8 F32 ok"]


def test_github_annotations(automodel: Path, bases: dict[str, Path]) -> None:
    code, out, _ = cli("check", automodel, "--base", bases["llama"], "--class", CAUSAL, "--format", "github")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 3
    config = automodel / "adapter_config.json"
    assert lines[0].startswith(f"::error title=lorafit (layout-mismatch),file={config},line=1,col=1::{config}: "
                               "layout-mismatch ")
    assert "(fix: lorafit fix " in lines[0]


def test_sarif(automodel: Path, bases: dict[str, Path]) -> None:
    code, out, _ = cli("check", automodel, "--base", bases["llama"], "--class", CAUSAL, "-f", "sarif")
    assert code == 1
    log = json.loads(out)
    assert log["version"] == "2.1.0"
    run = log["runs"][0]
    rules = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert rules == ["layout-mismatch", "dropped-tensors", "missing-adapter-weights"]
    assert [(r["ruleId"], r["ruleIndex"], r["level"]) for r in run["results"]] == [
        ("layout-mismatch", 0, "error"), ("dropped-tensors", 1, "warning"), ("missing-adapter-weights", 2, "warning")]
    uri = run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == (automodel / "adapter_config.json").resolve().as_uri()


def test_every_command_takes_every_format() -> None:
    for command in ("inspect", "check", "fix", "verify", "merge", "convert", "verify-merge", "scan", "verify-files",
                    "demo"):
        _, out, _ = cli(command, "--help")
        assert "--format" in out and "sarif" in out and "--json" in out, command


def test_shell_completion_is_available() -> None:
    # typer detects the user's shell from the process tree; its test switch names the shell instead
    code, out, err = cli("--show-completion", "bash", process=True,
                         env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert code == 0 and "_lorafit_completion()" in out and "_LORAFIT_COMPLETE" in out, err


def test_one_root_cause_and_what_follows_from_it(automodel: Path, bases: dict[str, Path]) -> None:
    """The layout is the cause; the drops and the empty targets follow from it: linked in JSON, shown under it."""
    code, out, _ = cli("check", automodel, "--base", bases["llama"], "--class", CAUSAL, "--json")
    findings = json.loads(out)["findings"]
    root = next(f for f in findings if f["code"] == "layout-mismatch")
    assert "caused_by" not in root and root["count"] == 6  # every landing rename, not the examples shown
    assert {f["code"]: f.get("caused_by") for f in findings if f["code"] != "layout-mismatch"} == {
        "dropped-tensors": "layout-mismatch", "missing-adapter-weights": "layout-mismatch"}
    assert [f["severity"] for f in findings] == ["error", "warning", "warning"]  # one root cause, one error
    table = _check(automodel, bases).out
    order = [line.split()[:3] for line in table.splitlines() if line.startswith(("error ", "warning "))]
    assert order == [["error", "layout-mismatch", "the"], ["warning", "↳", "dropped-tensors"],
                     ["warning", "↳", "missing-adapter-weights"]]


def test_numbers_say_their_units(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], CAUSAL, tmp_path / "a")
    code, out, _ = cli("merge", tmp_path / "a", "-o", tmp_path / "m")
    assert code == 0 and re.search(r"^bytes\s+\d+ bytes \([\d.]+ kB\)$", out, flags=re.M)
    code, report = cli_json("merge", tmp_path / "a", "-o", tmp_path / "m2")
    assert report["result"]["units"]["bytes"] == "bytes"
    code, report = cli_json("verify-merge", tmp_path / "m", "--adapter", tmp_path / "a")
    assert code == 0 and report["result"]["units"]["max_error_eps"].startswith("epsilons of the merged dtype")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o077, 0o700)])
def test_outputs_get_the_permissions_of_a_normal_mkdir(bases: dict[str, Path], tmp_path: Path, umask: int,
                                                       mode: int) -> None:
    """A serving container running as another user must be able to read what fix and merge write."""
    import os
    import stat

    make_adapter(bases["llama"], "AutoModel", tmp_path / "a")
    for args in (["fix", tmp_path / "a", "--class", CAUSAL, "-o", tmp_path / "f"],
                 ["merge", tmp_path / "a", "-o", tmp_path / "m", "--class", "AutoModel"]):
        done = cli(*args, process=True, preexec_fn=lambda: os.umask(umask))
        assert done.code == 0, done.err
    for out in (tmp_path / "f", tmp_path / "m"):
        assert stat.S_IMODE(out.stat().st_mode) == mode
        assert all(stat.S_IMODE(p.stat().st_mode) == mode & 0o666 for p in out.iterdir())


def test_a_usage_error_with_json_prints_json_too() -> None:
    for args in (["check", "--json"], ["check", "x", "--json", "--bogus"], ["inspect", "-f", "json", "--nope"]):
        code, out, err = cli(*args)
        assert code == 2 and err.startswith("lorafit: error: ") and len(err.strip().splitlines()) == 1
        doc = json.loads(out)
        assert doc["ok"] is False and doc["error"]["type"] == "UsageError" and doc["command"] == args[0]


def test_keys_without_the_prefix_are_the_one_root_cause(bases: dict[str, Path], tmp_path: Path) -> None:
    """Keys saved without base_model.model. (one cause): the drops that follow are linked to it, not errors of
    their own."""
    from safetensors.torch import load_file, save_file

    make_adapter(bases["llama"], CAUSAL, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}, str(weights))
    code, report = cli_json("check", tmp_path / "a", "--class", CAUSAL)
    assert code == 1
    errors = [f["code"] for f in report["findings"] if f["severity"] == "error"]
    assert errors == ["unprefixed-keys"]
    assert {f["caused_by"] for f in report["findings"] if f["code"] != "unprefixed-keys"} == {"unprefixed-keys"}
    hint = next(f["hint"] for f in report["findings"] if f["code"] == "unprefixed-keys")
    assert hint == (f"lorafit fix {tmp_path / 'a'} --base {bases['llama']} --class {CAUSAL} -o a-"
                    f"{CAUSAL.lower()}")  # the user's base and class


def test_global_flags_anywhere(automodel: Path, bases: dict[str, Path]) -> None:
    before = _check(automodel, bases, "-q").out
    after = cli("check", automodel, "--base", bases["llama"], "--class", CAUSAL, "-q", env={"COLUMNS": "80"}).out
    assert before == after and not after.startswith("adapter ")

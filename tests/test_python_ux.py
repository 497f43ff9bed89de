"""The Python side as a user meets it: classes as objects, a Report in a terminal and a notebook, load_adapter's
log line, and lorafit.testing.assert_lands for users' own test suites."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import transformers

import lorafit
from conftest import load_model, make_adapter
from lorafit.api.load import verify_pretrained
from lorafit.findings import Finding
from lorafit.testing import assert_lands

CAUSAL = "AutoModelForCausalLM"


@pytest.fixture(scope="module")
def automodel(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ux") / "a"
    make_adapter(bases["llama"], "AutoModel", out)
    return out


def test_class_name_takes_the_class_itself(automodel: Path, bases: dict[str, Path], tmp_path: Path) -> None:
    assert lorafit.check(automodel, bases["llama"], transformers.AutoModel).ok
    bad = lorafit.check(automodel, bases["llama"], transformers.AutoModelForCausalLM)
    assert not bad.ok and bad.target is not None and bad.target["requested_class"] == CAUSAL
    fixed = lorafit.fix(automodel, bases["llama"], tmp_path / "f", class_name=transformers.AutoModelForCausalLM)
    assert fixed.ok
    assert verify_pretrained(tmp_path / "f", bases["llama"], transformers.AutoModelForCausalLM).ok


def test_a_report_prints_and_renders_in_a_notebook(automodel: Path, bases: dict[str, Path]) -> None:
    report = lorafit.check(automodel, bases["llama"], CAUSAL)
    text = str(report)
    assert text.splitlines()[0] == "lorafit check: FAIL (1 error finding)"
    assert "error   layout-mismatch" in text and "fix: lorafit fix " in text
    html = report._repr_html_()
    assert html.startswith("<p><b>lorafit check: FAIL (1 error finding)</b></p><table>")
    assert html.count("<tr>") == 4 and "<code>layout-mismatch</code>" in html
    from rich.console import Console

    console = Console(record=True, width=1000)
    console.print(report)
    assert console.export_text().strip() == text.strip()


def test_html_escapes_what_the_files_say() -> None:
    report = lorafit.Report("check", findings=[Finding("dropped-tensors", "<script>x</script>",
                                                                ["<img src=x onerror=y>"])])
    html = report._repr_html_()
    assert "<script>" not in html and "<img" not in html and "&lt;script&gt;" in html


def test_load_adapter_logs_the_rewrite_it_applied(automodel: Path, bases: dict[str, Path],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lorafit"):
        lorafit.load_adapter(load_model(bases["llama"], CAUSAL), automodel)
    [record] = [r for r in caplog.records if r.name == "lorafit"]
    assert record.levelno == logging.INFO and "add prefix 'model.'" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorafit"):
        lorafit.load_adapter(load_model(bases["llama"], "AutoModel"), automodel)
    assert not [r for r in caplog.records if r.name == "lorafit"]  # nothing rewritten, nothing said


def test_assert_lands(automodel: Path, bases: dict[str, Path]) -> None:
    assert assert_lands(automodel, bases["llama"], class_name="AutoModel", load=True).ok
    with pytest.raises(AssertionError) as failed:
        assert_lands(automodel, bases["llama"], class_name=CAUSAL)
    message = str(failed.value)
    assert "layout-mismatch:" in message and "fix: lorafit fix " in message
    with pytest.raises(AssertionError, match="runtime-keys-unused"):
        assert_lands(automodel, bases["llama"], class_name="AutoModel", runtimes=["vllm"])

"""The public API's edges: real signatures and docstrings, a class object for class_name, one error tree."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import transformers

import lorafit
from conftest import make_adapter
from helpers import python
from lorafit.errors import AdapterMismatchError, LorafitError, UnknownClassError

API = ["inspect", "check", "fix", "load_adapter", "verify", "merge", "verify_merge"]


@pytest.fixture(scope="module")
def adapter(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("api") / "adapter"
    make_adapter(bases["llama"], "AutoModelForCausalLM", out, target_modules=["q_proj", "v_proj"])
    return out


@pytest.mark.parametrize("name", API)
def test_api_shows_its_real_signature_and_docstring(name: str) -> None:
    fn = getattr(lorafit, name)
    params = inspect.signature(fn).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values()) or name == "load_adapter"
    assert all(p.annotation is not inspect.Parameter.empty for p in params.values())
    doc = inspect.getdoc(fn) or ""
    assert "Returns" in doc or "Return" in doc, doc
    assert not doc.startswith("See lorafit")


def test_check_takes_a_class_object(adapter: Path, bases: dict[str, Path]) -> None:
    by_name = lorafit.check(adapter, bases["llama"], class_name="AutoModel")
    by_class = lorafit.check(adapter, bases["llama"], class_name=transformers.AutoModel)
    assert by_class.to_json() == by_name.to_json()
    assert "layout-mismatch" in by_class.codes()


def test_a_class_that_is_not_transformers_is_refused(adapter: Path, bases: dict[str, Path]) -> None:
    class MyModel(transformers.LlamaModel):
        pass

    with pytest.raises(UnknownClassError, match="not a transformers model class"):
        lorafit.check(adapter, bases["llama"], class_name=MyModel)


def test_one_error_tree() -> None:
    assert issubclass(AdapterMismatchError, LorafitError)


def test_errors_are_there_right_after_import() -> None:
    code = "import lorafit; print(lorafit.errors.LorafitError.__name__, lorafit.__version__)"
    out = python(code, timeout=60)
    assert out.code == 0, out.err
    assert out.out.split()[0] == "LorafitError"

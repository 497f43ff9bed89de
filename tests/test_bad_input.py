"""Bad input at the CLI: exit code 2, one line on stderr naming the file and what is wrong, no traceback,
and nothing written anywhere (the adapter directory is byte-for-byte unchanged)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_adapter
from helpers import assert_one_line_error, cli, snapshot


@pytest.fixture(scope="module")
def good_adapter(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good") / "adapter"
    make_adapter(bases["gpt2"], "AutoModelForCausalLM", out, task_type="CAUSAL_LM")
    return out


@pytest.fixture(autouse=True)
def _private_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep lorafit's tree cache and the HF cache out of the directories whose contents the tests compare."""
    caches = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("LORAFIT_CACHE", str(caches / "lorafit"))
    monkeypatch.setenv("HF_HUB_CACHE", str(caches / "hub"))


# ----------------------------------------------------------------------------- broken adapters

def _config(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def _write_config(path: Path, cfg: object) -> None:
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _truncate(path: Path) -> None:
    w = path / "adapter_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])


def _garbage_header(path: Path) -> None:
    w = path / "adapter_model.safetensors"
    data = w.read_bytes()
    w.write_bytes((40).to_bytes(8, "little") + b"\x8f\x00garbage{not json at all}\xff\xfe" + data[50:])


def _bad_offsets(path: Path) -> None:
    """A header that is valid JSON but whose data_offsets are not numbers."""
    header = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight":
              {"dtype": "F32", "shape": [4, 16], "data_offsets": ["0", "256"]}}
    raw = json.dumps(header).encode()
    (path / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(256))


def _random_bytes(path: Path) -> None:
    (path / "adapter_model.safetensors").write_bytes(os.urandom(300))


class Evil:
    """Unpickling this with full pickle would create a marker file: weights_only must refuse it."""

    marker: Path

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _pickle_bin(path: Path) -> None:
    (path / "adapter_model.safetensors").unlink()
    evil = Evil()
    evil.marker = path.parent / "PWNED"
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2), "payload": evil}, path / "adapter_model.bin")


def _pickle_arbitrary(path: Path) -> None:
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(pickle.dumps({"weights": Path("/etc/passwd")}))


def _truncated_bin(path: Path) -> None:
    sd = load_file(str(path / "adapter_model.safetensors"))
    (path / "adapter_model.safetensors").unlink()
    torch.save(sd, path / "adapter_model.bin")
    data = (path / "adapter_model.bin").read_bytes()
    (path / "adapter_model.bin").write_bytes(data[: len(data) // 2])


def _wrong_ndim(path: Path) -> None:
    w = path / "adapter_model.safetensors"
    sd = load_file(str(w))
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    sd[key] = sd[key].flatten()
    save_file(sd, str(w), metadata={"format": "pt"})


# (id, how to break a copy of the good adapter, file named in the message, what the message says)
BROKEN: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("config-missing", lambda p: (p / "adapter_config.json").unlink(), "", "adapter_config.json is missing"),
    ("config-empty", lambda p: (p / "adapter_config.json").write_text(""), "adapter_config.json", "is empty"),
    ("config-blank", lambda p: (p / "adapter_config.json").write_text("  \n"), "adapter_config.json", "is empty"),
    ("config-not-json", lambda p: (p / "adapter_config.json").write_text('{"r": 4,'), "adapter_config.json",
     "not valid JSON"),
    ("config-not-object", lambda p: _write_config(p, [1, 2]), "adapter_config.json", "not a JSON object"),
    ("config-no-peft-type", lambda p: _write_config(p, {k: v for k, v in _config(p).items() if k != "peft_type"}),
     "adapter_config.json", "no peft_type"),
    ("peft-type-unknown", lambda p: _write_config(p, _config(p) | {"peft_type": "LORAX"}), "adapter_config.json",
     "unknown peft_type 'LORAX'"),
    ("peft-type-lowercase", lambda p: _write_config(p, _config(p) | {"peft_type": "lora"}), "adapter_config.json",
     "must be spelled 'LORA'"),
    ("peft-type-ia3", lambda p: _write_config(p, _config(p) | {"peft_type": "IA3"}), "adapter_config.json",
     "'IA3' is not supported"),
    ("r-not-a-number", lambda p: _write_config(p, _config(p) | {"r": "four"}), "adapter_config.json",
     "r must be a finite number"),
    ("weights-missing", lambda p: (p / "adapter_model.safetensors").unlink(), "", "weights file missing"),
    ("safetensors-truncated", _truncate, "adapter_model.safetensors", "truncated"),
    ("safetensors-garbage-header", _garbage_header, "adapter_model.safetensors", "corrupt safetensors"),
    ("safetensors-random-bytes", _random_bytes, "adapter_model.safetensors", "corrupt safetensors"),
    ("safetensors-bad-offsets", _bad_offsets, "adapter_model.safetensors", "corrupt safetensors"),
    ("bin-needs-pickle", _pickle_bin, "adapter_model.bin", "Unsupported global: GLOBAL io.open"),
    ("bin-arbitrary-pickle", _pickle_arbitrary, "adapter_model.bin", "weights_only"),
    ("bin-truncated", _truncated_bin, "adapter_model.bin", "not a readable torch checkpoint"),
    ("tensor-wrong-ndim", _wrong_ndim, "adapter_model.safetensors", "has 1 dimensions"),
]


@pytest.mark.parametrize("command", ["inspect", "check"])
@pytest.mark.parametrize(("name", "breaker", "file", "says"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_adapter(bases: dict[str, Path], good_adapter: Path, tmp_path: Path, command: str, name: str,
                        breaker: Callable[[Path], None], file: str, says: str) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    breaker(adapter)
    before = snapshot(tmp_path)
    args = ["inspect", adapter] if command == "inspect" else ["check", adapter, "--base", bases["gpt2"]]
    code, out, err = cli(*args)
    named = str(adapter / file) if file else str(adapter)
    assert_one_line_error(code, out, err, named + ":", says)
    assert snapshot(tmp_path) == before  # nothing modified, nothing written
    assert not (tmp_path / "PWNED").exists()  # the pickle payload never ran


# ----------------------------------------------------------------------------- base model and class

def test_base_model_not_found(good_adapter: Path, tmp_path: Path) -> None:
    before = snapshot(good_adapter.parent)
    for base, how in ((tmp_path / "no-such-model", "Pass a local directory"),
                      ("org/not-in-cache", "`hf download org/not-in-cache config.json`")):
        code, out, err = cli("check", good_adapter, "--base", base)
        assert_one_line_error(code, out, err, f"{base}:", "not found locally", "never downloads", how)
    assert snapshot(good_adapter.parent) == before


def test_base_dir_without_config(good_adapter: Path, tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    code, out, err = cli("check", good_adapter, "--base", tmp_path / "empty-model")
    assert_one_line_error(code, out, err, str(tmp_path / "empty-model"), "config.json is missing")


def test_unknown_class_name_suggests_the_right_one(bases: dict[str, Path], good_adapter: Path) -> None:
    before = snapshot(good_adapter.parent)
    code, out, err = cli("check", good_adapter, "--base", bases["gpt2"], "--class", "AutoModelForCausalLMM")
    assert_one_line_error(code, out, err, "'AutoModelForCausalLMM'", "did you mean AutoModelForCausalLM")
    assert snapshot(good_adapter.parent) == before


def test_fix_refuses_an_existing_output_without_force(bases: dict[str, Path], good_adapter: Path,
                                                      tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    out_dir = tmp_path / "fixed"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("do not touch")
    before = snapshot(tmp_path)
    code, out, err = cli("fix", adapter, "--base", bases["gpt2"], "--class", "AutoModel", "-o", out_dir)
    assert_one_line_error(code, out, err, f"{out_dir}:", "already exists", "--overwrite")
    assert snapshot(tmp_path) == before  # OUT untouched, no partial directory beside it, adapter unchanged


# ----------------------------------------------------------------------------- the real executable

@pytest.mark.parametrize("case", ["pickle", "class"])
def test_real_process_stderr_is_one_line(bases: dict[str, Path], good_adapter: Path, tmp_path: Path,
                                         case: str) -> None:
    """In a real process, library warnings and logging reach stderr too: still exactly one line."""
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    if case == "pickle":
        _pickle_bin(adapter)
        args = ["check", str(adapter), "--base", str(bases["gpt2"])]
    else:
        args = ["check", str(adapter), "--base", str(bases["gpt2"]), "--class", "GPT2LMHeadModell"]
    before = snapshot(tmp_path)
    unset = {k: None for k in os.environ if k.startswith(("PYTEST", "HF_HUB_OFFLINE"))}
    proc = cli(*args, process=True, env=unset, timeout=300)
    assert_one_line_error(*proc,
                          str(adapter / "adapter_model.bin") if case == "pickle" else "'GPT2LMHeadModell'")
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()

"""Hostile bases and merged models: custom code never runs, broken configs name config.json, and verify-merge
never proves garbage (NaN, a rewritten config)."""

from __future__ import annotations

import json
import os
import pty
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_adapter
from helpers import assert_one_line_error, cli, codes, python

CLS = "AutoModelForCausalLM"


@pytest.fixture(scope="module")
def pair(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-bases")
    make_adapter(bases["llama"], CLS, root / "adapter", task_type="CAUSAL_LM")
    assert cli("merge", root / "adapter", "--base", bases["llama"], "-o", root / "merged").code == 0
    return {"base": bases["llama"], "adapter": root / "adapter", "merged": root / "merged"}


def base_with(src: Path, dst: Path, **fields: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(fields)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ----------------------------------------------------------------------------- custom code never runs

CUSTOM = """
import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("custom code ran")
from transformers import PretrainedConfig
class XConfig(PretrainedConfig):
    model_type = "x-custom"
"""


@pytest.mark.parametrize("model_type", ["x-custom", "llama"])
def test_custom_code_is_never_run(pair: dict[str, Path], tmp_path: Path, model_type: str) -> None:
    """On a terminal, transformers asks "run the custom code? [y/N]"; even answering y must run nothing."""
    base = base_with(pair["base"], tmp_path / "base", model_type=model_type,
                     auto_map={"AutoConfig": "configuration_x.XConfig"})
    (base / "configuration_x.py").write_text(CUSTOM)
    primary, replica = pty.openpty()
    os.write(primary, b"y\n" * 8)
    done = cli("check", pair["adapter"], "--base", base, "--json", process=True, stdin=replica, timeout=120,
               env={"LORAFIT_NO_BLUEPRINTS": "1", "LORAFIT_NO_CACHE": "1"})
    os.close(primary)
    os.close(replica)
    assert not (base / "RAN").exists()
    report = json.loads(done.out)
    severity = {f["code"]: f["severity"] for f in report["findings"]}
    if model_type == "x-custom":  # only the custom code defines the model: no tree, an error that says why
        assert done.code == 1 and severity["custom-code-required"] == "error"
    else:  # a built-in type with custom code on top: judged on the built-in class, with a warning
        assert done.code == 0 and severity["custom-code"] == "warning"
        assert report["target"]["class"] == "LlamaForCausalLM"


def test_merge_refuses_a_custom_code_base(pair: dict[str, Path], tmp_path: Path) -> None:
    base = base_with(pair["base"], tmp_path / "base", model_type="x-custom",
                     auto_map={"AutoConfig": "configuration_x.XConfig"})
    (base / "configuration_x.py").write_text(CUSTOM)
    code, out, err = cli("merge", pair["adapter"], "--base", base, "-o", tmp_path / "merged", "--json")
    assert code == 1 and "custom-code-required" in out and not (tmp_path / "merged").exists(), err
    assert not (base / "RAN").exists()


# ----------------------------------------------------------------------------- broken configs

@pytest.mark.parametrize("fields", [
    {"hidden_act": "nope"},
    {"num_key_value_heads": 0},
    {"num_attention_heads": 3},
    {"pad_token_id": 64},
    {"text_config": "x"},
    {"architectures": 5},
    {"hidden_size": -16},
])
@pytest.mark.parametrize("command", ["check", "merge"])
def test_broken_base_config_gets_a_verdict_or_names_config_json(pair: dict[str, Path], tmp_path: Path,
                                                               fields: dict, command: str) -> None:
    base = base_with(pair["base"], tmp_path / "base", **fields)
    args = ["-o", tmp_path / "merged"] if command == "merge" else []
    code, out, err = cli(command, pair["adapter"], "--base", base, *args)
    assert "please report it" not in err and "Traceback" not in out + err, err  # before: "unexpected X"
    if code == 2:
        assert_one_line_error(code, out, err, "config.json")
    else:
        assert code in (0, 1), err


def test_absurd_layer_count_is_refused_at_once(pair: dict[str, Path], tmp_path: Path) -> None:
    base = base_with(pair["base"], tmp_path / "base", num_hidden_layers=10**6)
    done = cli("check", pair["adapter"], "--base", base, process=True, timeout=60)  # before: > 60 s and 4.8 GB
    assert_one_line_error(*done, "config.json", "num_hidden_layers=1000000")


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, '{"model_type": "llama", "vocab_size": ' + "1" * 5000 + "}"])
def test_base_config_json_budgets(pair: dict[str, Path], tmp_path: Path, text: str) -> None:
    base = tmp_path / "base"
    shutil.copytree(pair["base"], base)
    (base / "config.json").write_text(text)
    assert_one_line_error(*cli("check", pair["adapter"], "--base", base), "config.json")


# ----------------------------------------------------------------------------- verify-merge proves only the truth

def edited(src: Path, dst: Path, edit: object) -> Path:
    shutil.copytree(src, dst)
    tensors = {k: v.clone() for k, v in load_file(str(dst / "model.safetensors")).items()}
    edit(tensors)  # type: ignore[operator]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _adapted_keys(pair: dict[str, Path]) -> list[str]:
    code, out, _ = cli("verify-merge", pair["merged"], "--base", pair["base"], "--adapter", pair["adapter"], "--json")
    assert code == 0
    return [m["path"] for m in json.loads(out)["modules"]]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_verify_merge_fails_non_finite_weights(pair: dict[str, Path], tmp_path: Path, value: float) -> None:
    keys = _adapted_keys(pair)

    def poison(t: dict[str, torch.Tensor]) -> None:
        for k in keys:
            t[k] = torch.full_like(t[k], value)

    merged = edited(pair["merged"], tmp_path / "merged", poison)
    code, out, err = cli("verify-merge", merged, "--base", pair["base"], "--adapter", pair["adapter"], "--json")
    assert code == 1, out  # before: "verify-merge: OK", exit 0
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert "merge-non-finite" in codes(report)


def test_verify_merge_one_nan_element(pair: dict[str, Path], tmp_path: Path) -> None:
    key = _adapted_keys(pair)[0]

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[key].view(-1)[3] = float("nan")

    merged = edited(pair["merged"], tmp_path / "merged", poison)
    code, out, _ = cli("verify-merge", merged, "--base", pair["base"], "--adapter", pair["adapter"], "--json")
    assert code == 1
    finding = next(f for f in json.loads(out)["findings"] if f["code"] == "merge-non-finite")
    assert finding["keys"] == [key] and finding["message"].startswith("1 values")


def test_verify_merge_json_is_strict_json(pair: dict[str, Path], tmp_path: Path) -> None:
    key = _adapted_keys(pair)[0]

    def reshape(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].reshape(-1).clone()

    merged = edited(pair["merged"], tmp_path / "merged", reshape)
    code, out, _ = cli("verify-merge", merged, "--base", pair["base"], "--adapter", pair["adapter"], "--json")
    assert code == 1
    json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))  # before: Infinity


@pytest.mark.parametrize("edit", ["garbage", "missing", "hidden_size", "architectures", "dtype"])
def test_verify_merge_checks_the_merged_config(pair: dict[str, Path], tmp_path: Path, edit: str) -> None:
    merged = tmp_path / "merged"
    shutil.copytree(pair["merged"], merged)
    cfg_path = merged / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if edit == "garbage":
        cfg_path.write_text("{not json")
    elif edit == "missing":
        cfg_path.unlink()
    elif edit == "hidden_size":
        cfg_path.write_text(json.dumps({**cfg, "hidden_size": 32}))
    elif edit == "architectures":
        cfg_path.write_text(json.dumps({**cfg, "architectures": ["LlamaModel"]}))
    else:
        cfg_path.write_text(json.dumps({**cfg, "dtype": "float16"}))
    code, out, _ = cli("verify-merge", merged, "--base", pair["base"], "--adapter", pair["adapter"], "--json")
    assert code == 1  # before: a garbage config.json passed
    assert "merge-config-differs" in codes(json.loads(out))


def test_verify_merge_accepts_bookkeeping_differences(pair: dict[str, Path], tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    shutil.copytree(pair["merged"], merged)
    cfg = json.loads((merged / "config.json").read_text())
    cfg.update(transformers_version="9.9.9", _name_or_path="/elsewhere", use_cache=False)
    (merged / "config.json").write_text(json.dumps(cfg))
    assert cli("verify-merge", merged, "--base", pair["base"], "--adapter", pair["adapter"]).code == 0


def test_library_leaves_the_host_environment_alone(pair: dict[str, Path]) -> None:
    """`import lorafit; lorafit.check(...)` must not switch the host application offline (or change any variable)."""
    code = ("import os, sys, lorafit\nbefore = dict(os.environ)\n"
            "report = lorafit.check(sys.argv[1], sys.argv[2])\n"
            "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
            "print(sorted(changed), report.ok)\n")
    env = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "LORAFIT_NO_CACHE": "1", "LORAFIT_NO_BLUEPRINTS": "1"}
    done = python(code, pair["adapter"], pair["base"], timeout=120, env=env)
    assert done.out.strip() == "[] True", done.err  # before: HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE set

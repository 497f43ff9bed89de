"""Hub-aware bases: --base defaults to the base the adapter names, a hub id resolves through the HF cache (at
--revision), a missing base says exactly which files to fetch, a config-only snapshot is refused where weights are
needed, and nothing is ever written, or suggested, inside the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import make_adapter
from helpers import assert_one_line_error, cli, cli_json

REPO = "acme/tiny-llama"


def _snapshot(cache: Path, repo: str, commit: str, files: dict[str, Path | str], refs: tuple[str, ...] = ()) -> Path:
    """A snapshot in the layout huggingface_hub reads: models--o--n/snapshots/COMMIT, refs/NAME -> COMMIT."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        if isinstance(src, Path):
            shutil.copyfile(src, snap / name)
        else:
            (snap / name).write_text(src)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture()
def hub(bases: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    """An HF cache with a config-only snapshot of REPO at main, one with weights at tag v2, and an adapter naming
    REPO."""
    cache = tmp_path / "hf-cache"
    llama = bases["llama"]
    _snapshot(cache, REPO, "a" * 40, {"config.json": llama / "config.json"}, refs=("main",))
    _snapshot(cache, REPO, "b" * 40, {"config.json": llama / "config.json",
                                      "model.safetensors": llama / "model.safetensors"}, refs=("v2",))
    adapter = tmp_path / "adapter"
    make_adapter(llama, "AutoModel", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": REPO}))
    return {"cache": cache, "adapter": adapter, "env": {"HF_HUB_CACHE": str(cache)}}


def test_base_defaults_to_the_one_the_adapter_names(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], "AutoModel", tmp_path / "a")  # PEFT records the base's directory
    code, report = cli_json("check", tmp_path / "a", "--class", "AutoModel")
    assert code == 0, report
    target = report["target"]
    assert (target["base"], target["base_from"]) == (str(bases["llama"]), "adapter_config.json")
    code, report = cli_json("check", tmp_path / "a", "--base", bases["llama"], "--class", "AutoModel")
    assert report["target"]["base_from"] == "--base"


def test_a_hub_id_through_the_cache_with_revision_and_exact_hints(hub: dict[str, Any]) -> None:
    code, out, err = cli("check", hub["adapter"], "--class", "AutoModelForCausalLM", "--json", env=hub["env"])
    assert code == 1, err
    report = json.loads(out)
    assert (report["target"]["base"], report["target"]["snapshot"]) == (REPO, "a" * 40)
    hint = next(f["hint"] for f in report["findings"] if f["code"] == "layout-mismatch")
    assert hint == (f"lorafit fix {hub['adapter']} --base {REPO} --class AutoModelForCausalLM "
                    "-o adapter-automodelforcausallm")  # the user's names, an output in the current directory
    code, out, _ = cli("check", hub["adapter"], "--class", "AutoModel", "--revision", "v2", "--json", env=hub["env"])
    report = json.loads(out)
    assert (report["target"]["revision"], report["target"]["snapshot"]) == ("v2", "b" * 40)


def test_a_base_not_in_the_cache_names_the_files_to_fetch(hub: dict[str, Any], tmp_path: Path) -> None:
    code, out, err = cli("check", hub["adapter"], "--base", "acme/other", env=hub["env"])
    assert_one_line_error(code, out, err, "acme/other", "never downloads", "`hf download acme/other config.json`")
    code, out, err = cli("verify", hub["adapter"], "--base", "acme/other", "--revision", "v9", env=hub["env"])
    assert_one_line_error(code, out, err, 'hf download acme/other --include "*.json" "*.safetensors" --revision v9')
    code, out, err = cli("check", hub["adapter"], "--revision", "v2", "--base", tmp_path, env=hub["env"])
    assert_one_line_error(code, out, err, "--revision applies to a hub id")


@pytest.mark.parametrize("command", ["verify", "merge", "verify-merge"])
def test_a_config_only_snapshot_is_refused_where_weights_are_needed(hub: dict[str, Any], tmp_path: Path,
                                                                   command: str) -> None:
    args = {"verify": ["verify", hub["adapter"]], "merge": ["merge", hub["adapter"], "-o", tmp_path / "out"],
            "verify-merge": ["verify-merge", tmp_path, "--adapter", hub["adapter"]]}[command]
    code, out, err = cli(*args, env=hub["env"])
    assert_one_line_error(code, out, err, "holds config.json but no weights",
                          f'hf download {REPO} --include "*.json" "*.safetensors"')
    assert not (tmp_path / "out").exists()


def test_verify_and_merge_read_the_snapshot_with_weights(hub: dict[str, Any], tmp_path: Path) -> None:
    code, out, err = cli("merge", hub["adapter"], "--revision", "v2", "--class", "AutoModel", "-o", tmp_path / "m",
                         env=hub["env"])
    assert code == 0, out + err
    code, out, err = cli("verify-merge", tmp_path / "m", "--adapter", hub["adapter"], "--revision", "v2",
                         "--class", "AutoModel", env=hub["env"])
    assert code == 0, out + err
    code, out, err = cli("verify", hub["adapter"], "--revision", "v2", "--class", "AutoModel", env=hub["env"])
    assert code == 0, out + err


def test_nothing_is_written_inside_the_cache(hub: dict[str, Any]) -> None:
    inside = hub["cache"] / "fixed"
    code, out, err = cli("fix", hub["adapter"], "--class", "AutoModel", "-o", inside, env=hub["env"])
    assert_one_line_error(code, out, err, "inside the HF cache")
    assert not inside.exists()


def test_runtime_checks_take_revision_and_config_too(hub: dict[str, Any]) -> None:
    code, out, err = cli("check", hub["adapter"], "--runtime", "vllm", "--revision", "v9", env=hub["env"])
    assert_one_line_error(code, out, err, "not found locally at revision v9")
    code, out, err = cli("check", hub["adapter"], "--runtime", "vllm", "--base", REPO, "--config", "bogus",
                         env=hub["env"])
    assert_one_line_error(code, out, err, "must look like KEY=VALUE")
    code, report = cli_json("check", hub["adapter"], "--runtime", "vllm", "--base", REPO, "--revision", "v2",
                            "--class", "AutoModel")
    assert code == 2  # without the cache in the environment, the hub id is not here


def test_hints_repeat_how_the_base_was_named(hub: dict[str, Any]) -> None:
    code, out, _ = cli("check", hub["adapter"], "--class", "AutoModelForCausalLM", "--revision", "v2", "--config",
                       "use_cache=false", "--json", env=hub["env"])
    hint = next(f["hint"] for f in json.loads(out)["findings"] if f["code"] == "layout-mismatch")
    assert hint == (f"lorafit fix {hub['adapter']} --base {REPO} --revision v2 --config use_cache=false "
                    "--class AutoModelForCausalLM -o adapter-automodelforcausallm")


def test_verify_merge_and_verify_merge_say_which_base(hub: dict[str, Any], tmp_path: Path) -> None:
    for args in (["verify", hub["adapter"]], ["merge", hub["adapter"], "-o", tmp_path / "m"],
                 ["verify-merge", tmp_path / "m", "--adapter", hub["adapter"]]):
        code, out, err = cli(*args, "--revision", "v2", "--class", "AutoModel", "--json", env=hub["env"])
        target = json.loads(out)["target"]
        assert (target["base"], target["base_from"], target["snapshot"]) == (REPO, "adapter_config.json", "b" * 40)

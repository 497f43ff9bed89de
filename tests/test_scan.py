"""lorafit scan: every adapter under a tree of directories, judged on its own base (grouped, one tree each), in
parallel; a record per adapter with the same schema as check --json; unreadable adapters are rows, not a stop;
results cached by content, so a re-run only does the new work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import make_adapter
from helpers import assert_one_line_error, cli, cli_json, snapshot

CAUSAL = "AutoModelForCausalLM"


@pytest.fixture()
def fleet(bases: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    root = tmp_path / "fleet"
    make_adapter(bases["llama"], CAUSAL, root / "llama-ok", task_type="CAUSAL_LM")
    # no task_type: judged on AutoModel, where a causal LM's paths do not land (an error)
    make_adapter(bases["llama"], CAUSAL, root / "llama-automodel")
    make_adapter(bases["gpt2"], CAUSAL, root / "sweep" / "checkpoint-100", task_type="CAUSAL_LM")
    pm = make_adapter(bases["llama"], CAUSAL, root / "named", task_type="CAUSAL_LM")
    pm.add_adapter("second", pm.peft_config["default"])
    pm.save_pretrained(root / "named")  # PEFT puts the second adapter in named/second/
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{")
    return {"root": root, "env": {"LORAFIT_CACHE": str(tmp_path / "cache")}}


def _records(out: str) -> dict[str, dict[str, Any]]:
    return {r["adapter"]: r for r in map(json.loads, out.splitlines())}


def test_a_record_per_adapter_like_check_json(fleet: dict[str, Any], bases: dict[str, Path]) -> None:
    root = fleet["root"]
    before = snapshot(root)
    code, out, err = cli("scan", root, "--json", env=fleet["env"])
    assert code == 1, err
    records = _records(out)
    assert sorted(Path(a).relative_to(root).as_posix() for a in records) == [
        "broken", "llama-automodel", "llama-ok", "named", "named/second", "sweep/checkpoint-100"]
    assert snapshot(root) == before  # nothing is written next to any adapter
    broken = records[str(root / "broken")]
    assert broken["exit_code"] == 2 and broken["error"]["type"] == "AdapterFormatError"
    for name in ("llama-ok", "llama-automodel", "sweep/checkpoint-100", "named/second"):
        record = records[str(root / name)]
        code, alone = cli_json("check", root / name)  # the same judgement, one adapter at a time
        assert record["exit_code"] == code
        assert [f["code"] for f in record["report"]["findings"]] == [f["code"] for f in alone["findings"]], name
        assert record["report"]["schema"] == alone["schema"] and record["report"]["target"] == alone["target"]
    assert records[str(root / "llama-automodel")]["exit_code"] == 1


def test_a_rerun_does_only_the_new_work(fleet: dict[str, Any], bases: dict[str, Path], tmp_path: Path) -> None:
    root = fleet["root"]
    cli("scan", root, "-o", tmp_path / "first", env=fleet["env"])
    summary = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert (summary["adapters"], summary["from_cache"], summary["bases"]) == (6, 0, 2)
    assert len((tmp_path / "first" / "scan.jsonl").read_text().splitlines()) == 6
    make_adapter(bases["llama"], CAUSAL, root / "new", task_type="CAUSAL_LM")
    code, out, _ = cli("scan", root, env=fleet["env"])
    assert code == 1 and "7 adapters on 2 bases" in out and "(6 from the cache)" in out
    shutil.copyfile(root / "llama-ok" / "README.md", root / "llama-ok" / "notes.md")  # new content: judged again
    code, out, _ = cli("scan", root, env=fleet["env"])
    assert "(6 from the cache)" in out
    code, out, err = cli("scan", root, "-o", tmp_path / "first", env=fleet["env"])
    assert_one_line_error(code, out, err, "already exists")


def test_runtimes_and_ci_formats(fleet: dict[str, Any]) -> None:
    root = fleet["root"]
    code, out, _ = cli("scan", root / "llama-ok", root / "sweep", "--runtime", "vllm,mlx", "--json", env=fleet["env"])
    records = _records(out)
    assert code == 1 and len(records) == 2
    rows = records[str(root / "llama-ok")]["report"]["result"]["runtimes"]
    assert [(r["runtime"], r["verdict"]) for r in rows] == [("vllm", "loads"), ("mlx", "will not load")]
    code, out, _ = cli("scan", root, "--format", "sarif", env=fleet["env"])
    results = json.loads(out)["runs"][0]["results"]
    uris = {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in results}
    assert (root / "llama-automodel" / "adapter_config.json").resolve().as_uri() in uris
    code, out, _ = cli("scan", root, "--format", "github", env=fleet["env"])
    assert any(line.startswith("::error title=lorafit (layout-mismatch)") for line in out.splitlines())


def test_serial_and_parallel_agree(fleet: dict[str, Any]) -> None:
    one = cli("scan", fleet["root"], "--json", "--workers", "1", env={"LORAFIT_NO_CACHE": "1"}).out
    two = cli("scan", fleet["root"], "--json", "--workers", "2", env={"LORAFIT_NO_CACHE": "1"}).out
    assert one == two


def test_usage(tmp_path: Path) -> None:
    assert_one_line_error(*cli("scan"), "scan needs PATHS")
    assert_one_line_error(*cli("scan", tmp_path / "nope"), "no such file or directory")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*cli("scan", tmp_path / "empty"), "no adapter directory")
    assert_one_line_error(*cli("scan", tmp_path / "empty", "--runtime", "tgi"), "unknown runtime 'tgi'")


def _poison(adapter_dir: Path) -> None:
    """One NaN in a lora_B, written in place at the same size with the old mtime back: only the bytes and the
    change time say it is another file."""
    import os

    from safetensors.torch import load_file, save_file

    w = adapter_dir / "adapter_model.safetensors"
    st = w.stat()
    tensors = load_file(str(w))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(w), metadata={"format": "pt"})
    assert w.stat().st_size == st.st_size
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_one_read_gives_the_health_and_the_digest(bases: dict[str, Path], tmp_path: Path) -> None:
    import hashlib

    from lorafit.formats import read_adapter
    from lorafit.formats.health import health_and_digest, tensor_health

    out = tmp_path / "a"
    make_adapter(bases["llama"], CAUSAL, out, task_type="CAUSAL_LM", modules_to_save=["lm_head"])
    for poisoned in (False, True):
        if poisoned:
            _poison(out)
        health, digest = health_and_digest(read_adapter(out))
        assert digest == hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
        alone = tensor_health(read_adapter(out))  # the two-thread reader on a fresh read
        assert (health.non_finite, health.zero_b, health.parameters) == (
            alone.non_finite, alone.zero_b, alone.parameters)
        assert bool(health.non_finite) is poisoned


def test_a_changed_adapter_or_base_is_judged_again(bases: dict[str, Path], tmp_path: Path) -> None:
    root, env = tmp_path / "fleet", {"LORAFIT_CACHE": str(tmp_path / "cache")}
    base = tmp_path / "llama-base"
    shutil.copytree(bases["llama"], base)
    for name in ("a", "b"):
        make_adapter(base, CAUSAL, root / name, task_type="CAUSAL_LM")
    code, out, _ = cli("scan", root, "--base", base, env=env)
    assert code == 0 and "(0 from the cache)" in out
    _poison(root / "a")  # the same size and mtime: the scan must not trust its cache
    code, out, _ = cli("scan", root, "--base", base, "--json", env=env)
    records = _records(out)
    assert code == 1 and "non-finite" in {f["code"] for f in records[str(root / "a")]["report"]["findings"]}
    assert records[str(root / "b")]["exit_code"] == 0
    assert "(2 from the cache)" in cli("scan", root, "--base", base, env=env).out
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"num_hidden_layers": config["num_hidden_layers"] + 1}))
    code, out, _ = cli("scan", root, "--base", base, env=env)
    assert "(0 from the cache)" in out  # the base changed: every verdict is judged again

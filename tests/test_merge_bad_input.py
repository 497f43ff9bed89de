"""Bad input to merge and verify-merge: exit 2, one line on stderr naming the file, no OUT left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_model, make_adapter
from helpers import assert_one_line_error, cli
from lorafit import merge
from lorafit.errors import CheckpointFormatError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, bases: dict[str, Path]) -> dict[str, Path]:
    """A tiny Llama saved in several shards, and an adapter for it."""
    root = tmp_path_factory.mktemp("bad")
    base = root / "llama-base"
    load_model(bases["llama"], "AutoModelForCausalLM").save_pretrained(base, max_shard_size="20KB")
    make_adapter(base, "AutoModelForCausalLM", root / "adapter")
    return {"base": base, "adapter": root / "adapter"}


def broken_copy(src: Path, dst: Path) -> Path:
    """A copy of a model dir (hard links are not used: the test edits files)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def shard_names(base: Path) -> list[str]:
    return sorted(set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_missing_shard(sharded: dict[str, Path], tmp_path: Path) -> None:
    base = broken_copy(sharded["base"], tmp_path / "llama-base")
    victim = shard_names(base)[1]
    (base / victim).unlink()
    code, stdout, err = cli("merge", sharded["adapter"], "--base", base, "-o", tmp_path / "out")
    assert_one_line_error(code, stdout, err, victim)
    assert "missing" in err and not (tmp_path / "out").exists()


def test_index_names_a_file_that_does_not_exist(sharded: dict[str, Path], tmp_path: Path) -> None:
    base = broken_copy(sharded["base"], tmp_path / "llama-base")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-00009-of-00009.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    code, stdout, err = cli("merge", sharded["adapter"], "--base", base, "-o", tmp_path / "out")
    assert_one_line_error(code, stdout, err, "model-00009-of-00009.safetensors")
    assert not (tmp_path / "out").exists()


def test_truncated_shard(sharded: dict[str, Path], tmp_path: Path) -> None:
    base = broken_copy(sharded["base"], tmp_path / "llama-base")
    victim = base / shard_names(base)[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    code, stdout, err = cli("merge", sharded["adapter"], "--base", base, "-o", tmp_path / "out")
    assert_one_line_error(code, stdout, err, victim.name)
    assert "truncated" in err and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointFormatError, match="truncated"):  # a model shard, not an adapter, is broken
        merge(sharded["adapter"], base, tmp_path / "out")


def test_base_without_safetensors(sharded: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "llama-base"
    base.mkdir()
    (base / "config.json").write_bytes((sharded["base"] / "config.json").read_bytes())
    (base / "pytorch_model.bin").write_bytes(b"")
    code, stdout, err = cli("merge", sharded["adapter"], "--base", base, "-o", tmp_path / "out")
    assert_one_line_error(code, stdout, err, str(base))
    assert "safetensors" in err and not (tmp_path / "out").exists()


def test_out_parent_is_a_file(sharded: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    code, stdout, err = cli("merge", sharded["adapter"], "--base", sharded["base"], "-o", out)
    assert_one_line_error(code, stdout, err, str(out))
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "file"]


def test_out_on_a_filesystem_that_refuses_writes(sharded: dict[str, Path]) -> None:
    """/proc refuses new directories even to root (the read-only-directory case, as root sees it)."""
    out = Path("/proc/lorafit-merge-out")
    code, stdout, err = cli("merge", sharded["adapter"], "--base", sharded["base"], "-o", out)
    assert_one_line_error(code, stdout, err, str(out))
    assert not out.exists()


def test_verify_merge_truncated_merged_shard(sharded: dict[str, Path], tmp_path: Path) -> None:
    merged = broken_copy(sharded["base"], tmp_path / "merged")
    victim = merged / shard_names(merged)[-1]
    victim.write_bytes(victim.read_bytes()[:20])
    assert_one_line_error(*cli("verify-merge", merged, "--base", sharded["base"], "--adapter", sharded["adapter"]),
                          victim.name)


def test_bad_options(sharded: dict[str, Path], tmp_path: Path) -> None:
    for opt in (["--dtype", "int4"], ["--max-shard-size", "lots"], ["--max-shard-size", "5"],
                ["--max-shard-size", "5000000000"]):
        run = cli("merge", sharded["adapter"], "--base", sharded["base"], "-o", tmp_path / "out", *opt)
        assert_one_line_error(*run, opt[1])
        assert not (tmp_path / "out").exists()

"""Outputs never destroy what lorafit did not create: races, signals, kills, symlinks, full disks.

Each test goes through the CLI; signals and races use real child processes."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import make_adapter
from helpers import assert_one_line_error, cli, python, snapshot

CLS = "AutoModelForCausalLM"


@pytest.fixture(scope="module")
def pair(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    make_adapter(bases["llama"], CLS, root / "adapter", task_type="CAUSAL_LM")
    return {"base": bases["llama"], "adapter": root / "adapter"}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (".partial" in p.name or
                                                                                 ".old" in p.name))


# ----------------------------------------------------------------------------- another writer's OUT survives

def test_out_that_appears_during_merge_survives(pair: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    hook = f"""
        import lorafit.api.merge as m
        real = m.copy_support_files
        def racing(*a, **k):  # another process creates OUT while the merge is writing
            import os
            os.mkdir({str(out)!r}); open({str(out / "theirs.txt")!r}, "w").write("keep me")
            return real(*a, **k)
        m.copy_support_files = racing
    """
    done = cli("merge", pair["adapter"], "--base", pair["base"], "-o", out, hook=hook, timeout=180)
    assert_one_line_error(*done, str(out), "appeared while lorafit was writing")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]  # before: moved aside and deleted, exit 0
    assert leftovers(tmp_path) == []


def test_concurrent_fix_runs_to_one_out(pair: dict[str, Path], tmp_path: Path) -> None:
    """Two writers at once: one succeeds, the other gets a clear exit 2; OUT is one whole adapter."""
    out = tmp_path / "fixed"
    args = ["fix", pair["adapter"], "--base", pair["base"], "--class", "AutoModel", "-o", out]
    with ThreadPoolExecutor(2) as pool:  # both child processes run at once
        results = list(pool.map(lambda _: cli(*args, process=True, timeout=180), range(2)))
    assert sorted(r.code for r in results) == [0, 2], results  # before: both 0, one silently replaced
    loser = next(r for r in results if r.code == 2)
    assert_one_line_error(*loser, str(out))
    code, _, err = cli("check", out, "--base", pair["base"], "--class", "AutoModel")
    assert code == 0, err
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- signals and kills

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_merge_leaves_nothing(pair: dict[str, Path], tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "merged"
    hook = f"""
        import os, lorafit.api.merge as m
        real = m.write_index
        def stop(*a, **k):  # the shards are written: the signal arrives mid-output
            os.kill(os.getpid(), {int(sig)})
            return real(*a, **k)
        m.write_index = stop
    """
    done = cli("merge", pair["adapter"], "--base", pair["base"], "-o", out, hook=hook, timeout=180)
    assert done.code == 128 + sig, done.err
    assert "Traceback" not in done.err and f"stopped by {sig.name}" in done.err
    assert not out.exists() and leftovers(tmp_path) == []  # before: SIGTERM left .merged.partial-* behind


def test_killed_run_is_cleaned_up_by_the_next(pair: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    hook = """
        import os, signal, lorafit.api.merge as m
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        m.write_index = die
    """
    done = cli("merge", pair["adapter"], "--base", pair["base"], "-o", out, hook=hook, timeout=180)
    assert done.code == -signal.SIGKILL
    left = leftovers(tmp_path)
    assert len(left) == 1 and ".partial-lorafit-" in left[0]
    code, stdout, err = cli("merge", pair["adapter"], "--base", pair["base"], "-o", out, "--json")
    report = json.loads(stdout)
    assert code == 0, err
    assert leftovers(tmp_path) == []
    cleaned = [f for f in report["findings"] if f["code"] == "stale-output-removed"]
    assert len(cleaned) == 1 and left[0] in cleaned[0]["message"]


def test_live_owner_and_foreign_dirs_are_left_alone(pair: dict[str, Path], tmp_path: Path) -> None:
    """Only a marked staging dir whose owner is dead is removed; a live run's and a stranger's stay."""
    from lorafit.fileio.outputs import _owner_tag

    out = tmp_path / "fixed"
    live = tmp_path / f".fixed.partial-{_owner_tag()}-abc123"  # this very process: alive
    stranger = tmp_path / ".fixed.partial-x7"
    for d in (live, stranger):
        d.mkdir()
    assert cli("fix", pair["adapter"], "--base", pair["base"], "-o", out).code == 0
    assert live.is_dir() and stranger.is_dir()


def test_old_out_moved_aside_by_a_killed_run_is_restored(pair: dict[str, Path], tmp_path: Path) -> None:
    from lorafit.fileio.outputs import _owner_tag

    dead = python("import os; print(os.getpid())")
    tag = _owner_tag().rsplit("-", 2)[0] + f"-{int(dead.out)}-0"
    aside = tmp_path / f".fixed.old-{tag}-abc123"
    (aside / "x").mkdir(parents=True)
    (aside / "x" / "adapter_config.json").write_text("{}")
    out = tmp_path / "fixed"
    code, out_text, err = cli("fix", pair["adapter"], "--base", pair["base"], "-o", out)
    assert_one_line_error(code, out_text, err, "already exists")  # the restored OUT is the user's: kept
    assert (out / "adapter_config.json").read_text() == "{}" and not aside.exists()


# ----------------------------------------------------------------------------- where OUT may go

@pytest.mark.parametrize("where", ["adapter", "base"])
def test_out_inside_an_input_is_refused(pair: dict[str, Path], tmp_path: Path, where: str) -> None:
    adapter, base = tmp_path / "adapter", tmp_path / "base"
    shutil.copytree(pair["adapter"], adapter)
    shutil.copytree(pair["base"], base)
    before = snapshot(tmp_path)
    target = (adapter if where == "adapter" else base) / "sub" / "out"
    for command in ("fix", "merge"):
        code, out, err = cli(command, adapter, "--base", base, "-o", target)
        assert_one_line_error(code, out, err, "inside the input")
    assert snapshot(tmp_path) == before  # before: accepted, and a later --force could delete the input


def test_refused_fix_removes_the_parents_it_made(pair: dict[str, Path], tmp_path: Path) -> None:
    """A NaN adapter cannot be fixed: exit 1, and no directory of the OUT path is left behind."""
    import torch
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(pair["adapter"], adapter)
    w = adapter / "adapter_model.safetensors"
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(w)).items()}
    save_file(tensors, str(w))
    code, _, err = cli("fix", adapter, "--base", pair["base"], "-o", tmp_path / "new" / "deeper" / "out")
    assert code == 1, err
    assert not (tmp_path / "new").exists()  # before: new/deeper stayed


def test_disk_full_during_fix_is_one_line(pair: dict[str, Path], tmp_path: Path) -> None:
    """A write that fails (here: the file size limit, as a full disk would) is exit 2 naming OUT, nothing left."""
    out = tmp_path / "fixed"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    done = cli("fix", pair["adapter"], "--base", pair["base"], "-o", out, process=True, timeout=180, preexec_fn=limit,
               env={"LORAFIT_NO_CACHE": "1"})
    assert_one_line_error(*done, str(out), "cannot write the output")
    assert not out.exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- symlinks and special files

@pytest.mark.parametrize("target", ["secret", "environ"])
def test_symlink_out_of_the_adapter_is_not_copied(pair: dict[str, Path], tmp_path: Path, target: str) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(pair["adapter"], adapter)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN=hf_secret")
    (adapter / "notes.md").symlink_to(secret if target == "secret" else Path("/proc/self/environ"))
    out = tmp_path / "fixed"
    code, stdout, err = cli("fix", adapter, "--base", pair["base"], "-o", out)
    assert_one_line_error(code, stdout, err, "notes.md", "--follow-symlinks")
    assert not out.exists() and leftovers(tmp_path) == []  # before: OUT/notes.md held the secret
    if target == "secret":  # the user may opt in, for a link they trust
        assert cli("fix", adapter, "--base", pair["base"], "-o", out, "--follow-symlinks").code == 0
        assert (out / "notes.md").read_text() == "TOKEN=hf_secret" and not (out / "notes.md").is_symlink()


def test_symlink_inside_the_adapter_is_copied_as_a_file(pair: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(pair["adapter"], adapter)
    (adapter / "docs").mkdir()
    (adapter / "docs" / "card.md").write_text("card")
    (adapter / "CARD.md").symlink_to(adapter / "docs" / "card.md")
    out = tmp_path / "fixed"
    assert cli("fix", adapter, "--base", pair["base"], "-o", out).code == 0
    assert (out / "CARD.md").read_text() == "card" and not (out / "CARD.md").is_symlink()


def test_fifo_in_the_adapter_is_refused_not_read(pair: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(pair["adapter"], adapter)
    os.mkfifo(adapter / "notes.md")
    done = cli("fix", adapter, "--base", pair["base"], "-o", tmp_path / "fixed", process=True, timeout=120)
    assert_one_line_error(*done, "notes.md", "FIFO")


def test_symlink_out_of_the_base_is_not_merged(pair: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(pair["base"], base)
    (tmp_path / "secret.txt").write_text("TOKEN=hf_secret")
    (base / "tokenizer_extra.txt").symlink_to(tmp_path / "secret.txt")
    code, out, err = cli("merge", pair["adapter"], "--base", base, "-o", tmp_path / "merged")
    assert_one_line_error(code, out, err, "tokenizer_extra.txt", "--follow-symlinks")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_index_naming_a_shard_elsewhere_is_refused(pair: dict[str, Path], tmp_path: Path, shard: str) -> None:
    base = tmp_path / "base"
    shutil.copytree(pair["base"], base)
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (tmp_path / "outside.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    index = {"metadata": {}, "weight_map": {k: ("model.safetensors" if i else shard) for i, k in enumerate(keys)}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    code, out, err = cli("merge", pair["adapter"], "--base", base, "-o", tmp_path / "merged")
    assert_one_line_error(code, out, err, "model.safetensors.index.json", "plain file name")

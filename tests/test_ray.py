"""--ray: scan and merge --batch as Ray tasks on a local Ray instance (started once for this module) give what the
local run gives: the same records for a scan, the same bytes for every merged file. A task whose worker is killed
is run again and leaves no damage; a bad manifest is one line and nothing written; no Ray is one line too."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import ray

from conftest import make_adapter
from helpers import assert_one_line_error, cli, python, snapshot
from lorafit.api.batch import load_manifest, merge_entry
from lorafit.api.distributed import RayCluster, run_on_ray
from lorafit.api.scan import ScanOptions, _chunks, _judge_group, find_adapters

CAUSAL = "AutoModelForCausalLM"
NO_RAY = "import sys\nsys.modules['ray'] = None  # `import ray` fails as where it is not installed\n"


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One local Ray instance of 2 CPUs for the module; this module's functions travel to workers by value."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def fleet(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adapters on two bases, one with an error finding and one unreadable."""
    root = tmp_path_factory.mktemp("ray") / "fleet"
    make_adapter(bases["llama"], CAUSAL, root / "llama-ok", task_type="CAUSAL_LM")
    make_adapter(bases["llama"], CAUSAL, root / "llama-automodel")  # judged on AutoModel: an error
    make_adapter(bases["llama"], CAUSAL, root / "llama-other", seed=3, task_type="CAUSAL_LM")
    make_adapter(bases["gpt2"], CAUSAL, root / "sweep" / "checkpoint-100", task_type="CAUSAL_LM")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{")
    return root


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _manifest(path: Path, entries: list[dict[str, Any]], as_list: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries) if as_list else "".join(json.dumps(e) + "\n" for e in entries))
    return path


# ----------------------------------------------------------------------------- the same results


def test_scan_on_ray_gives_the_local_records(fleet: Path, tmp_path: Path) -> None:
    env = {"LORAFIT_NO_CACHE": "1"}
    local = cli("scan", fleet, "--json", env=env)
    on_ray = cli("scan", "--ray", fleet, "--json", env=env)  # --ray before a path: the path is no address
    assert local.code == on_ray.code == 1
    assert on_ray.out == local.out and len(local.out.splitlines()) == 5
    # the cache behaves the same way: what the Ray workers judged, a local re-run takes from the cache, and back
    cached = {"LORAFIT_CACHE": str(tmp_path / "cache")}
    first = cli("scan", fleet, "--ray", env=cached)
    assert first.code == 1 and "5 adapters on 2 bases" in first.out and "(0 from the cache)" in first.out
    assert "(5 from the cache)" in cli("scan", fleet, env=cached).out
    assert "(5 from the cache)" in cli("scan", fleet, "--ray", env=cached).out


def test_merge_batch_on_ray_is_byte_identical_to_local(bases: dict[str, Path], tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    make_adapter(bases["llama"], CAUSAL, adapters / "a", task_type="CAUSAL_LM")
    make_adapter(bases["llama"], CAUSAL, adapters / "b", seed=2, task_type="CAUSAL_LM", use_dora=True)
    make_adapter(bases["gpt2"], CAUSAL, adapters / "c", task_type="CAUSAL_LM")

    def entries(out: str) -> list[dict[str, Any]]:  # paths relative to the manifest, and options per entry
        return [{"adapter": "adapters/a", "base": str(bases["llama"]), "out": f"{out}/a"},
                {"adapter": "adapters/b", "base": str(bases["llama"]), "out": f"{out}/b", "dtype": "bf16",
                 "max_shard_size": "4KB"},
                {"adapter": "adapters/c", "base": str(bases["gpt2"]), "out": f"{out}/c", "class": "AutoModel"},
                {"adapter": "adapters/missing", "base": str(bases["gpt2"]), "out": f"{out}/missing"}]

    local = cli("merge", "--batch", _manifest(tmp_path / "local.jsonl", entries("local")), "--json")
    on_ray = cli("merge", "--batch", _manifest(tmp_path / "ray.json", entries("ray"), as_list=True), "--ray",
                 "--json")
    assert local.code == on_ray.code == 1  # the missing adapter fails; the others go on
    for run, out in ((local, "local"), (on_ray, "ray")):
        records = [json.loads(line) for line in run.out.splitlines()]
        assert [(r["entry"], r["status"]) for r in records] == [
            (1, "merged"), (2, "merged"), (3, "merged"), (4, "failed")], run.out
        assert records[3]["out"] == str(tmp_path / out / "missing") and "missing" in records[3]["error"]["message"]
        assert not (tmp_path / out / "missing").exists()
    for name in ("a", "b", "c"):
        assert _files(tmp_path / "ray" / name) == _files(tmp_path / "local" / name), name
    assert len(list((tmp_path / "local" / "b").glob("*.safetensors"))) > 1  # the options reached the merge
    # and an entry is the same merge as `lorafit merge` with those options
    code, _, _ = cli("merge", adapters / "b", "--base", bases["llama"], "-o", tmp_path / "one", "--dtype", "bf16",
                     "--max-shard-size", "4KB")
    assert code == 0 and _files(tmp_path / "one") == _files(tmp_path / "local" / "b")
    table = cli("merge", "--batch", _manifest(tmp_path / "again.jsonl", entries("again")[:1]), "--ray")
    assert table.code == 0 and "merged" in table.out and str(tmp_path / "again" / "a") in "".join(table.out.split())
    assert "merge --batch: 1 entry" in table.out and "on Ray" in table.out


# ----------------------------------------------------------------------------- a worker killed mid-way


def die_once(marker: Path, patch: Callable[[], None], fn: Callable[[Any], Any], item: Any) -> Any:
    """fn(item), except in the first task to start, where `patch` arms a SIGKILL of this worker mid-way (the
    .armed file is created exclusively, so of two tasks starting at once only one is armed). The marker records
    every attempt, so the test can count them."""
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    try:
        os.close(os.open(marker.with_suffix(".armed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return fn(item)
    patch()
    return fn(item)


def kill_at_manifest() -> None:
    """The merge dies once its shards are written in the staging directory, before it is renamed into place."""
    import lorafit.api.merge

    def die(*_: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    lorafit.api.merge.write_manifest = die  # type: ignore[assignment]


def kill_at_second_adapter() -> None:
    """The scan task dies after judging the first adapter of its chunk."""
    import lorafit.api.scan

    judge, calls = lorafit.api.scan.judge, []

    def counted(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return judge(*args)

    lorafit.api.scan.judge = counted  # type: ignore[assignment]


def test_a_merge_whose_worker_is_killed_is_retried(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], CAUSAL, tmp_path / "a", task_type="CAUSAL_LM")
    here = load_manifest(_manifest(tmp_path / "here.jsonl", [{"adapter": "a", "out": "here/a"}]))
    there = load_manifest(_manifest(tmp_path / "there.jsonl", [{"adapter": "a", "out": "there/a"}]))
    assert merge_entry(here[0])["status"] == "merged"
    marker = tmp_path / "attempts"
    [record] = run_on_ray(partial(die_once, marker, kill_at_manifest, merge_entry), there, RayCluster(retries=2))
    assert len(marker.read_text().split()) == 2  # killed once, run again
    assert record["status"] == "merged" and record["exit_code"] == 0
    assert _files(tmp_path / "there" / "a") == _files(tmp_path / "here" / "a")
    # the killed attempt's staging directory was found and removed by the retry: nothing else is left
    assert [f["code"] for f in record["report"]["findings"]].count("stale-output-removed") == 1
    assert sorted(p.name for p in (tmp_path / "there").iterdir()) == ["a"]


def test_a_scan_task_whose_worker_is_killed_is_retried(fleet: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFIT_NO_CACHE", "1")  # the driver's variables reach the tasks
    options = ScanOptions()
    chunks = list(_chunks(find_adapters([fleet]), 2))
    local = [r for chunk in chunks for r, _ in _judge_group(chunk, options)]
    marker = tmp_path / "attempts"
    parts = run_on_ray(partial(die_once, marker, kill_at_second_adapter, partial(_judge_group, options=options)),
                       chunks, RayCluster())
    assert len(marker.read_text().split()) == len(chunks) + 1  # one task killed once, run again
    assert [r for part in parts for r, _ in part] == local


def test_the_cli_starts_its_own_ray_and_a_death_stays_off_stdout(bases: dict[str, Path], tmp_path: Path) -> None:
    """`lorafit merge --batch M --ray --json` in a fresh process: it starts (and stops) a local Ray instance itself;
    the first attempt's worker is killed, the retry merges, and Ray's notice of the death goes to stderr, so stdout
    stays pure JSON lines."""
    make_adapter(bases["gpt2"], CAUSAL, tmp_path / "a", task_type="CAUSAL_LM")
    cli("merge", tmp_path / "a", "-o", tmp_path / "here")
    manifest = _manifest(tmp_path / "m.jsonl", [{"adapter": "a", "out": "there"}])
    hook = f"""
        import os, signal
        import lorafit.api.batch as batch
        real = batch.merge_entry
        def merge_entry(entry):  # defined in __main__, so it travels to the worker by value
            try:
                os.close(os.open({str(tmp_path / "armed")!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return real(entry)
            os.kill(os.getpid(), signal.SIGKILL)
        batch.merge_entry = merge_entry
    """
    run = cli("merge", "--batch", manifest, "--ray", "--json", hook=hook, timeout=240)
    assert run.code == 0, run.err
    [record] = [json.loads(line) for line in run.out.splitlines()]
    assert record["status"] == "merged" and (tmp_path / "armed").exists()
    assert "died" in run.err or "killed" in run.err
    assert _files(tmp_path / "there") == _files(tmp_path / "here")


def test_a_task_that_keeps_dying_is_an_entry_error(bases: dict[str, Path], tmp_path: Path) -> None:
    from lorafit.api.batch import _failed_task

    make_adapter(bases["llama"], CAUSAL, tmp_path / "a", task_type="CAUSAL_LM")
    entries = load_manifest(_manifest(tmp_path / "m.jsonl", [{"adapter": "a", "out": "out/a"},
                                                             {"adapter": "a", "out": "out/b"}]))

    def always(entry: Any) -> Any:
        if entry.index == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return merge_entry(entry)

    records = run_on_ray(always, entries, RayCluster(retries=1), failed=_failed_task)
    assert [r["status"] for r in records] == ["failed", "merged"]
    assert "died" in records[0]["error"]["message"].lower() and not (tmp_path / "out" / "a").exists()


# ----------------------------------------------------------------------------- bad input, no Ray


def test_a_bad_manifest_is_one_line_and_nothing_is_written(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], CAUSAL, tmp_path / "a", task_type="CAUSAL_LM")
    (tmp_path / "taken").mkdir()
    good = {"adapter": "a", "out": "new"}
    cases: list[tuple[str, str]] = [
        ("{not json\n", "line 1 is not valid JSON"),
        ("", "has no entries"),
        (json.dumps({"adapter": "a"}) + "\n", "entry 1: missing 'out'"),
        (json.dumps(good) + "\n" + json.dumps({"adapter": "a", "out": "taken"}) + "\n",
         "entry 2: out " + str(tmp_path / "taken") + " already exists"),
        (json.dumps([good, {**good, "out": "new2", "dtyp": "bf16"}]), "entry 2: unknown key 'dtyp'"),
        (json.dumps([{**good, "workers": True}]), "entry 1: 'workers' must be a positive integer"),
        (json.dumps([{**good, "dtype": "int4"}]), "entry 1: dtype 'int4' is not one of"),
        (json.dumps([good, good]), "entries 1 and 2 both write"),
        (json.dumps({"adapter": "a", "out": "x"}, indent=2), "line 1 is not valid JSON"),
        ('["a"]', "entry 1: is str, not an object"),
    ]
    for i, (text, expected) in enumerate(cases):
        manifest = tmp_path / f"m{i}.jsonl"
        manifest.write_text(text)
        before = snapshot(tmp_path)
        for extra in ([], ["--ray"]):
            assert_one_line_error(*cli("merge", "--batch", manifest, *extra), str(manifest), expected)
        assert snapshot(tmp_path) == before, expected
    assert_one_line_error(*cli("merge", "--batch", tmp_path / "nope.jsonl"), "nope.jsonl: does not exist")


def test_without_ray_installed_ray_is_one_line(fleet: Path, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "m.jsonl", [{"adapter": str(fleet / "llama-ok"), "out": "out"}])
    for args in (["scan", fleet, "--ray"], ["merge", "--batch", manifest, "--ray", "auto"]):
        assert_one_line_error(*cli(*args, hook=NO_RAY), "--ray needs Ray", "pip install 'lorafit[ray]'")
    assert not (tmp_path / "out").exists()


def test_ray_is_imported_only_for_ray() -> None:
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom lorafit.cli import app\n"
            "r = CliRunner().invoke(app, ['scan', '--help'])\nprint(r.exit_code, '--ray' in r.stdout, 'ray' in "
            "sys.modules)")
    assert python(code, check=True).out.split() == ["0", "True", "False"]


def test_usage(fleet: Path, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "m.jsonl", [{"adapter": "a", "out": "o"}])
    assert_one_line_error(*cli("merge", "--batch", manifest, "-o", tmp_path / "x"), "not --out")
    assert_one_line_error(*cli("merge", "--batch", manifest, "--dtype", "bf16"), "not --dtype")
    # given on the command line, even at its default value, it would be silently ignored: refused
    assert_one_line_error(*cli("merge", "--batch", manifest, "--workers", "2"), "not --workers")
    assert_one_line_error(*cli("merge", fleet / "llama-ok", "--batch", manifest), "not ADAPTER")
    assert_one_line_error(*cli("merge", fleet / "llama-ok", "-o", tmp_path / "x", "--ray"), "--batch")
    assert_one_line_error(*cli("merge"), "merge needs ADAPTER and --out")
    # an address nobody listens on is refused at once, not after Ray's minutes of retries (a process of its own:
    # this one's Ray is already up)
    assert_one_line_error(*cli("scan", fleet, "--ray", "127.0.0.1:1", process=True, timeout=60),
                          "cannot reach the Ray cluster at 127.0.0.1:1")

"""merge --batch: many merges from one manifest, each the same `merge` call that `lorafit merge` makes (it streams
its base and writes its output atomically), run here one after another or as Ray tasks, one task per entry.

The manifest is JSON Lines (one entry per line; blank lines skipped) or one JSON list of entries. An entry is an
object: "adapter" and "out" are required; "base" (default: the base the adapter names), "class", "key_mapping",
"dtype", "safe_merge", "max_shard_size", "force", "overwrite", "workers", "revision", "config" and
"follow_symlinks" mean what merge's options of those names mean. A relative path is taken relative to the
manifest's directory (an adapter or base that is no path there is passed as given: a hub id in the local HF cache).

The whole manifest is checked before anything runs: a manifest that cannot be read, an entry with a missing or
unknown key, a value of the wrong type, or an out that exists (without "overwrite") stops the batch with nothing
written. Once running, an entry that fails is a record with its error and the others go on.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LorafitError
from ..fileio.inputs import parse_json, parse_json_lines, read_bytes
from ..report import Report

if TYPE_CHECKING:
    from .distributed import RayCluster

# manifest key -> (merge's keyword, the JSON types it takes, what the message calls them)
_OPTIONS: dict[str, tuple[str, tuple[type, ...], str]] = {
    "class": ("class_name", (str,), "a string"),
    "key_mapping": ("key_mapping", (list, dict), "a list of REGEX=REPLACEMENT strings or an object"),
    "dtype": ("dtype", (str,), "a string"),
    "safe_merge": ("safe_merge", (bool,), "true or false"),
    "max_shard_size": ("max_shard_size", (str, int), "a size such as \"5GB\" or a number of bytes"),
    "force": ("force", (bool,), "true or false"),
    "overwrite": ("overwrite", (bool,), "true or false"),
    "workers": ("workers", (int,), "a positive integer"),
    "revision": ("revision", (str,), "a string"),
    "config": ("config_overrides", (list, dict), "a list of KEY=VALUE strings or an object"),
    "follow_symlinks": ("follow_symlinks", (bool,), "true or false"),
}
KEYS = ("adapter", "out", "base", *_OPTIONS)


@dataclass(frozen=True)
class BatchEntry:
    """One merge of a batch: `merge(adapter, base, out, **options)`; paths absolute, so any worker can run it."""

    index: int  # 1-based, in manifest order
    adapter: str
    out: str
    base: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def load_manifest(path: str | Path) -> list[BatchEntry]:
    """Read and check a batch manifest (format: this module's docstring).

    Returns:
        the entries, in order.
    Raises:
        LorafitError naming the file: missing or unreadable, not JSON Lines or a JSON list, no entries, an entry
        that is not an object, lacks adapter or out, has an unknown key or a value of the wrong type, writes an out
        that exists (without "overwrite") or that another entry writes too.
    """
    path = Path(path).expanduser()
    raw = read_bytes(path)
    if raw.lstrip()[:1] == b"[":
        items = parse_json(raw, path, LorafitError)
        if not isinstance(items, list):
            raise LorafitError("is not a JSON list of entries (nor JSON Lines)", path)
    else:
        items = parse_json_lines(raw, path, LorafitError)
    if not items:
        raise LorafitError("has no entries; each needs at least \"adapter\" and \"out\"", path)
    here = path.absolute().parent
    entries = [_entry(i, item, here, path) for i, item in enumerate(items, 1)]
    writers: dict[str, int] = {}
    for e in entries:
        if e.out in writers:
            raise LorafitError(f"entries {writers[e.out]} and {e.index} both write {e.out}", path)
        writers[e.out] = e.index
        if os.path.lexists(e.out) and not e.options.get("overwrite"):
            raise LorafitError(f"entry {e.index}: out {e.out} already exists; remove it, or set \"overwrite\": true "
                               "in the entry", path)
    return entries


def _entry(index: int, item: Any, here: Path, manifest: Path) -> BatchEntry:
    """One manifest item as a BatchEntry. Raises LorafitError naming the manifest and the entry."""
    def bad(problem: str) -> LorafitError:
        return LorafitError(f"entry {index}: {problem}", manifest)

    if not isinstance(item, dict):
        raise bad(f"is {type(item).__name__}, not an object with \"adapter\" and \"out\"")
    unknown = sorted(set(item) - set(KEYS))
    if unknown:
        raise bad(f"unknown key {unknown[0]!r} (an entry takes {', '.join(KEYS)})")
    for key in ("adapter", "out"):
        if key not in item:
            raise bad(f"missing {key!r}")
    for key in ("adapter", "out", "base"):
        if key in item and not (isinstance(item[key], str) and item[key].strip()):
            raise bad(f"{key!r} must be a non-empty string")
    options: dict[str, Any] = {}
    for key, (kwarg, types, what) in _OPTIONS.items():
        if key not in item:
            continue
        value = item[key]
        # bool is an int to Python; JSON's true is no worker count
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types) or (
                key == "workers" and isinstance(value, int) and value < 1):
            raise bad(f"{key!r} must be {what}")
        options[kwarg] = value
    _check_values(options, bad)
    return BatchEntry(index, _input(item["adapter"], here), str(_absolute(item["out"], here)),
                      _input(item["base"], here) if "base" in item else None, options)


def _check_values(options: dict[str, Any], bad: Callable[[str], LorafitError]) -> None:
    """The option values merge would refuse only once running (a dtype, a size, a config item): refused now."""
    from ..fileio.checkpoint import parse_size
    from .check import parse_config_overrides
    from .merge import parse_dtype

    for key, check in (("dtype", parse_dtype), ("max_shard_size", parse_size),
                       ("config", parse_config_overrides)):
        value = options.get(_OPTIONS[key][0])
        if value is None:
            continue
        try:
            check(value)
        except LorafitError as e:  # the CLI option's message, in the manifest's words: "--dtype 'x'" -> "dtype 'x'"
            flag = re.match(r"--[\w-]+ ", e.message)
            raise bad(f"{key} {e.message[flag.end():]}" if flag else f"{key}: {e.message}") from None
    mapping = options.get("key_mapping")
    if isinstance(mapping, list) and not all(isinstance(m, str) for m in mapping):
        raise bad("'key_mapping' must be a list of REGEX=REPLACEMENT strings or an object")


def _absolute(value: str, here: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else here / p


def _input(value: str, here: Path) -> str:
    """An adapter or base: a path (relative to the manifest's directory), or a hub id when no such path exists."""
    p = _absolute(value, here)
    return str(p) if Path(value).expanduser().is_absolute() or os.path.lexists(p) else value


def merge_entry(entry: BatchEntry) -> dict[str, Any]:
    """Run one entry: the record of its merge (the report, as `merge --json`) or of its error. Never raises for the
    entry's own failure, so that one bad entry does not stop a batch."""
    from .merge import merge

    record: dict[str, Any] = {"entry": entry.index, "adapter": entry.adapter, "base": entry.base, "out": entry.out}
    try:
        report = merge(entry.adapter, entry.base, entry.out, **entry.options)
    except LorafitError as e:
        return record | {"status": "failed", "exit_code": 2,
                         "error": {"type": type(e).__name__, "message": str(e), "path": e.path}}
    except Exception as e:  # a case no rule foresaw: this entry's row, not the end of the batch
        first = (str(e).splitlines() or [""])[0][:300]
        return record | {"status": "failed", "exit_code": 2,
                         "error": {"type": type(e).__name__, "message": f"unexpected {type(e).__name__}: {first}",
                                   "path": None}}
    status = "merged" if report.result.get("written") else "refused"
    return record | {"status": status, "exit_code": report.exit_code, "report": report.to_json()}


def _failed_task(entry: BatchEntry, error: BaseException) -> dict[str, Any]:
    """The record of an entry whose Ray task failed for good (its worker died on every attempt)."""
    from .distributed import task_error

    return {"entry": entry.index, "adapter": entry.adapter, "base": entry.base, "out": entry.out,
            "status": "failed", "exit_code": 2,
            "error": {"type": type(error).__name__, "message": task_error(error), "path": None}}


def merge_batch(manifest: str | Path, cluster: RayCluster | None = None,
                progress: Callable[[int, int], None] | None = None) -> BatchResult:
    """Every merge of `manifest`: here one after another, or on Ray (one task per entry) with `cluster`.

    Returns:
        a BatchResult: one record per entry, in manifest order.
    Raises:
        LorafitError: the manifest is bad (load_manifest), nothing written; Ray not installed or unreachable.
    """
    entries = load_manifest(manifest)
    t0 = time.perf_counter()
    done = 0

    def tick(*_: Any) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(entries))

    if cluster is None:
        records = []
        for entry in entries:
            records.append(merge_entry(entry))
            tick()
    else:
        from .distributed import run_on_ray

        records = run_on_ray(merge_entry, entries, cluster, on_done=tick, failed=_failed_task)
    return BatchResult(str(manifest), records, time.perf_counter() - t0, ray=cluster is not None)


@dataclass
class BatchResult:
    manifest: str
    records: list[dict[str, Any]]
    seconds: float = 0.0
    ray: bool = False

    @property
    def exit_code(self) -> int:
        """0 when every entry merged cleanly, 1 when any was refused (an error finding) or failed."""
        return 0 if all(r["exit_code"] == 0 for r in self.records) else 1

    def summary(self) -> dict[str, Any]:
        count = {s: sum(1 for r in self.records if r["status"] == s) for s in ("merged", "refused", "failed")}
        return {"entries": len(self.records), **count, "seconds": round(self.seconds, 3), "ray": self.ray}

    def reports(self) -> list[Report]:
        """Each entry's merge Report (for the CI formats); failed entries have none."""
        from .scan import ScanResult

        return ScanResult(self.records).reports()  # records carry their report's JSON, as scan's do

"""scan: vet a fleet of adapters at once. Find the adapter directories under the paths, judge each on its base
(the one given, or the one it names) and on the runtimes asked for, in parallel processes, with one module tree per
(base, class) shared by every adapter that uses it; results are cached by the adapter's content, so a re-run only
does the new work. An adapter that cannot be read is a row with its error; the scan goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LorafitError
from ..report import Report
from ..targets.transformers.tree_cache import cache_root, write_cache_file
from ..version import __version__

if TYPE_CHECKING:
    from .distributed import RayCluster

ADAPTER_MARKERS = ("adapter_config.json", "adapters.safetensors")  # PEFT, mlx-lm
SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv"}


def find_adapters(paths: Sequence[str | Path]) -> list[Path]:
    """Every adapter directory at or below `paths` (named sub-adapters and checkpoint-N folders included), each once,
    in sorted order. Raises LorafitError for a path that does not exist."""
    found: dict[Path, None] = {}
    for spec in paths:
        root = Path(spec).expanduser()
        if not root.exists():
            raise LorafitError("no such file or directory", root)
        if root.is_file():
            root = root.parent
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".partial"))
            if any(m in filenames for m in ADAPTER_MARKERS):
                found[Path(dirpath)] = None
    return sorted(found)


def hf_cache_adapters() -> list[Path]:
    """Adapter snapshots in the local HF cache (the newest snapshot of each repo that holds an adapter)."""
    from ..fileio.hub import hf_hub_cache_dir

    root = Path(hf_hub_cache_dir())
    if not root.is_dir():
        return []
    out = []
    for repo in sorted(root.glob("models--*")):
        snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
        out += [s for s in snaps[-1:] if any((s / m).exists() for m in ADAPTER_MARKERS)]
    return out


@dataclass
class ScanOptions:
    base: str | None = None
    class_name: str | None = None
    runtimes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    read_tensors: bool = True

    def key(self) -> str:
        return json.dumps([self.base, self.class_name, self.runtimes, self.settings, self.read_tensors, __version__],
                          sort_keys=True)


def _files(adapter_dir: Path) -> list[Path]:
    """The files an adapter's content is: every regular file in its directory (symlinks to one, as in an HF cache
    snapshot, included)."""
    return [p for p in sorted(adapter_dir.iterdir()) if p.is_file()]


def content_hash(adapter_dir: Path, digests: dict[str, str] | None = None) -> str:
    """SHA-256 over the adapter's files (names and each file's SHA-256): a result is reused only for the same
    content. `digests` holds file digests already computed (by name), which are not read again."""
    h = hashlib.sha256()
    for p in _files(adapter_dir):
        digest = (digests or {}).get(p.name)
        if digest is None:
            with open(p, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()  # C loop: 2x faster than Python reads
        h.update(p.name.encode() + b"\0" + bytes.fromhex(digest))
    return h.hexdigest()


def _stat_key(adapter_dir: Path) -> str:
    """The adapter directory's path and its files' names, sizes, inodes and change times: what says, without
    reading a byte, that a file is the one hashed before (git's index does the same)."""
    h = hashlib.sha256(str(adapter_dir.resolve()).encode())
    for p in _files(adapter_dir):
        st = p.stat()
        h.update(f"\0{p.name}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}".encode())
    return h.hexdigest()


def _cache_dir() -> Path | None:
    if os.environ.get("LORAFIT_NO_CACHE"):
        return None
    return cache_root() / "scan"


def _record_name(adapter_dir: Path, content: str, options: ScanOptions) -> str:
    # the path is part of the key: a record names its adapter, and two copies of one adapter are two rows
    return hashlib.sha256((str(adapter_dir.resolve()) + content + options.key()).encode()).hexdigest() + ".json"


def judge(adapter_dir: Path, options: ScanOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """One adapter's record: its report as `check --json` (or `inspect --json` with no base), or its error; and
    the digests of the files that judging read in full (by name), for the cache key."""
    from ..formats import read_adapter
    from ..formats.health import health_and_digest
    from .check import check, inspect
    from .runtimes import check_runtimes

    record: dict[str, Any] = {"adapter": str(adapter_dir)}
    digests: dict[str, str] = {}
    try:
        a = read_adapter(adapter_dir)
        if options.read_tensors and a.weights_path.parent == adapter_dir:
            digests[a.weights_path.name] = health_and_digest(a)[1]  # one read for the health and the key
        base = options.base or a.base_model
        if options.runtimes:
            report = check_runtimes(a, options.runtimes, base, options.class_name, None, options.settings)
        elif base:
            report = check(a, options.base, options.class_name)  # None: the base it names, as check says
        else:
            report = inspect(a, read_tensors=options.read_tensors)
        record |= {"base": base, "exit_code": report.exit_code, "report": report.to_json()}
    except LorafitError as e:
        record |= {"exit_code": 2, "error": {"type": type(e).__name__, "message": str(e), "path": e.path}}
    return record, digests


def _judge_cached(adapter_dir: Path, options: ScanOptions) -> tuple[dict[str, Any], bool]:
    """(record, from the cache?). The stat index maps unchanged files to their content hash without reading them;
    a new or changed adapter is read once, for its verdict and its hash together."""
    where = _cache_dir()
    if where is None:
        return judge(adapter_dir, options)[0], False
    try:
        stat_file = where / "stat" / _stat_key(adapter_dir)
        content = stat_file.read_text() if stat_file.is_file() else None
    except OSError:
        return judge(adapter_dir, options)[0], False
    if content:
        try:
            entry = json.loads((where / _record_name(adapter_dir, content, options)).read_text())
            if entry["base"] == _base_fingerprint(entry["base_config"]):
                return entry["record"], True
        except (OSError, ValueError, KeyError, TypeError):
            pass
    record, digests = judge(adapter_dir, options)
    try:
        content = content_hash(adapter_dir, digests)
        base_config = _base_config(record)
        entry = {"record": record, "base_config": base_config, "base": _base_fingerprint(base_config)}
        write_cache_file(where / _record_name(adapter_dir, content, options), json.dumps(entry, default=str))
        write_cache_file(stat_file, content)
    except OSError:
        pass  # a cache that cannot be written (or an adapter gone meanwhile) only costs time
    return record, False


def _base_config(record: dict[str, Any]) -> str | None:
    """The config.json of the base directory a record was judged on (None: judged without a base)."""
    source = ((record.get("report") or {}).get("target") or {}).get("source")
    return str(Path(source) / "config.json") if isinstance(source, str) and source else None


def _base_fingerprint(base_config: str | None) -> str:
    """What else a verdict depends on: the base's config.json bytes and the transformers and PEFT that judged it.
    A cached verdict whose base or libraries changed since is judged again."""
    from ..version import installed_version

    h = hashlib.sha256(f"{installed_version('transformers')}\0{installed_version('peft')}\0".encode())
    if base_config is not None:
        try:
            h.update(Path(base_config).read_bytes())
        except OSError:
            h.update(b"\0missing")
    return h.hexdigest()


def _judge_group(dirs: list[Path], options: ScanOptions) -> list[tuple[dict[str, Any], bool]]:
    """A worker's share: adapters of one base, so the worker builds (or reads) that base's tree once."""
    return [_judge_cached(d, options) for d in dirs]


def _base_of(adapter_dir: Path, options: ScanOptions) -> str:
    """The base an adapter is judged on, for grouping (cheap: only its config is read)."""
    if options.base:
        return options.base
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        return str(config.get("base_model_name_or_path") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def scan(paths: Sequence[str | Path], options: ScanOptions | None = None, workers: int | None = None,
         hf_cache: bool = False, progress: Callable[[int, int], None] | None = None,
         cluster: RayCluster | None = None) -> ScanResult:
    """Judge every adapter found under `paths` (and in the HF cache with `hf_cache`), in local processes or, with
    `cluster`, as Ray tasks (the same chunks and the same function, so the same records).

    Returns:
        a ScanResult: one record per adapter (the check JSON, or the error), grouped by base.
    Raises:
        LorafitError: a path that does not exist; no adapter found; Ray not installed or unreachable.
    """
    options = options or ScanOptions()
    t0 = time.perf_counter()
    dirs = find_adapters(paths) + (hf_cache_adapters() if hf_cache else [])
    if not dirs:
        raise LorafitError(f"no adapter directory (holding {' or '.join(ADAPTER_MARKERS)}) found under "
                           f"{', '.join(map(str, paths)) or 'the HF cache'}")
    groups: dict[str, list[Path]] = {}
    for d in dirs:
        groups.setdefault(_base_of(d, options), []).append(d)
    chunks = [] if cluster else [chunk for group in groups.values()
                                 for chunk in _chunks(group, workers or os.cpu_count() or 1)]
    results: list[tuple[dict[str, Any], bool]] = []
    n = workers or min(len(chunks), os.cpu_count() or 1)
    if cluster is not None:  # the same work as Ray tasks, chunked over the cluster's CPUs
        results = _scan_on_ray(groups, options, workers, cluster, progress)
    elif n <= 1:
        for chunk in chunks:
            results += _judge_group(chunk, options)
            if progress:
                progress(len(results), len(dirs))
    else:
        with ProcessPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(_judge_group, chunk, options) for chunk in chunks]
            for fut in as_completed(futures):
                results += fut.result()
                if progress:
                    progress(len(results), len(dirs))
    records = sorted((r for r, _ in results), key=lambda r: r["adapter"])
    return ScanResult(records, cached=sum(c for _, c in results), seconds=time.perf_counter() - t0,
                      groups={b: [str(d) for d in ds] for b, ds in groups.items()})


def _scan_on_ray(groups: dict[str, list[Path]], options: ScanOptions, workers: int | None, cluster: RayCluster,
                 progress: Callable[[int, int], None] | None) -> list[tuple[dict[str, Any], bool]]:
    """The local scan's work as Ray tasks: each base's adapters in chunks (one per cluster CPU, or `workers`), each
    chunk a task running _judge_group, so a worker builds or reads that base's tree once."""
    from .distributed import connected, run_on_ray

    total = sum(len(g) for g in groups.values())
    done = 0

    def tick(_: int, chunk: list[tuple[dict[str, Any], bool]]) -> None:
        nonlocal done
        done += len(chunk)
        if progress is not None:
            progress(done, total)

    with connected(cluster) as cpus:
        chunks = [chunk for group in groups.values() for chunk in _chunks(group, workers or cpus)]
        parts = run_on_ray(partial(_judge_group, options=options), chunks, cluster, on_done=tick)
    return [r for part in parts for r in part]


def _chunks(items: list[Path], parts: int) -> Iterable[list[Path]]:
    """`items` in up to `parts` contiguous chunks (adapters of one base stay together in a worker)."""
    size = max(1, -(-len(items) // max(1, parts)))
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass
class ScanResult:
    records: list[dict[str, Any]]
    cached: int = 0
    seconds: float = 0.0
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when every adapter is clean, 1 when any has an error finding or cannot be read."""
        return 0 if all(r["exit_code"] == 0 for r in self.records) else 1

    def summary(self) -> dict[str, Any]:
        bad = sum(1 for r in self.records if "error" in r)
        failing = sum(1 for r in self.records if r["exit_code"] == 1)
        return {"adapters": len(self.records), "ok": len(self.records) - bad - failing, "with_errors": failing,
                "unreadable": bad, "from_cache": self.cached, "seconds": round(self.seconds, 3),
                "bases": len([b for b in self.groups if b])}

    def reports(self) -> list[Report]:
        """Each readable adapter's Report (for the CI formats)."""
        from ..findings import Finding

        out = []
        for r in self.records:
            if "report" not in r:
                continue
            data = r["report"]
            findings = [Finding(f["code"], f["message"], f["keys"], f.get("hint"), f["severity"], f.get("count"),
                                f.get("runtime"), f.get("source"), f.get("effect"), f.get("caused_by"))
                        for f in data["findings"]]
            out.append(Report(data["command"], adapter=data["adapter"], target=data["target"], findings=findings))
        return out

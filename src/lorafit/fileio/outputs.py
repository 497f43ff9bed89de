"""Atomic output directories that never destroy what lorafit did not create.

An output is built in a staging directory next to OUT and renamed into place when complete:
- without force the final rename refuses to replace anything (renameat2 RENAME_NOREPLACE, or an
  exclusive mkdir then a rename over that empty directory), so an OUT that another process wrote
  meanwhile survives, and of two concurrent writers one succeeds and the other gets a clear error;
- with force the old OUT is swapped out atomically (RENAME_EXCHANGE) and removed afterwards.
Staging directories carry lorafit's marker in their names: host, boot, pid and the process's start
time. A later run to the same OUT removes those whose owner is dead (SIGKILL, power loss) and restores
an old OUT that a killed forced run had moved aside but not yet replaced.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import LorafitError, OutputExistsError

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_TAG = "lorafit"
_NAME = re.compile(rf"\.(?P<out>.+)\.(?P<what>partial|old)-{_TAG}-(?P<host>[0-9a-f]{{8}})(?P<boot>[0-9a-f]{{8}})-"
                   r"(?P<pid>\d+)-(?P<start>\d+)-[0-9a-z]+")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell it from a later one with its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return now is None or start == 0 or now == start


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{_TAG}-{_short_hash(socket.gethostname())}{_short_hash(_boot_id())}-{pid}-{_start_time(pid) or 0}"


def _staging_name(out: Path, what: str) -> Path:
    return out.parent / f".{out.name}.{what}-{_owner_tag()}-{secrets.token_hex(3)}"


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """rename with flags; False when this kernel, libc or filesystem cannot do it (the caller falls back).

    Raises:
        OSError: the rename itself failed (EEXIST with RENAME_NOREPLACE, ...).
    """
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename the directory `src` to `dst`, failing with FileExistsError if `dst` exists, even if it appears now."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise
    os.mkdir(dst)  # claims the name exclusively; rename may then replace this empty directory only
    try:
        os.rename(src, dst)
    except OSError as e:
        try:
            os.rmdir(dst)  # only if still empty: someone else's files are never removed
        except OSError:
            pass
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise


def remove_stale(out: Path) -> list[str]:
    """Remove staging directories for `out` whose lorafit process is dead; returns what was done, one line each.

    An old OUT that a killed forced run had moved aside is put back when nothing has replaced it since.
    Directories of live processes, of other hosts, or without lorafit's marker are left alone.
    """
    parent = out.parent
    if not parent.is_dir():
        return []
    here, boot = _short_hash(socket.gethostname()), _short_hash(_boot_id())
    done = []
    for entry in parent.iterdir():
        m = _NAME.fullmatch(entry.name)
        if not m or m["out"] != out.name or m["host"] != here or not entry.is_dir() or entry.is_symlink():
            continue
        if m["boot"] == boot and _alive(int(m["pid"]), int(m["start"])):
            continue
        if m["what"] == "old" and (entry / "x").exists() and not os.path.lexists(out):
            try:
                rename_noreplace(entry / "x", out)
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"restored {out} from {entry.name}, left by a lorafit process that was killed")
                continue
            except OSError:
                pass
        shutil.rmtree(entry, ignore_errors=True)
        done.append(f"removed {entry.name}, left by a lorafit process that was killed")
    return done


class OutputDir:
    """Build an output directory in a marked staging directory; on success rename it to `out` atomically.

    Use: `staging = OutputDir(out, force, protect)`, then `with staging as tmp:` write into tmp. On any
    exception (including a signal turned into one), or after `staging.discard()`, the staging directory and
    any parent directories this created are removed and nothing is renamed into place. `staging.cleaned`
    lists the stale leftovers removed on the way in.

    Raises (at construction):
        OutputExistsError: `out` exists and force is False.
        LorafitError: `out` is, contains or lies inside an input (`protect`).
    """

    def __init__(self, out: str | Path, force: bool = False, protect: Iterable[Path] = ()) -> None:
        self.out, self.force = Path(out), force
        target = self.out.resolve()
        for p in protect:
            p = Path(p).resolve()
            if p == target or target in p.parents:
                raise LorafitError(f"output would replace the input {p}; write somewhere else", self.out)
            if p in target.parents:
                raise LorafitError(f"output would be written inside the input {p}; write somewhere else", self.out)
        from .hub import hf_hub_cache_dir, in_hub_cache

        if in_hub_cache(self.out):
            raise LorafitError(f"output would be written inside the HF cache ({hf_hub_cache_dir()}), which manages its "
                               "own files; write somewhere else", self.out)
        self.cleaned = remove_stale(self.out)
        if os.path.lexists(self.out) and not force:
            raise OutputExistsError("output already exists; pass --overwrite to replace it", self.out)
        self.tmp: Path | None = None
        self._made: list[Path] = []
        self._discarded = False

    def discard(self) -> None:
        """Write nothing: on leaving the `with` block the staging directory is removed, not renamed into place."""
        self._discarded = True

    def __enter__(self) -> Path:
        parent = self.out.parent
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        try:
            for p in reversed(missing):
                os.mkdir(p)
                self._made.append(p)
            self.tmp = _staging_name(self.out, "partial")
            os.mkdir(self.tmp)  # mode from the umask, like any mkdir: a serving user may need to read it
        except OSError as e:
            self._undo()
            raise LorafitError(f"cannot write the output here ({e.strerror})", self.out) from None
        return self.tmp

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None and not self._discarded:
            try:
                self._commit()
                return
            except BaseException:
                self._undo()
                raise
        self._undo()
        if kind is None:
            return
        if isinstance(exc, OSError):
            raise LorafitError(f"cannot write the output ({exc.strerror or exc})", self.out) from None
        if isinstance(exc, LorafitError) and exc.path is None:
            raise exc.at(self.out) from None  # a write error from code that knows only the staging dir

    def _commit(self) -> None:
        assert self.tmp is not None
        if not os.path.lexists(self.out) or not self.force:
            try:
                rename_noreplace(self.tmp, self.out)
            except FileExistsError:
                raise OutputExistsError("output appeared while lorafit was writing it (another process?); it was "
                                        "left as it is and nothing was written; pass --overwrite to replace it",
                                        self.out) from None
            return
        if _renameat2(self.tmp, self.out, _RENAME_EXCHANGE):  # tmp now holds the old OUT
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        aside = _staging_name(self.out, "old")
        os.mkdir(aside)
        os.rename(self.out, aside / "x")  # a kill from here to the next rename is repaired by remove_stale
        os.rename(self.tmp, self.out)
        shutil.rmtree(aside, ignore_errors=True)

    def _undo(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        for p in reversed(self._made):
            try:
                os.rmdir(p)  # only if still empty
            except OSError:
                break
        self._made.clear()


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, since setting it to read it races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_created(path: Path) -> None:
    """Give `path` the mode a plain open() would under the umask: safetensors writes its files 0600, and a serving
    user other than the writer must be able to read the output."""
    os.chmod(path, 0o666 & ~current_umask())


def save_tensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with the file's mode as a plain open() gives it and a one-line error on failure.

    Raises:
        LorafitError: the file cannot be written (disk full, ...).
    """
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # safetensors reports a failed write (disk full) as its own SafetensorError
        raise LorafitError(f"cannot write the output ({(str(e).splitlines() or [''])[0][:160]})") from None
    as_created(path)


def write_json(path: Path, data: object) -> None:
    """Write JSON the way PEFT and transformers do (indent 2, sorted keys, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class OutputFile(OutputDir):
    """One output file, written inside a marked staging directory next to it and put in place when complete: without
    force by a hard link, which fails if OUT exists (even if it appeared meanwhile); with force by an atomic replace.
    `with OutputFile(out) as tmp_file:` write tmp_file."""

    def __enter__(self) -> Path:
        return super().__enter__() / self.out.name

    def _commit(self) -> None:
        assert self.tmp is not None
        src = self.tmp / self.out.name
        try:
            if self.force:
                os.replace(src, self.out)
            else:
                os.link(src, self.out)
        except FileExistsError:
            raise OutputExistsError("output appeared while lorafit was writing it (another process?); it was left "
                                    "as it is and nothing was written; pass --overwrite to replace it",
                                    self.out) from None
        except OSError as e:
            raise LorafitError(f"cannot write the output ({e.strerror or e})", self.out) from None
        shutil.rmtree(self.tmp, ignore_errors=True)

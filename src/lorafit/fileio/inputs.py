"""Reading untrusted input files: regular files only, bounded sizes and JSON, and a symlink policy for copies.

Every adapter and base that lorafit reads may be hostile or broken. The rules here keep a read from
blocking (a FIFO), from growing without bound (/dev/zero, a 2 GB "config"), from recursing without
bound (deeply nested JSON) and from carrying files from elsewhere into an output (a symlink to
/proc/self/environ). Each refusal is a LorafitError that names the file (exit code 2 at the CLI).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import LorafitError

MAX_JSON_BYTES = 64 << 20  # a config or index; real ones are kilobytes, a 70B index is ~100 KB
MAX_JSON_DEPTH = 64  # real configs nest 3-4 levels
_MAX_IO = 1 << 30  # Linux moves at most ~2 GiB per read or write call

ErrorType = Callable[[str, Path], LorafitError]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, error: ErrorType = LorafitError) -> int:
    """Open `path` for reading; only a regular file (or a symlink to one) is opened.

    A FIFO, device or socket is refused from its stat alone, and the open itself is non-blocking, so a
    file swapped for a FIFO after the stat cannot block either.
    Returns:
        a file descriptor (the caller closes it).
    Raises:
        error: missing, unreadable, or not a regular file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error("does not exist", path) from None
    except OSError as e:
        raise error(f"cannot be read ({e.strerror})", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"is {_kind(st.st_mode)}; lorafit reads only regular files", path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"cannot be read ({e.strerror})", path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"is {_kind(st.st_mode)}; lorafit reads only regular files", path)
    return fd


def read_bytes(path: Path, error: ErrorType = LorafitError, limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole file, which must be a regular file of at most `limit` bytes. Raises error otherwise."""
    fd = open_regular(path, error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"is {size} bytes; lorafit reads at most {limit} bytes from a file of this kind", path)
        data = bytearray(size)
        read_into(fd, memoryview(data), 0, path, error)
        return bytes(data)
    finally:
        os.close(fd)


def read_into(fd: int, view: memoryview, offset: int, path: Path, error: ErrorType = LorafitError) -> None:
    """Fill `view` from `fd` at `offset`, in calls of at most 1 GiB (one call stops near 2 GiB on Linux).

    Raises:
        error: the file ends first.
    """
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + _MAX_IO]], offset + done)
        if n == 0:
            raise error("ends before the data its header promises (truncated, or changed while reading?)", path)
        done += n


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def parse_json_lines(raw: bytes, path: Path, error: ErrorType) -> list[Any]:
    """JSON Lines from an untrusted file: one value per non-blank line, each parsed as parse_json does. Raises
    error naming the line that is not JSON."""
    return [parse_json(line, path, error, what=f"line {n}")
            for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]


def parse_json(raw: bytes, path: Path, error: ErrorType, what: str = "",
               pairs: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Parse JSON bytes from an untrusted file: UTF-8, at most MAX_JSON_DEPTH deep, integers of sane length.

    `what` prefixes the message (e.g. "corrupt safetensors file: its header"); `pairs` is json's
    object_pairs_hook (to refuse duplicate keys, say).
    Raises:
        error: the bytes are not such JSON; the message says where.
    """
    subject = f"{what} " if what else ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{subject}is not UTF-8 text", path) from None
    try:
        value = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise error(f"{subject}is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", path) from None
    except RecursionError:
        raise error(f"{subject}is nested too deeply (more than {MAX_JSON_DEPTH} levels)", path) from None
    except ValueError as e:  # an integer of more than 4300 digits, or a pairs-hook refusal
        raise error(f"{subject}is not usable JSON: {str(e)[:160]}", path) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise error(f"{subject}is nested too deeply (more than {MAX_JSON_DEPTH} levels)", path)
    return value


def load_json(path: Path, error: ErrorType = LorafitError) -> Any:
    """Read and parse a JSON file under the budgets above. Raises error naming the file."""
    raw = read_bytes(path, error)
    if not raw.strip():
        raise error("is empty", path)
    return parse_json(raw, path, error)


def load_config(directory: Path, name: str) -> dict[str, Any]:
    """The JSON object `directory/name` (an adapter's config). Raises AdapterNotFoundError when it is missing and
    AdapterFormatError when it is not a JSON object, each naming the file."""
    from ..errors import AdapterFormatError, AdapterNotFoundError

    path = directory / name
    if not os.path.lexists(path):
        raise AdapterNotFoundError(f"{name} is missing", directory)
    config = load_json(path, AdapterFormatError)
    if not isinstance(config, dict):
        raise AdapterFormatError("is not a JSON object", path)
    return config


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook that refuses a repeated key (json keeps the last silently)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice")
        out[k] = v
    return out


def input_roots(directory: Path) -> list[Path]:
    """Where files of an input directory may live: the directory, and for a HF cache snapshot its repo folder.

    A snapshot's files are symlinks to ../../blobs/<hash> inside the same models--org--name folder.
    """
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(root.parent.parent)
    return roots


def confined(path: Path, directory: Path, follow_symlinks: bool, error: ErrorType = LorafitError) -> Path:
    """Check that `path`, a file of input `directory` whose content goes into an output, may be read.

    A symlink is followed only to a file inside the same input directory, unless `follow_symlinks`;
    a FIFO, device or socket is refused (never opened).
    Returns:
        `path` unchanged.
    Raises:
        error: a symlink out of the directory, or not a regular file.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"cannot be read ({e.strerror})", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"is {_kind(st.st_mode)}; lorafit copies only regular files", path)
    if not follow_symlinks:
        real = path.resolve()
        if not any(real == r or r in real.parents for r in input_roots(directory)):
            raise error(f"is a symlink to {real}, outside {directory}; lorafit does not copy files from outside an "
                        "input directory into an output (pass --follow-symlinks to allow it)", path)
    return path

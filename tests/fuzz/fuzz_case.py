"""A fuzz case as plain data: a command, which valid fixture it runs on, and edits to files of a copy of it.

Cases are data, not callables, so that hypothesis prints them readably, the corpus stores them as small JSON
files, and one function materializes both a generated case and a replayed one.

`edits` maps a path relative to the inputs root (adapter/..., base/..., merged/..., or a new file next to
them) to a list of ops, applied as file-system ops alone, or JSON ops then byte ops:
  JSON ops, on the parsed document (for *.safetensors on the header; the data section is kept as it is):
    {"set": [path, value]}      path: a list of keys; an int on an object means its i-th key (mod its size)
    {"set_raw": [path, raw]}    the value is spliced in as raw JSON text (huge ints, deep nesting, NaN)
    {"delete": path}  {"rename": [path, new_key]}  {"duplicate": path} (the key is written twice)
    {"copy": [from_path, to_path]}  {"reverse": path}
  byte ops, on the file as the JSON ops leave it:
    {"content": {"text": s} | {"base64": s} | {"raw": raw}}  {"copy_from": rel}  {"length": n} (safetensors
    length prefix)  {"truncate": n} (keep n bytes; negative: drop -n)  {"flip": [[pos, xor], ...]}
  file-system ops: {"fifo": true}  {"symlink": target}  {"mkdir": true}  {"remove": true}
A raw JSON text is a string, or {"repeat": [open, n, close, middle]} for open*n + middle + close*n, which
keeps a 10000-deep nesting or a 5000-digit number a few bytes long in the corpus.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COMMANDS = ("inspect", "check", "fix", "merge", "verify-merge")
WRITES = ("fix", "merge")  # the commands that create OUT


@dataclass(frozen=True)
class Case:
    """One input for one command: `base` is "plain" (one model.safetensors) or "sharded" (an index + shards)."""

    command: str
    as_json: bool = False
    base: str = "plain"
    edits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    kind: str = ""
    note: str = ""
    expect_exit: list[int] | None = None  # a case whose bug is a wrong exit code, not a crash (path traversal)

    def __repr__(self) -> str:
        return f"Case({_short(asdict(self))})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints a falsifying example
        printer.text(repr(self))

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v not in (None, "")}
        return {"note": d.pop("note", ""), **d}


def _short(value: Any, limit: int = 120) -> str:
    """A repr that cuts long strings, so a failing 20 kB case still prints in a few lines."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:40]) + f"...<{len(value)} chars>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_short(k)}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return repr(value)


def dump_record(record: dict[str, Any]) -> str:
    """A corpus file: one top-level field a line, each value on one line (ASCII, so any byte survives git)."""
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n"


def load_case(path: Path) -> Case:
    d = json.loads(path.read_text())
    known = {k: d[k] for k in ("command", "as_json", "base", "edits", "kind", "note", "expect_exit") if k in d}
    return Case(**known)


@dataclass(frozen=True)
class Inputs:
    """The materialized case: where each input lives and where OUT goes. Everything lies below `root`."""

    root: Path
    inputs: Path
    adapter: Path
    base: Path
    merged: Path
    out: Path


def materialize(case: Case, fixtures: Any, root: Path) -> Inputs:
    """Copy the fixture dirs the command needs below root/in, then apply the case's edits there."""
    inputs = root / "in"
    inputs.mkdir()
    sharded = case.base == "sharded"
    shutil.copytree(fixtures.adapter, inputs / "adapter")
    shutil.copytree(fixtures.sharded if sharded else fixtures.base, inputs / "base")
    if case.command == "verify-merge":
        shutil.copytree(fixtures.merged_sharded if sharded else fixtures.merged, inputs / "merged")
    for rel, ops in case.edits.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"edit path must stay below the inputs: {rel}")
        apply_ops(inputs / rel, ops, inputs)
    (root / "out").mkdir()
    return Inputs(root, inputs, inputs / "adapter", inputs / "base", inputs / "merged", root / "out" / "result")


def argv(case: Case, where: Inputs) -> list[str]:
    a, b, m, o = str(where.adapter), str(where.base), str(where.merged), str(where.out)
    args = {"inspect": ["inspect", a], "check": ["check", a, "--base", b], "fix": ["fix", a, "--base", b, "-o", o],
            "merge": ["merge", a, "--base", b, "-o", o],
            "verify-merge": ["verify-merge", m, "--base", b, "--adapter", a]}[case.command]
    return args + (["--json"] if case.as_json else [])


# ----------------------------------------------------------------------------- ops

_FS_OPS = ("fifo", "symlink", "mkdir", "remove")
_BYTE_OPS = ("content", "copy_from", "length", "truncate", "flip")


def raw_text(spec: Any) -> str:
    if isinstance(spec, dict):
        open_, n, close, *middle = spec["repeat"]
        return open_ * n + (middle[0] if middle else "") + close * n
    return str(spec)


def apply_ops(path: Path, ops: list[dict[str, Any]], inputs: Path) -> None:
    """Apply `ops` to the file at `path`: file-system ops alone if there are any, else the JSON ops on the parsed
    file, then the byte ops on what they leave (each group in its order)."""
    named = [next(iter(op.items())) for op in ops]
    fs = [(n, a) for n, a in named if n in _FS_OPS]
    for name, arg in fs:
        _fs_op(path, name, arg)
    if fs:
        return
    data = path.read_bytes() if path.is_file() else b""
    structured = [(n, a) for n, a in named if n not in _BYTE_OPS]
    if structured:
        doc = _Doc(data, path.suffix == ".safetensors")
        for name, arg in structured:
            doc.apply(name, arg)
        data = doc.dump()
    for name, arg in named:
        if name in _BYTE_OPS:
            data = _byte_op(data, name, arg, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _fs_op(path: Path, name: str, arg: Any) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if name == "fifo":
        os.mkfifo(path)
    elif name == "symlink":
        path.symlink_to(arg)
    elif name == "mkdir":
        path.mkdir()


def _byte_op(data: bytes, name: str, arg: Any, inputs: Path) -> bytes:
    if name == "content":
        if "base64" in arg:
            return base64.b64decode(arg["base64"])
        return (arg["text"] if "text" in arg else raw_text(arg["raw"])).encode("utf-8", "surrogatepass")
    if name == "copy_from":
        return (inputs / arg).read_bytes()
    if name == "length":
        return struct.pack("<Q", arg % 2**64) + data[8:]
    if name == "truncate":
        return data[:arg] if arg >= 0 else data[:max(len(data) + arg, 0)]
    out = bytearray(data)
    for pos, xor in arg:  # flip
        if out:
            out[pos % len(out)] ^= xor & 0xFF
    return bytes(out)


class _Doc:
    """A JSON document (or a safetensors header and its data) being edited; raw splices are placeholders."""

    def __init__(self, data: bytes, safetensors: bool) -> None:
        self.tail = b""
        if safetensors:
            (n,) = struct.unpack("<Q", data[:8])
            data, self.tail = data[8:8 + n], data[8 + n:]
        self.value: Any = json.loads(data)
        self.safetensors = safetensors
        self.raw: dict[str, str] = {}  # placeholder string -> the JSON text that replaces it (with its quotes)

    def _token(self, text: str) -> str:
        token = f"@@lorafit-fuzz-{len(self.raw)}@@"
        self.raw[json.dumps(token)] = text
        return token

    def _walk(self, path: list[Any]) -> tuple[Any, Any] | None:
        """(container, key) for `path`, or None when the path leads nowhere (the op is then a no-op)."""
        node = self.value
        for i, part in enumerate(path):
            key = _key(node, part)
            if key is None:
                return None
            if i == len(path) - 1:
                return node, key
            if key not in _keys(node):
                return None
            node = node[key]
        return None

    def _get(self, path: list[Any]) -> Any:
        at = self._walk(path)
        return self.value if not path else (None if at is None or at[1] not in _keys(at[0]) else at[0][at[1]])

    def _set(self, path: list[Any], value: Any) -> None:
        if not path:
            self.value = value
        elif (at := self._walk(path)) is not None:
            container, key = at
            if isinstance(container, list) and key == len(container):
                container.append(value)
            else:
                container[key] = value

    def apply(self, name: str, arg: Any) -> None:
        if name == "set":
            self._set(arg[0], arg[1])
        elif name == "set_raw":
            self._set(arg[0], self._token(raw_text(arg[1])))
        elif name == "copy":
            self._set(arg[1], self._get(arg[0]))
        elif name == "reverse":
            if isinstance(v := self._get(arg), list):
                self._set(arg, v[::-1])
        elif name in ("delete", "rename", "duplicate"):
            self._rebuild(name, arg)
        else:
            raise ValueError(f"unknown op {name!r}")

    def _rebuild(self, name: str, arg: Any) -> None:
        """delete, rename or duplicate a key of an object, keeping the order of the others."""
        at = self._walk(arg[0] if name == "rename" else arg)
        if at is None or not isinstance(at[0], dict) or at[1] not in at[0]:
            return
        container, key = at
        items = list(container.items())
        container.clear()
        for k, v in items:
            if k != key:
                container[k] = v
            elif name == "rename":
                container[arg[1]] = v
            elif name == "duplicate":
                container[k] = v
                container[self._token(json.dumps(k))] = v

    def dump(self) -> bytes:
        if self.safetensors:
            text = json.dumps(self.value, separators=(",", ":"))
        else:
            text = json.dumps(self.value, indent=2)
        for token, raw in self.raw.items():
            text = text.replace(token, raw)
        body = text.encode("utf-8", "surrogatepass")
        if not self.safetensors:
            return body
        body += b" " * (-len(body) % 8)
        return struct.pack("<Q", len(body)) + body + self.tail


def _keys(node: Any) -> list[Any]:
    return list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []


def _key(node: Any, part: Any) -> Any:
    if isinstance(node, dict):
        if isinstance(part, int) and not isinstance(part, bool):
            return list(node)[part % len(node)] if node else None
        return part
    if isinstance(node, list) and isinstance(part, int) and not isinstance(part, bool):
        return part % len(node) if node else 0
    return None

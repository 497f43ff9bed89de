"""Integrity manifests: the SHA-256 and size of every file in a directory, written by fix, merge and convert into
their outputs (and by `inspect --manifest` for an adapter), and checked later by `verify-files`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import LorafitError
from .inputs import load_json

MANIFEST_NAME = "lorafit-manifest.json"
SCHEMA = "lorafit.manifest/1"
_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_of(directory: Path) -> dict[str, Any]:
    """{"schema", "files": {relative name: {"sha256", "bytes"}}} for every regular file below `directory` (symlinks
    and the manifest itself left out)."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_symlink() or not p.is_file() or p.name == MANIFEST_NAME:
            continue
        files[p.relative_to(directory).as_posix()] = {"sha256": sha256_of(p), "bytes": p.stat().st_size}
    return {"schema": SCHEMA, "files": files}


def write_manifest(directory: Path, to: Path | None = None) -> Path:
    """Write the manifest of `directory` to `to` (default: inside it, as lorafit-manifest.json). Returns the path."""
    target = to or directory / MANIFEST_NAME
    target.write_text(json.dumps(manifest_of(directory), indent=2, sort_keys=True) + "\n")
    return target


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The files a manifest lists. Raises LorafitError naming the file when it is not a lorafit manifest."""
    data = load_json(path)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()):
        raise LorafitError(f"is not a lorafit manifest (schema {SCHEMA})", path)
    return files


def compare(directory: Path, listed: dict[str, dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """(changed, missing, unlisted) files of `directory` against a manifest's `listed` files."""
    now = manifest_of(directory)["files"]
    changed = [n for n in listed if n in now and now[n]["sha256"] != listed[n]["sha256"]]
    missing = [n for n in listed if n not in now]
    unlisted = [n for n in now if n not in listed]
    return changed, missing, unlisted

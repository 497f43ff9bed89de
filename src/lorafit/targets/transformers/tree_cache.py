"""A cache of ModuleTrees, keyed by config.json bytes, class name and library versions; beside them, PEFT's
load-time renames of an adapter on such a tree, and which model types transformers defines.

Building a tree needs torch and transformers' model code (~6 s of imports on 2 cores), while the tree
itself depends only on the config, the class and the transformers version. A cached tree makes a
repeated `lorafit check` import neither. LORAFIT_CACHE moves the cache; LORAFIT_NO_CACHE=1 disables it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ...adapter import Adapter
from ...tree import ModuleInfo, ModuleTree
from ...version import installed_version

_SCHEMA = "tree/4"


def cache_root() -> Path:
    """lorafit's cache directory: LORAFIT_CACHE, else XDG_CACHE_HOME/lorafit (~/.cache/lorafit)."""
    root = os.environ.get("LORAFIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorafit"
    return Path(root)


def _cache_dir() -> Path:
    return cache_root() / "trees"


def _version(pkg: str) -> str:
    return installed_version(pkg) or "none"


def cache_key(config_bytes: bytes, class_name: str) -> str:
    from ...version import __version__

    h = hashlib.sha256()
    for part in (_SCHEMA, __version__, _version("transformers"), class_name):
        h.update(part.encode() + b"\0")
    h.update(config_bytes)
    return h.hexdigest()[:32]


def read_document(name: str) -> Any:
    """The cached JSON document `name`, or None (missing, disabled, or unreadable: then it is rebuilt)."""
    if os.environ.get("LORAFIT_NO_CACHE"):
        return None
    try:
        return json.loads((_cache_dir() / name).read_text())
    except (OSError, ValueError):
        return None


def write_document(name: str, data: Any) -> None:
    """Write a cached JSON document atomically; a cache that cannot be written is silently skipped."""
    if os.environ.get("LORAFIT_NO_CACHE"):
        return
    try:
        write_cache_file(_cache_dir() / name, json.dumps(data))
    except OSError:
        pass


def write_cache_file(path: Path, text: str) -> None:
    """Write a file of lorafit's cache atomically (a unique temp file beside it, then a rename), so a reader in
    another process sees the old file or the new one, never part of one. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def renames_key(target_key: str, adapter: Adapter) -> str:
    """The key of the load-time renames of `adapter` on the base `target_key` names: its keys, shapes and config."""
    h = hashlib.sha256(target_key.encode() + b"\0" + _version("peft").encode() + b"\0")
    h.update(json.dumps(adapter.config, sort_keys=True, default=str).encode())
    for k in sorted(adapter.module_keys()):
        h.update(f"\0{k}:{list(adapter.infos[k].shape)}".encode())
    return h.hexdigest()[:32]


def load_renames(key: str) -> dict[str, str] | None:
    """Cached renames (module path -> path PEFT loads it under) for `renames_key`, or None."""
    data = read_document(f"{key}.renames.json")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return None
    return data


def store_renames(key: str, renames: dict[str, str]) -> None:
    write_document(f"{key}.renames.json", renames)


# Trees this process has parsed, by their file's identity: a scan checks many adapters on one base, and parsing a
# 1B tree's JSON costs more than the rest of a check. A changed or removed file is a different key.
_PARSED: dict[tuple[str, int, int, int], ModuleTree] = {}


def load(key: str) -> ModuleTree | None:
    """The cached tree for `key`, or None (missing, disabled, or unreadable: then it is rebuilt)."""
    if os.environ.get("LORAFIT_NO_CACHE"):
        return None
    path = _cache_dir() / f"{key}.json"
    try:
        st = path.stat()
    except OSError:
        return None
    identity = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if identity not in _PARSED:
        tree = _parse(read_document(path.name))
        if tree is None:
            return None
        if len(_PARSED) >= 8:
            _PARSED.clear()
        _PARSED[identity] = tree
    return replace(_PARSED[identity])  # a copy: callers set its source and origin


def _parse(data: Any) -> ModuleTree | None:
    if data is None:
        return None
    try:
        modules = {p: ModuleInfo(m["kind"], m["in_features"], m["out_features"],
                                 {k: tuple(v) for k, v in m["params"].items()}, bool(m.get("transposed")))
                   for p, m in data.pop("modules").items()}
        return ModuleTree(modules=modules, **data)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def store(key: str, tree: ModuleTree) -> None:
    """Write the tree atomically; a cache that cannot be written is silently skipped."""
    write_document(f"{key}.json", asdict(tree))

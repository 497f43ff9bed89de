"""The local Hugging Face cache: where it is, and the snapshot of a hub id in it. Nothing is ever downloaded."""

from __future__ import annotations

import os
import re
from pathlib import Path


def looks_like_repo_id(spec: str) -> bool:
    """True for 'owner/name' (what the hub calls a repo id), never for a relative or absolute path."""
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec)) and not spec.startswith((".", "/"))


def hf_hub_cache_dir() -> str:
    """The HF hub cache directory that the environment names now.

    huggingface_hub reads HF_HUB_CACHE / HF_HOME once, when it is imported; this reads them at call time,
    with the same precedence: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub.
    Returns the directory (it need not exist).
    """
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return os.path.expandvars(os.path.expanduser(env[name]))
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = env.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot directory of `repo_id` (at `revision`: a branch, tag or commit) in the HF cache, or None
    when it is not cached (or not an id)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=hf_hub_cache_dir()))
    except Exception:  # not cached, a malformed id, an unreadable cache: all mean "not here"
        return None


def in_hub_cache(path: Path) -> bool:
    """Whether `path` lies inside the HF hub cache (where no output belongs: the cache manages its own files)."""
    cache = Path(hf_hub_cache_dir()).expanduser()
    try:
        target, root = path.expanduser().resolve(), cache.resolve()
    except OSError:
        return False
    return target == root or root in target.parents

"""Which base a command works on: the one the user names, or the one the adapter names (base_model_name_or_path),
as a local directory or a snapshot in the HF cache (at a revision). Nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..errors import LorafitError


@dataclass(frozen=True)
class BaseRef:
    """A base as resolved: the name to show (and to repeat in hints), the directory, and where the name came from."""

    spec: str  # as the user (or the adapter) names it
    path: Path  # the local directory: the model's, or the cache snapshot's
    source: str  # "--base" or "adapter_config.json"
    revision: str | None = None
    snapshot: str | None = None  # the snapshot's commit, for a hub id

    def summary(self) -> dict[str, Any]:
        return {"base": self.spec, "base_from": self.source, "revision": self.revision, "snapshot": self.snapshot}


def resolve_base(adapter: Adapter, base: str | Path | None, revision: str | None = None,
                 needs: str = "config") -> BaseRef:
    """`base`, or the base the adapter names when `base` is None, resolved locally.

    Raises:
        LorafitError: the adapter names no base and none is given; ModelNotFoundError: not here (the message says
            which files to fetch for `needs`, "config" or "weights").
    """
    from ..targets.transformers.resolve import resolve_model_dir

    source = "--base"
    if base is None:
        if not adapter.base_model:
            raise LorafitError("no --base given, and the adapter names no base (base_model_name_or_path is empty in "
                               "its config): pass --base", adapter.path)
        base, source = adapter.base_model, "adapter_config.json"
    path = resolve_model_dir(base, revision, needs)
    snapshot = path.name if path.parent.name == "snapshots" else None
    return BaseRef(str(base), path, source, revision, snapshot)


def is_live(base: Any) -> bool:
    """A model object rather than a name (check and fix accept a loaded nn.Module or PeftModel)."""
    return base is not None and not isinstance(base, (str, Path))

"""Adapter formats: the Format protocol and its registry.

A Format turns files into an Adapter and back, and owns the rules that only make sense for it: which
modules its config targets, what its config must agree with in its tensors. PEFT is the first. A new format
is a module under formats/ that calls `register_format` on import, plus its name in _BUILTIN; nothing
outside formats/ branches on a format's name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import LorafitError

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..align import Landing
    from ..findings import Finding
    from ..tree import ModuleTree


class Format(Protocol):
    """What lorafit needs of an adapter format."""

    name: str

    def sniff(self, path: Path) -> bool:
        """True when the directory (or file) at `path` holds an adapter of this format. Reads no tensor data."""
        ...

    def read(self, spec: str | Path, subfolder: str | None = None) -> Adapter:
        """The Adapter at `spec` (a path, or a hub id in the local cache). Raises LorafitError on bad input."""
        ...

    def targeting(self, adapter: Adapter) -> Callable[[str], bool]:
        """The module paths this format's loader puts a LoRA layer on, as a predicate over tree paths."""
        ...

    def adapter_rules(self, adapter: Adapter) -> list[Finding]:
        """The format's own findings on the adapter alone (config against tensors)."""
        ...

    def landing_rules(self, adapter: Adapter, tree: ModuleTree, landing: Landing, hint: str | None) -> list[Finding]:
        """The format's findings on one landing of the adapter on a tree."""
        ...

    def write(self, adapter: Adapter, landing: Landing, tree: ModuleTree, out_dir: Path,
              source_desc: str | None = None, follow_symlinks: bool = True) -> dict[str, str]:
        """Write `adapter` re-keyed by `landing` into the existing, empty `out_dir` so that it lands on `tree`.

        Returns the provenance recorded in the output. Raises LorafitError when a file cannot be carried along.
        """
        ...


class ReadOnlyFormat:
    """The parts of a Format that lorafit reads but fix does not write (mlx-lm, GGUF): no rules of its own, and
    `write` refused with the way to a PEFT adapter."""

    name: str

    def adapter_rules(self, adapter: Adapter) -> list[Finding]:
        return []

    def landing_rules(self, adapter: Adapter, tree: ModuleTree, landing: Landing, hint: str | None) -> list[Finding]:
        return []

    def write(self, adapter: Adapter, landing: Landing, tree: ModuleTree, out_dir: Path,
              source_desc: str | None = None, follow_symlinks: bool = True) -> dict[str, str]:
        raise LorafitError(f"fix writes PEFT adapters and this one is {self.name}; lorafit convert reads it (see "
                           "lorafit convert --help)", adapter.path)


_REGISTRY: dict[str, Format] = {}
_BUILTIN = ("peft", "mlx", "gguf")  # imported on first use, so that `import lorafit` stays cheap


def register_format(fmt: Format) -> Format:
    """Add a format; the first registered is tried last when sniffing (the default for an unknown layout)."""
    _REGISTRY[fmt.name] = fmt
    return fmt


def _registry() -> dict[str, Format]:
    """Every format, the built-in ones first and in _BUILTIN's order, whichever was imported first."""
    for name in _BUILTIN:
        if name not in _REGISTRY:
            importlib.import_module(f"{__name__}.{name}")
    order = [*_BUILTIN, *(n for n in _REGISTRY if n not in _BUILTIN)]
    return {n: _REGISTRY[n] for n in order}


def get_format(name: str) -> Format:
    """The registered format called `name`. Raises LorafitError for an unknown one."""
    formats = _registry()
    if name not in formats:
        raise LorafitError(f"unknown adapter format {name!r}; known: {', '.join(sorted(formats))}")
    return formats[name]


def read_adapter(spec: str | Path, subfolder: str | None = None, format: str | None = None) -> Adapter:
    """Read the adapter at `spec` with `format`, or with the first registered format that recognises it.

    When none does, the default (first registered) format reads it, so that its error names what is missing.
    """
    if format is not None:
        return get_format(format).read(spec, subfolder)
    formats = list(_registry().values())
    path = Path(spec).expanduser() / (subfolder or "")
    found = next((f for f in reversed(formats) if _sniffs(f, path)), formats[0])
    return found.read(spec, subfolder)


def _sniffs(fmt: Format, path: Path) -> bool:
    """fmt.sniff, where a path the OS refuses to look at (too long, a NUL byte) is simply not this format."""
    try:
        return fmt.sniff(path)
    except (OSError, ValueError):
        return False


def ensure_adapter(adapter: Any) -> Adapter:
    """Accept an Adapter or anything read_adapter accepts. Raises LorafitError for anything else."""
    from ..adapter import Adapter

    if isinstance(adapter, Adapter):
        return adapter
    if not isinstance(adapter, (str, Path)):
        raise LorafitError(f"expected an adapter path or Adapter, got {type(adapter).__name__}")
    return read_adapter(adapter)


def format_of(adapter: Adapter) -> Format:
    """The format that read `adapter` (and that writes it back)."""
    return get_format(adapter.format)

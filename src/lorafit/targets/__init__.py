"""Runtimes: the Runtime protocol and its registry.

A Runtime is whatever loads an adapter onto a base model: PEFT on a transformers class today; vLLM,
llama.cpp or mlx-lm next. It answers two things: the module tree of a base as it will be loaded (a
Target), and the runtime's own acceptance rules for an adapter on that tree. A new runtime is a package
under targets/ that calls `register_runtime` on import, plus its name in _BUILTIN. The serving runtimes (vLLM,
SGLang, llama.cpp, Ollama, LoRAX, mlx-lm), which cannot run here, are rules read from their sources: see
targets/serving.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import LorafitError

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..align import Alignment
    from ..findings import Finding
    from ..tree import ModuleTree


class TargetRefused(LorafitError):
    """The runtime cannot build this base's tree at all; `finding` says why (the use cases report it as a finding,
    with what can be said of the adapter alone)."""

    def __init__(self, finding: Finding, path: str | Path) -> None:
        self.finding = finding
        super().__init__(finding.message, path)


@dataclass
class Target:
    """One base as a runtime will load it: its module tree, and what the runtime noticed on the way."""

    tree: ModuleTree
    how: str  # how the base is loaded, in the runtime's terms (transformers: the model class name)
    base: str | None = None  # the base as the user named it (None for a live model)
    notes: list[Finding] = field(default_factory=list)  # findings about the base itself (e.g. custom code)
    model: Callable[[], Any] | None = None  # the loaded model on demand (meta is fine), for load-time conversions
    key: str | None = None  # what identifies the base as loaded (config, class, versions), for caches; None if live
    path: Path | None = None  # the base's directory on disk (None for a live model): an input, never written
    hint_args: list[str] = field(default_factory=list)  # how the user named the load (--revision, --config): hints


class Runtime(Protocol):
    """What lorafit needs of a runtime."""

    name: str

    def default_how(self, adapter: Adapter) -> str:
        """How the base is loaded when the user does not say (transformers: the class the task implies)."""
        ...

    def target(self, base: Any, how: str | None, adapter: Adapter, overrides: dict[str, Any] | None = None) -> Target:
        """The Target for `base` loaded `how` (default: default_how), with the load's config `overrides`.
        Raises LorafitError on bad input."""
        ...

    def load_renames(self, adapter: Adapter, target: Target) -> dict[str, str] | None:
        """Module paths the runtime's own loader renames before matching, or None when it renames nothing."""
        ...

    def rules(self, adapter: Adapter, target: Target, alignment: Alignment) -> list[Finding]:
        """The runtime's acceptance rules for `adapter` landed on `target`."""
        ...

    def refine(self, findings: list[Finding], adapter: Adapter, alignment: Alignment) -> None:
        """Sharpen, in place, the hints of the format-neutral findings with what the runtime knows."""
        ...

    def trained_as(self, adapter: Adapter) -> str | None:
        """How the adapter was trained to be loaded, in this runtime's terms (for messages), if it says."""
        ...


_REGISTRY: dict[str, Runtime] = {}
_BUILTIN = ("transformers",)
DEFAULT_RUNTIME = "transformers"


def register_runtime(runtime: Runtime) -> Runtime:
    _REGISTRY[runtime.name] = runtime
    return runtime


def get_runtime(name: str = DEFAULT_RUNTIME) -> Runtime:
    """The registered runtime called `name`. Raises LorafitError for an unknown one."""
    for builtin in _BUILTIN:
        if builtin not in _REGISTRY:
            importlib.import_module(f"{__name__}.{builtin}")
    if name not in _REGISTRY:
        raise LorafitError(f"unknown runtime {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]

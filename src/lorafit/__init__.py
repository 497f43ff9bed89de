"""lorafit: make sure a LoRA adapter really lands on the model it is loaded into.

Public API: inspect, check, fix, load_adapter, verify, merge, verify_merge; the errors are in lorafit.errors.
Importing lorafit is cheap: each API function's module is imported on first use (PEP 562), and torch,
transformers and peft only by the calls that need them. `lorafit.check` and the others are the real
functions, so `help()` shows their signatures and docstrings.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors as errors  # importable right after `import lorafit`
from .version import __version__

if TYPE_CHECKING:
    from .api.check import check, inspect
    from .api.fix import fix
    from .api.load import load_adapter, verify
    from .api.merge import merge
    from .api.verify_merge import verify_merge
    from .report import Report

# API name -> the module that defines it.
_HOME = {"inspect": "api.check", "check": "api.check", "fix": "api.fix", "load_adapter": "api.load",
         "verify": "api.load", "merge": "api.merge", "verify_merge": "api.verify_merge", "Report": "report"}

__all__ = ["inspect", "check", "fix", "load_adapter", "verify", "merge", "verify_merge", "Report", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'lorafit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

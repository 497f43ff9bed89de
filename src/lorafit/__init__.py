"""lorafit: make sure a LoRA adapter really lands on the model it is loaded into.

Public API: inspect, check, fix, load_adapter, verify, merge, verify_merge; the errors are in lorafit.errors.
Importing lorafit is cheap: torch, transformers and peft are imported only by the calls that need them.
"""

from __future__ import annotations

from . import errors as errors  # importable right after `import lorafit`
from .api.check import check, inspect
from .api.fix import fix
from .api.load import load_adapter, verify
from .api.merge import merge
from .api.verify_merge import verify_merge
from .report import Report
from .version import __version__

__all__ = ["inspect", "check", "fix", "load_adapter", "verify", "merge", "verify_merge", "Report",
           "__version__"]

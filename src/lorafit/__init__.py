"""lorafit: make sure a LoRA adapter really lands on the model it is loaded into.

Public API: inspect, check, fix, load_adapter, verify, merge, verify_merge; the errors are in lorafit.errors.
Importing lorafit is cheap: torch, transformers and peft are imported only by the calls that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import errors as errors  # noqa: E402  (importable at once; the API modules below read __version__)
from .api.check import check, inspect  # noqa: E402
from .api.fix import fix  # noqa: E402
from .api.load import load_adapter, verify  # noqa: E402
from .api.merge import merge  # noqa: E402
from .api.verify_merge import verify_merge  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["inspect", "check", "fix", "load_adapter", "verify", "merge", "verify_merge", "Report",
           "__version__"]

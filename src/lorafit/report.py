"""Report: adapter and target summaries, the alignment, the findings; as JSON here, as a table in render.py.

The JSON schema (`lorafit.report/1`) is documented in docs/json-schema.md and is stable: fields may be
added, never renamed or removed within a schema version.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .findings import ERROR, INFO, WARNING, Finding, sort_findings

SCHEMA = "lorafit.report/1"


@dataclass
class Report:
    """What a command found. `ok` is True when no finding is an error; `exit_code` maps that to 0 or 1."""

    command: str
    adapter: dict[str, Any] | None = None
    target: dict[str, Any] | None = None
    alignment: dict[str, Any] | None = None
    findings: list[Finding] = field(default_factory=list)
    modules: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)  # command-specific: fix output, merge stats, ...

    @property
    def ok(self) -> bool:
        return not any(f.severity == ERROR for f in self.findings)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    def to_json(self) -> dict[str, Any]:
        findings = sort_findings(self.findings)
        counts = {s: sum(f.severity == s for f in findings) for s in (ERROR, WARNING, INFO)}
        return {
            "schema": SCHEMA, "command": self.command, "ok": self.ok, "counts": counts,
            "findings": [f.to_json() for f in findings],
            "adapter": self.adapter, "target": self.target, "alignment": self.alignment,
            "modules": self.modules, "result": self.result,
        }

    def dumps(self) -> str:
        """Strict JSON: a non-finite number (an error that is NaN or infinite) is written as null."""
        return json.dumps(_finite(self.to_json()), indent=2, default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None, so the output is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def ranges(nums: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5'."""
    out, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)

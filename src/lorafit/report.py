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

    def verdict(self) -> str:
        """'OK', or 'FAIL (2 error findings; 2 more follow from them)': root causes counted apart from what follows
        from them (caused_by)."""
        if self.ok:
            return "OK"
        errors = self.errors()
        follow = sum(1 for f in errors if f.caused_by)
        roots = len(errors) - follow
        more = f"; {follow} more follow{'s' * (follow == 1)} from {'it' if roots == 1 else 'them'}" if follow else ""
        return f"FAIL ({roots} error finding{'s' * (roots != 1)}{more})"

    def _lines(self) -> list[tuple[str, str]]:
        """(style, line): the verdict, then each finding with its first keys and fix (a report's short form)."""
        verdict = self.verdict()
        out = [("bold green" if self.ok else "bold red", f"lorafit {self.command}: {verdict}")]
        style = {ERROR: "red", WARNING: "yellow", INFO: "cyan"}
        for f in sort_findings(self.findings):
            out.append((style[f.severity], f"{f.severity:<7} {f.code}  {f.message}"))
            out += [("dim", f"          e.g. {k}") for k in f.keys[:3]]
            if f.hint:
                out.append(("green", f"          fix: {f.hint}"))
        return out

    def __str__(self) -> str:
        """print(report): the verdict and the findings, as plain text."""
        return "\n".join(line for _, line in self._lines())

    def __rich__(self) -> Any:
        """The same, styled, in a rich console (rich.print(report), IPython with rich)."""
        from rich.text import Text

        text = Text()
        for style, line in self._lines():
            text.append(line + "\n", style=style)
        return text

    def _repr_html_(self) -> str:
        """In a notebook: the verdict, then one row per finding with its code, message, keys and fix."""
        from html import escape

        color = {ERROR: "#c62828", WARNING: "#b26a00", INFO: "#1565c0"}
        verdict = self.verdict()
        rows = "".join(
            f"<tr><td style='color:{color[f.severity]}'>{f.severity}</td><td><code>{escape(f.code)}</code></td>"
            f"<td>{escape(f.message)}{''.join(f'<br><small>e.g. {escape(k)}</small>' for k in f.keys[:3])}"
            f"{f'<br><b>fix:</b> <code>{escape(f.hint)}</code>' if f.hint else ''}</td></tr>"
            for f in sort_findings(self.findings))
        head = f"<p><b>lorafit {escape(self.command)}: {escape(verdict)}</b></p>"
        return head + (f"<table><tr><th>severity</th><th>code</th><th>finding</th></tr>{rows}</table>" if rows else "")

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


def error_json(command: str, error: BaseException, message: str, kind: str | None = None) -> str:
    """What a command prints as JSON on bad input or usage (exit 2), so that `| jq` always has a document to read."""
    path = getattr(error, "path", None)
    return json.dumps({"schema": SCHEMA, "command": command, "ok": False, "exit_code": 2,
                       "error": {"type": kind or type(error).__name__, "message": message, "path": path}}, indent=2)

"""Report: adapter and target summaries, the alignment, the findings; rendered as a rich table or JSON.

The JSON schema (`lorafit.report/1`) is documented in docs/json-schema.md and is stable: fields may be
added, never renamed or removed within a schema version.
"""

from __future__ import annotations

import json
import math
import re
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


def printable(text: str) -> str:
    """`text` safe for any terminal or log: control characters and lone surrogates (from JSON escapes such as
    \\ud800 in a hostile file) written as escapes, so one message stays one line and printing cannot fail."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None, so the output is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


_STYLE = {ERROR: "bold red", WARNING: "yellow", INFO: "cyan"}
_HIDDEN = {"use_rslora", "use_dora", "tensors", "source", "requested_class"}  # in JSON, too much for the table


def _short(value: Any) -> str:
    """Coverage dicts and lists as compact text for the summary table."""
    if isinstance(value, dict) and "by_module" in value:
        cells = ", ".join(f"{k} {v}" for k, v in value["by_module"].items())
        return cells + (f" + {len(value['outside_layers'])} outside layers" if value["outside_layers"] else "")
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def render(report: Report, console: Any = None, show_modules: bool = False) -> None:
    """Print the report for people: summaries, findings with hints, and a verdict line."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    for title, data in (("adapter", report.adapter), ("target", report.target)):
        if data:
            summary.add_row(title, Text(printable(", ".join(f"{k}={_short(v)}" for k, v in data.items()
                                                            if v not in (None, "", [], {}) and k not in _HIDDEN))))
    if report.alignment:
        a = report.alignment
        how = a["rewrite"].get("description", a["rewrite"])
        summary.add_row("alignment", Text(printable(f"as saved {a['lands_as_is']}/{a['total']} land; best rewrite "
                                                    f"'{how}' lands {a['lands_after_rewrite']}/{a['total']}")))
    for k, v in report.result.items():
        if isinstance(v, (str, int, float, bool)):
            summary.add_row(k, Text(printable(str(v))))
    console.print(summary)
    if show_modules and report.modules:
        _render_modules(report, console)
    hints_shown: set[str] = set()
    for f in sort_findings(report.findings):
        console.print(f"[{_STYLE[f.severity]}]{f.severity:<7}[/] [bold]{f.code}[/]  {escape(printable(f.message))}",
                      highlight=False)
        for k in f.keys[:3]:
            console.print(Text(printable(f"          e.g. {k}"), style="dim"), highlight=False)
        if f.count and f.count > min(3, len(f.keys)):
            console.print(f"          (+{f.count - min(3, len(f.keys))} more)", style="dim")
        if f.hint and f.hint not in hints_shown:
            hints_shown.add(f.hint)
            console.print(f"          fix: [green]{escape(printable(f.hint))}[/]", highlight=False)
    verdict = "[bold green]OK[/]" if report.ok else f"[bold red]FAIL[/] ({len(report.errors())} error findings)"
    console.print(f"{report.command}: {verdict}")


def _render_modules(report: Report, console: Any) -> None:
    """One row per module name and hyper-parameters, with the layers it covers (224 rows would bury it)."""
    from rich.table import Table
    from rich.text import Text

    cols = ["kind", "r", "alpha", "scaling", "in", "out", "dtype", "dora", "bias", "health"]
    groups: dict[tuple[Any, ...], list[str]] = {}
    for m in report.modules:
        path = str(m["path"])
        match = re.search(r"^(.*?)\.(\d+)\.(.*)$", path)
        name, layer = (f"{match.group(1)}.*.{match.group(3)}", match.group(2)) if match else (path, "")
        key = (name, *(str(m.get(c, "")) for c in cols))
        groups.setdefault(key, []).append(layer)
    table = Table(title="modules")
    for c in ["path", "layers", *cols]:
        table.add_column(c, overflow="fold")
    for key, layers in groups.items():
        nums = sorted(int(x) for x in layers if x)
        table.add_row(*(Text(printable(str(c))) for c in (key[0], ranges(nums), *key[1:])))
    console.print(table)


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

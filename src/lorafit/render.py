"""Render a Report as a rich table for people (JSON is Report.dumps); text from inputs is made printable first."""

from __future__ import annotations

import re
from typing import Any

from .findings import ERROR, INFO, WARNING, sort_findings
from .report import Report, ranges


def printable(text: str) -> str:
    """`text` safe for any terminal or log: control characters and lone surrogates (from JSON escapes such as
    \\ud800 in a hostile file) written as escapes, so one message stays one line and printing cannot fail."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


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
    if report.result.get("runtimes"):
        _render_runtimes(report.result["runtimes"], console)
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


_VERDICT_STYLE = {"loads": "green", "loads, not as trained": "yellow", "will not load": "red"}


def _render_runtimes(rows: list[dict[str, Any]], console: Any) -> None:
    """One line per runtime: its release, the verdict, and the finding codes behind it."""
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    for row in rows:
        where = row["runtime"] + (f"@{row['version']}" if row.get("version") else "")
        verdict = row.get("verdict") or ""
        codes = ", ".join(c.removeprefix("runtime-") for c in row["codes"])
        table.add_row(where, f"[{_VERDICT_STYLE.get(verdict, 'white')}]{verdict}[/]", codes)
    console.print("[bold]runtimes[/]")
    console.print(table)


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

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


def render(report: Report, console: Any = None, show_modules: bool = False, verbosity: int = 0,
           color: bool = True) -> None:
    """Print the report for people: summaries, findings with hints, and a verdict line.

    Lines are wrapped here, under their finding, and never end in spaces; a command in a hint stands alone on its
    line, unwrapped, so it can be pasted from any terminal or log. verbosity -1 leaves out the summaries, 1 lists
    every key of a finding.
    """
    import io

    from rich.console import Console

    target = console or Console(no_color=not color, highlight=False)
    width = max(60, target.width)
    buffer = Console(file=io.StringIO(), width=width, force_terminal=target.is_terminal and color,
                     color_system="truecolor" if color and target.color_system else None, no_color=not color,
                     highlight=False, legacy_windows=False)
    if verbosity >= 0:
        _render_summary(report, buffer)
        if show_modules and report.modules:
            _render_modules(report, buffer, width)
        if report.result.get("runtimes"):
            _render_runtimes(report.result["runtimes"], buffer)
    _render_findings(report, buffer, width, verbosity)
    from rich.markup import escape

    verdict = "[bold green]OK[/]" if report.ok else f"[bold red]FAIL[/]{escape(report.verdict()[4:])}"
    buffer.print(f"{report.command}: {verdict}")
    _flush(buffer, target)


def _capture(target: Any, color: bool) -> Any:
    """A console that renders into memory at the target's width, so lines can be cleaned before they are printed."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=max(60, target.width), force_terminal=target.is_terminal and color,
                   color_system="truecolor" if color and target.color_system else None, no_color=not color,
                   highlight=False, legacy_windows=False)


def _flush(buffer: Any, target: Any) -> None:
    """What `buffer` holds, without trailing spaces, to the target console's file."""
    text = buffer.file.getvalue()
    target.file.write("\n".join(_TRAILING.sub(r"\1", line) for line in text.split("\n")))
    target.file.flush()


# spaces at the end of a line, before any closing color codes
_TRAILING = re.compile(r"[ \t]+((?:\x1b\[[0-9;]*m)*)$")
_INDENT = " " * 10


def _render_summary(report: Report, console: Any) -> None:
    from rich.table import Table
    from rich.text import Text

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
    units = report.result.get("units") or {}
    for k, v in report.result.items():
        if isinstance(v, (str, int, float, bool)):
            summary.add_row(k, Text(printable(_with_unit(v, units.get(k)))))
    console.print(summary)


def _roots_first(findings: list[Any]) -> list[Any]:
    """Findings by severity, each root cause followed by the findings it causes (caused_by)."""
    ordered = sort_findings(findings)
    codes = {f.code for f in ordered}
    out = []
    for f in ordered:
        if f.caused_by and f.caused_by in codes:
            continue
        out.append(f)
        out += [c for c in ordered if c.caused_by == f.code]
    return out


def _with_unit(value: Any, unit: str | None) -> str:
    """A result value as people read it: 31880 bytes -> '31880 bytes (31.9 kB)', 0.5 epsilons -> '0.5 ε'."""
    if unit in ("bytes", "bytes/s") and isinstance(value, int) and not isinstance(value, bool):
        size, prefixes = float(value), ["B", "kB", "MB", "GB", "TB"]
        while size >= 1000 and len(prefixes) > 1:
            size /= 1000
            prefixes.pop(0)
        rate = "/s" if unit == "bytes/s" else ""
        return f"{value} {unit} ({size:.3g} {prefixes[0]}{rate})"
    if unit == "s":
        return f"{value} s"
    if unit and unit.startswith("epsilons"):
        return f"{value} ε (dtype epsilons)"
    return str(value)


def is_command(hint: str) -> bool:
    """A hint that is a command line to paste (it is printed alone and unwrapped)."""
    return hint.startswith(("lorafit ", "hf ", "pip ", "python "))


def _render_findings(report: Report, console: Any, width: int, verbosity: int) -> None:
    import textwrap

    from rich.markup import escape

    def wrapped(text: str, first: str = "", style: str = "") -> None:
        lines = textwrap.wrap(printable(text), width=width, initial_indent=first or _INDENT,
                              subsequent_indent=_INDENT, break_on_hyphens=False) or [first]
        for line in lines:
            console.print(f"[{style}]{escape(line)}[/]" if style else escape(line), soft_wrap=True)

    hints_shown: set[str] = set()
    shown = len(max((f.keys for f in report.findings), key=len, default=[])) if verbosity > 0 else 3
    for f in _roots_first(report.findings):
        arrow = "↳ " if f.caused_by else ""
        head = f"{f.severity:<7} {arrow}{f.code}  "
        lines = textwrap.wrap(printable(head + f.message), width=width, subsequent_indent=_INDENT,
                              break_on_hyphens=False)
        first = lines[0][len(head):] if lines else ""
        console.print(f"[{_STYLE[f.severity]}]{f.severity:<7}[/] {arrow}[bold]{f.code}[/]  {escape(first)}",
                      soft_wrap=True)
        for line in lines[1:]:
            console.print(escape(line), soft_wrap=True)
        for k in f.keys[:shown]:
            console.print(f"[dim]{escape(printable(f'{_INDENT}e.g. {k}'))}[/]", soft_wrap=True)
        more = (f.count or 0) - min(shown, len(f.keys))
        if more > 0:
            console.print(f"[dim]{_INDENT}(+{more} more; -v or --json lists them)[/]")
        if f.hint and f.hint not in hints_shown:
            hints_shown.add(f.hint)
            if is_command(f.hint):
                console.print(f"{_INDENT}fix:")
                console.print(f"[green]{escape(printable(f.hint))}[/]", soft_wrap=True)
            else:
                wrapped(f"fix: {f.hint}", first=_INDENT, style="green")


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


def _render_modules(report: Report, console: Any, width: int = 200) -> None:
    """One row per module name and hyper-parameters, with the layers it covers (224 rows would bury it); below
    120 columns (a terminal of 80, a log, a pipe) one line per row, so that no column is squeezed."""
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
    if width < 120:
        console.print("[bold]modules[/]")
        for key, layers in groups.items():
            nums = sorted(int(x) for x in layers if x)
            values = dict(zip(cols, key[1:], strict=True))
            extra = " ".join(f"{c}={values[c]}" for c in ("dora", "bias") if values[c] not in ("False", ""))
            line = (f"{key[0]} [{ranges(nums) or '-'}] {values['kind']} r={values['r']} alpha={values['alpha']} "
                    f"scaling={values['scaling']} {values['in']}->{values['out']} {values['dtype']} {extra} "
                    f"{values['health']}")
            console.print(Text(printable(" ".join(line.split()))), soft_wrap=True)
        return
    table = Table(title="modules")
    for c in ["path", "layers", *cols]:
        table.add_column(c, overflow="fold")
    for key, layers in groups.items():
        nums = sorted(int(x) for x in layers if x)
        table.add_row(*(Text(printable(str(c))) for c in (key[0], ranges(nums), *key[1:])))
    console.print(table)


def render_scan(result: Any, color: bool = True) -> None:
    """One line per adapter (its verdict and finding codes), then the totals."""
    from rich.console import Console
    from rich.table import Table

    target = Console(no_color=not color, highlight=False)
    console = _capture(target, color)
    table = Table.grid(padding=(0, 2))
    for r in result.records:
        if "error" in r:
            table.add_row(printable(r["adapter"]), "[red]unreadable[/]", printable(r["error"]["message"][:200]))
            continue
        findings = r["report"]["findings"]
        errors = sorted({f["code"] for f in findings if f["severity"] == "error"})
        verdict = "[green]ok[/]" if not errors else f"[red]{len(errors)} error{'s' * (len(errors) != 1)}[/]"
        table.add_row(printable(r["adapter"]), verdict, ", ".join(errors))
    console.print(table)
    s = result.summary()
    console.print(f"scan: {s['adapters']} adapters on {s['bases']} base{'s' * (s['bases'] != 1)} in {s['seconds']} s "
                  f"({s['from_cache']} from the cache): {s['ok']} ok, {s['with_errors']} with errors, "
                  f"{s['unreadable']} unreadable")
    _flush(console, target)


def render_batch(result: Any, color: bool = True) -> None:
    """One line per merge of a batch (entry, status, out, and the error or the error findings), then the totals."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    target = Console(no_color=not color, highlight=False)
    console = _capture(target, color)
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a path is shown whole, folded at the width, never cut
    table.add_column(overflow="fold")
    style = {"merged": "green", "refused": "red", "failed": "red"}
    for r in result.records:
        if "error" in r:
            detail = r["error"]["message"][:200]
        else:
            detail = ", ".join(sorted({f["code"] for f in r["report"]["findings"] if f["severity"] == "error"}))
        table.add_row(str(r["entry"]), f"[{style[r['status']]}]{r['status']}[/]", escape(printable(r["out"])),
                      escape(printable(detail)))
    console.print(table)
    s = result.summary()
    where = " on Ray" if s["ray"] else ""
    console.print(f"merge --batch: {s['entries']} entr{'ies' if s['entries'] != 1 else 'y'} in {s['seconds']} s"
                  f"{where}: {s['merged']} merged, {s['refused']} refused, {s['failed']} failed")
    _flush(console, target)

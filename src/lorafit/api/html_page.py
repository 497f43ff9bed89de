"""`lorafit report`'s page: one self-contained HTML file (figures as inline SVG drawn by matplotlib, no script, no
network) from the data of figures.py. Every figure is a <figure data-figure=NAME> holding one <svg>; the page also
carries its data as JSON (<script type="application/json" id="lorafit-data">) for machines and tests.
"""

from __future__ import annotations

import html
import io
import json
import os
from collections import Counter
from typing import Any

from .figures import STATUSES

STATUS_COLORS = {"lands": "#2e7d32", "dropped": "#c62828", "lora_B=0": "#f9a825", "at init": "#ef6c00",
                 "not targeted": "#e0e0e0"}
VERDICT_COLORS = {"ok": "#2e7d32", "warning": "#f9a825", "error": "#c62828", "unreadable": "#4a148c",
                  "loads": "#2e7d32", "loads, not as trained": "#f9a825", "will not load": "#c62828",
                  "not judged": "#e0e0e0"}
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;
text-align:left;vertical-align:top}th{background:#f5f5f5}code{font-size:.9em}
.error{color:#c62828;font-weight:600}.warning{color:#b26a00;font-weight:600}.info{color:#555}
figure{margin:1em 0;overflow-x:auto}figcaption{font-size:.9em;color:#555}
.swatch{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 1em;vertical-align:middle}
"""


def _figure(name: str, caption: str, fig: Any) -> str:
    """A matplotlib figure as <figure data-figure=name> with inline SVG (paths, not fonts: nothing to fetch)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "lorafit"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buf.getvalue()
    return (f'<figure data-figure="{name}">{svg[svg.index("<svg"):]}<figcaption>{html.escape(caption)}'
            "</figcaption></figure>")


def _grid(data: dict[str, Any], value: Any) -> list[list[float]]:
    """Columns (modules) x rows (layers) of value(cell), NaN where the target has no such module."""
    rows, columns = data["rows"], data["columns"]
    grid = [[float("nan")] * len(rows) for _ in columns]
    ri, ci = {r: i for i, r in enumerate(rows)}, {c: i for i, c in enumerate(columns)}
    for cell in data["cells"]:
        v = value(cell)
        grid[ci[cell["column"]]][ri[cell["row"]]] = float("nan") if v is None else float(v)
    return grid


def _heatmap(data: dict[str, Any], values: list[list[float]], cmap: Any, norm: Any, label: str | None) -> Any:
    import numpy as np
    from matplotlib.figure import Figure

    rows, columns = data["rows"], data["columns"]
    fig = Figure(figsize=(min(40.0, 2.5 + 0.28 * len(rows)), 1.2 + 0.3 * len(columns)))
    ax = fig.subplots()
    mesh = ax.pcolormesh(np.ma.masked_invalid(np.array(values)), cmap=cmap, norm=norm, edgecolors="white",
                         linewidth=0.5)
    ax.set_yticks([i + 0.5 for i in range(len(columns))], columns, fontsize=8)
    step = max(1, len(rows) // 40)
    ax.set_xticks([i + 0.5 for i in range(0, len(rows), step)], [_short_row(r) for r in rows[::step]], fontsize=7,
                  rotation=90)
    ax.set_xlabel("layer")
    ax.invert_yaxis()
    ax.set_facecolor("#ffffff")
    if label is not None:
        fig.colorbar(mesh, ax=ax, label=label, fraction=0.03, pad=0.01)
    return fig


def _short_row(row: str) -> str:
    """`model.layers.3` -> `3`; a block of another stack keeps its container's name (`visual.blocks.3` ->
    `blocks.3`); `other` stays."""
    stack, _, index = row.rpartition(".")
    if not stack:
        return row
    if stack.endswith("model.layers") or stack in ("layers", "h", "transformer.h"):
        return index
    return f"{stack.rpartition('.')[2]}.{index}"


def coverage_figure(data: dict[str, Any]) -> str:
    from matplotlib.colors import BoundaryNorm, ListedColormap

    index = {s: i for i, s in enumerate(STATUSES)}
    values = _grid(data, lambda c: index[c["status"]])
    cmap = ListedColormap([STATUS_COLORS[s] for s in STATUSES])
    fig = _heatmap(data, values, cmap, BoundaryNorm([i - 0.5 for i in range(len(STATUSES) + 1)], len(STATUSES)),
                   None)
    return _figure("coverage", f"Where each module lands ({data['landed_on']}): layer × module", fig)


def norm_figure(data: dict[str, Any]) -> str:
    from matplotlib import colormaps

    values = _grid(data, lambda c: c["norm"] if c["status"] in ("lands", "dropped", "lora_B=0") else None)
    fig = _heatmap(data, values, colormaps["viridis"], None, "‖scale·B·A‖_F")
    return _figure("norms", "Size of each module's update, ‖scale·B·A‖_F (exact, from the factors); blank: no update",
                   fig)


def verdict_figure(data: dict[str, Any]) -> str:
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure

    names = list(VERDICT_COLORS)
    idx = {v: i for i, v in enumerate(names)}
    values = np.array([[idx.get(v, idx["not judged"]) for v in row] for row in data["verdicts"]], dtype=float)
    labels = _relative(data["adapters"])
    fig = Figure(figsize=(2.5 + 1.1 * len(data["columns"]) + 0.06 * max(map(len, labels)),
                          1.0 + 0.22 * len(labels)))
    ax = fig.subplots()
    ax.pcolormesh(values, cmap=ListedColormap([VERDICT_COLORS[n] for n in names]),
                  norm=BoundaryNorm([i - 0.5 for i in range(len(names) + 1)], len(names)), edgecolors="white",
                  linewidth=0.5)
    ax.set_xticks([i + 0.5 for i in range(len(data["columns"]))], data["columns"], fontsize=8)
    ax.xaxis.tick_top()
    step = max(1, len(labels) // 200)
    ax.set_yticks([i + 0.5 for i in range(0, len(labels), step)], labels[::step], fontsize=7)
    ax.invert_yaxis()
    return _figure("verdicts", "Verdict of every adapter: check, and each runtime asked for", fig)


def bar_figure(name: str, caption: str, groups: dict[str, list[str]]) -> str:
    from matplotlib.figure import Figure

    keys = list(groups)
    fig = Figure(figsize=(8, 0.8 + 0.3 * len(keys)))
    ax = fig.subplots()
    ax.barh(range(len(keys)), [len(groups[k]) for k in keys], color="#1565c0")
    ax.set_yticks(range(len(keys)), keys, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("adapters")
    return _figure(name, caption, fig)


def _relative(paths: list[str]) -> list[str]:
    """Adapter paths relative to the scan's common root, which the page states once."""
    if len(paths) < 2:
        return [os.path.basename(p) or p for p in paths]
    root = os.path.commonpath(paths)
    return [os.path.relpath(p, root) for p in paths]


def _findings_table(findings: list[dict[str, Any]]) -> str:
    if not findings:
        return "<p>No findings.</p>"
    rows = "".join(
        f'<tr><td class="{html.escape(f["severity"])}">{html.escape(f["severity"])}</td>'
        f'<td><code>{html.escape(f["code"])}</code>{" (" + html.escape(f["runtime"]) + ")" if f.get("runtime") else ""}'
        f'</td><td>{html.escape(f["message"])}'
        + (f'<br><code>{html.escape(f["hint"])}</code>' if f.get("hint") else "") + "</td></tr>"
        for f in findings)
    return f"<table><tr><th>severity</th><th>code</th><th>message</th></tr>{rows}</table>"


def _legend(colors: dict[str, str], counts: dict[str, int]) -> str:
    """Color swatches with their meaning and how many cells have it (those with none are left out)."""
    return "<p>" + "".join(f'<span class="swatch" style="background:{color}"></span>{html.escape(s)}: {counts[s]}'
                           for s, color in colors.items() if counts.get(s)) + "</p>"


def _modules_table(cells: list[dict[str, Any]]) -> str:
    """Rank and alpha per module: one line per kind of module (column), then every module under <details>."""
    per_column: dict[str, set[tuple[Any, Any]]] = {}
    for c in cells:
        if c["rank"] is not None:
            per_column.setdefault(c["column"], set()).add((c["rank"], c["alpha"]))
    summary = "".join(f"<tr><td><code>{html.escape(col)}</code></td><td>"
                      + ", ".join(f"r={r}, alpha={a:g}" for r, a in sorted(v)) + "</td></tr>"
                      for col, v in per_column.items())
    detail = "".join(
        f'<tr><td><code>{html.escape(c["path"])}</code></td><td>{html.escape(c["status"])}</td>'
        f'<td>{"" if c["rank"] is None else c["rank"]}</td><td>{"" if c["alpha"] is None else format(c["alpha"], "g")}'
        f'</td><td>{"" if c["norm"] is None else format(c["norm"], ".4g")}</td></tr>'
        for c in cells if c["status"] != "not targeted")
    return (f"<table><tr><th>module</th><th>rank, alpha</th></tr>{summary}</table><details><summary>every module"
            f"</summary><table><tr><th>path</th><th>status</th><th>rank</th><th>alpha</th><th>‖scale·B·A‖_F</th>"
            f"</tr>{detail}</table></details>")


_SAYS = {"lands": "land as saved", "dropped": "are dropped by the stock loader",
         "lora_B=0": "land, but their saved lora_B is all zeros",
         "at init": "of the target are targeted but get no tensors: they stay at init (lora_B = 0)"}


def _alignment(figures: dict[str, Any]) -> str:
    parts = []
    for status, says in _SAYS.items():
        paths = figures["at_init"] if status == "at init" else [c["path"] for c in figures["cells"]
                                                                 if c["status"] == status]
        if paths:
            items = "".join(f"<li><code>{html.escape(p)}</code></li>" for p in paths)
            parts.append(f"<details><summary>{len(paths)} modules {says}</summary><ul>{items}</ul></details>")
    return "".join(parts)


def _page(title: str, body: str, data: dict[str, Any]) -> str:
    blob = json.dumps(data, default=str, allow_nan=False).replace("</", "<\\/")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{body}"
            f'<script type="application/json" id="lorafit-data">{blob}</script></body></html>\n')


def adapter_page(report: dict[str, Any], figures: dict[str, Any]) -> str:
    """The page for one adapter: its check (or inspect) report and its grid figures."""
    target = report.get("target") or {}
    on = (f"on <code>{html.escape(str(target.get('base') or target.get('source')))}</code> as "
          f"<code>{html.escape(str(target.get('class')))}</code>" if target else "(no base: where it was saved)")
    verdict = "ok" if report.get("ok") else "errors"
    body = (f"<h1>lorafit report: <code>{html.escape(report['adapter']['path'])}</code></h1>"
            f"<p>{on}: <b>{verdict}</b></p><h2>Findings</h2>{_findings_table(report['findings'])}"
            f"<h2>Coverage</h2>{_legend(STATUS_COLORS, figures['counts'])}{coverage_figure(figures)}"
            f"<h2>Update size</h2>{norm_figure(figures)}"
            f"<h2>Rank and alpha</h2>{_modules_table(figures['cells'])}"
            f"<h2>Alignment</h2>{_alignment(figures)}")
    return _page(f"lorafit report: {report['adapter']['path']}", body,
                 {"kind": "adapter", "report": report, "figures": figures})


def scan_page(summary: dict[str, Any], figures: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The page for a scan: the verdict matrix, adapters by base and by finding code."""
    root = os.path.commonpath(figures["adapters"]) if len(figures["adapters"]) > 1 else ""
    by_base = "".join(f"<tr><td><code>{html.escape(b)}</code></td><td>{len(a)}</td></tr>"
                      for b, a in figures["by_base"].items())
    by_code = "".join(f"<tr><td><code>{html.escape(c)}</code></td><td>{len(a)}</td><td>"
                      + ", ".join(html.escape(p) for p in _relative(a) if a) + "</td></tr>"
                      for c, a in figures["by_code"].items())
    body = (f"<h1>lorafit scan report</h1><p>{summary.get('adapters', len(records))} adapters"
            + (f" under <code>{html.escape(root)}</code>" if root else "")
            + f": {summary.get('ok', 0)} ok, {summary.get('with_errors', 0)} with errors, "
            f"{summary.get('unreadable', 0)} unreadable.</p>"
            f"<h2>Verdicts</h2>{_legend(VERDICT_COLORS, Counter(v for row in figures['verdicts'] for v in row))}"
            f"{verdict_figure(figures)}"
            f"<h2>By base</h2>{bar_figure('by-base', 'Adapters per base', figures['by_base'])}"
            f"<table><tr><th>base</th><th>adapters</th></tr>{by_base}</table>"
            + (f"<h2>By finding</h2>{bar_figure('by-code', 'Adapters per finding code', figures['by_code'])}"
               f"<table><tr><th>code</th><th>adapters</th><th>which</th></tr>{by_code}</table>"
               if figures["by_code"] else "<h2>By finding</h2><p>No adapter has a warning or an error.</p>"))
    return _page("lorafit scan report", body, {"kind": "scan", "summary": summary, "figures": figures})


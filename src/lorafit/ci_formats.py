"""A Report for CI systems: GitHub workflow annotations (the lines ruff's --output-format github prints) and SARIF
2.1.0 (code scanning), one SARIF rule per finding code, from the catalog."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .findings import CATALOG, sort_findings
from .report import Report
from .version import __version__

_GITHUB_LEVEL = {"error": "error", "warning": "warning", "info": "notice"}
_SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


def location(report: Report) -> Path | None:
    """The file a finding is reported on: the adapter's config (or the adapter file itself)."""
    raw = (report.adapter or {}).get("path")
    if not raw:
        return None
    path = Path(str(raw))
    return path / "adapter_config.json" if path.is_dir() else path


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _text(f: Any) -> str:
    return f.message + (f" (fix: {f.hint})" if f.hint else "")


def github_annotations(report: Report) -> str:
    """One `::error|warning|notice title=…,file=…,line=1,col=1::…` line per finding."""
    where = location(report)
    lines = []
    for f in sort_findings(report.findings):
        props = [f"title={_escape_property(f'lorafit ({f.code})')}"]
        if where is not None:
            props += [f"file={_escape_property(str(where))}", "line=1", "col=1"]
        subject = f"{where}: " if where is not None else ""
        body = _escape_data(f"{subject}{f.code} {_text(f)}")
        lines.append(f"::{_GITHUB_LEVEL[f.severity]} {','.join(props)}::{body}")
    return "".join(line + "\n" for line in lines)


def sarif_log(reports: Report | list[Report]) -> str:
    """One or more reports (a scan's) as a SARIF 2.1.0 log with one run: each finding located at its adapter."""
    many = reports if isinstance(reports, list) else [reports]
    located = [(f, location(r)) for r in many for f in sort_findings(r.findings)]
    codes = list(dict.fromkeys(f.code for f, _ in located))
    rules = [{"id": code, "name": "".join(w.capitalize() for w in code.split("-")),
              "shortDescription": {"text": CATALOG[code].title},
              "fullDescription": {"text": f"{CATALOG[code].title}. Documented in lorafit's docs/findings.md."},
              "defaultConfiguration": {"level": _SARIF_LEVEL[CATALOG[code].severity]},
              "properties": {"scope": CATALOG[code].scope}} for code in codes]
    results = []
    for f, where in located:
        result: dict[str, Any] = {"ruleId": f.code, "ruleIndex": codes.index(f.code), "level": _SARIF_LEVEL[f.severity],
                                  "message": {"text": _text(f)},
                                  "properties": {"keys": f.keys, "count": f.count}}
        if f.runtime:
            result["properties"] |= {"runtime": f.runtime, "effect": f.effect, "source": f.source}
        if where is not None:
            result["locations"] = [{"physicalLocation": {"artifactLocation": {"uri": where.resolve().as_uri()},
                                                         "region": {"startLine": 1}}}]
        results.append(result)
    log = {"$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0",
           "runs": [{"tool": {"driver": {"name": "lorafit", "version": __version__, "semanticVersion": __version__,
                                         "rules": rules}},
                     "invocations": [{"executionSuccessful": True,
                                      "properties": {"command": many[0].command if many else "scan",
                                                     "ok": all(r.ok for r in many)}}],
                     "results": results}]}
    return json.dumps(log, indent=2) + "\n"

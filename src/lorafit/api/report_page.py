"""report: one self-contained HTML page for an adapter (where every module lands on its base, the size of each
update, rank and alpha, the findings) or for a scan's REPORT_DIR (the verdict matrix, adapters by base and by
finding). Written atomically; matplotlib draws it (`pip install 'lorafit[report]'`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LorafitError, ModelNotFoundError
from ..report import Report
from .figures import adapter_figures, scan_figures

MAX_SCAN_BYTES = 4 << 30  # a scan's records: about 0.13 MB an adapter, so tens of thousands fit


def report_html(path: str | Path, out: str | Path, base: str | None = None, class_name: str | None = None,
                revision: str | None = None, force: bool = False) -> Report:
    """Write the HTML report of an adapter, or of a scan directory (`lorafit scan -o DIR`), to `out`.

    Args:
        path: an adapter directory (or cached hub id), or a scan's REPORT_DIR (holding scan.jsonl).
        base, class_name, revision: as for check (default: the base the adapter names; without one that is here,
            the page shows the adapter as saved).
        force: replace `out` if it exists.
    Returns:
        a Report whose result says what was written: {"written": True, "out", "figures": [names], "page": kind}.
    Raises:
        LorafitError: unreadable input; an output that exists without force; matplotlib not installed.
    """
    _need_matplotlib()
    src, dest = Path(path), Path(out)
    if (src / "scan.jsonl").is_file():
        report, page = _scan_report(src)
    else:
        report, page = _adapter_report(src if src.exists() else str(path), base, class_name, revision)
    from ..fileio.outputs import OutputFile

    protect = [src] if src.exists() else []
    with OutputFile(dest, force=force, protect=protect) as tmp_file:
        tmp_file.write_text(page, encoding="utf-8")
    figures = [part.split('"', 1)[0] for part in page.split('<figure data-figure="')[1:]]
    report.result = {"written": True, "out": str(dest), "page": report.result.get("page"), "figures": figures,
                     "bytes": len(page.encode())}
    return report


def _need_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise LorafitError("the HTML report draws its figures with matplotlib, which is not installed: "
                           "pip install 'lorafit[report]'")


def _adapter_report(path: Path | str, base: str | None, class_name: str | None, revision: str | None
                    ) -> tuple[Report, str]:
    from ..formats import read_adapter
    from ..formats.health import tensor_health
    from ..targets import TargetRefused
    from .check import adapter_only_report, inspect, run_check_on
    from .html_page import adapter_page

    a = read_adapter(path)
    checked = None
    if base is None and not a.base_model:
        report = inspect(a)  # nothing to land on: the page shows the adapter as saved
    else:
        try:
            checked = run_check_on(a, base, class_name, revision=revision)
            report = checked.report
        except TargetRefused as e:
            report = adapter_only_report("report", a, e.finding)
        except ModelNotFoundError:
            if base is not None:
                raise  # the base asked for is not here: as check says
            report = inspect(a)  # the base the adapter names is not here: show it as saved
    report.command = "report"
    figures = adapter_figures(a, checked, tensor_health(a).zero_b)
    page = adapter_page(report.to_json(), figures)
    report.result = {"page": "adapter"}
    return report, page


def _scan_report(directory: Path) -> tuple[Report, str]:
    from ..fileio.inputs import parse_json, parse_json_lines, read_bytes
    from .html_page import scan_page

    jsonl = directory / "scan.jsonl"
    records = parse_json_lines(read_bytes(jsonl, limit=MAX_SCAN_BYTES), jsonl, LorafitError)
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("adapter"), str):
            raise LorafitError(f"record {n} is not a scan record (no adapter)", jsonl)
    if not records:
        raise LorafitError("holds no scan records", jsonl)
    summary: dict[str, Any] = {}
    if (directory / "summary.json").is_file():
        loaded = parse_json(read_bytes(directory / "summary.json"), directory / "summary.json", LorafitError)
        summary = loaded if isinstance(loaded, dict) else {}
    try:
        figures = scan_figures(records)
    except (KeyError, TypeError, AttributeError) as e:
        raise LorafitError(f"is not what lorafit scan writes ({type(e).__name__}: {e})", jsonl) from None
    report = Report("report", result={"page": "scan"})
    report.adapter = {"path": str(directory), "adapters": len(records)}
    return report, scan_page(summary, figures, records)


def figures_of(page: str) -> dict[str, Any]:
    """The data a page carries (its lorafit-data JSON)."""
    start = page.index('<script type="application/json" id="lorafit-data">') + len(
        '<script type="application/json" id="lorafit-data">')
    data: dict[str, Any] = json.loads(page[start:page.index("</script>", start)].replace("<\\/", "</"))
    return data

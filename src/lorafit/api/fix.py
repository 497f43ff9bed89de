"""fix: write a remapped adapter that stock PEFT loads completely on the target class.

The adapter's format writes it re-keyed by the chosen landing (formats/peft/writer.py). The output is
checked again against the same target before it is renamed into place: fix never leaves an adapter that
would not land. What fix must mend is the catalog's policy (Code.mended_by).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..fileio.manifest import write_manifest
from ..fileio.outputs import OutputDir
from ..findings import FIX, Finding, mended_by
from ..formats import format_of, read_adapter
from ..report import Report
from ..targets import TargetRefused
from .check import Checked, adapter_only_report, run_check, run_check_on


def _cleaned(staging: OutputDir) -> list[Finding]:
    return [Finding("stale-output-removed", line) for line in staging.cleaned]


def _recheck(checked: Checked, out_dir: Path) -> Report:
    return run_check(read_adapter(out_dir), checked.target, runtime=checked.runtime).report


def _write_checked(checked: Checked, out_dir: Path, follow_symlinks: bool) -> tuple[dict[str, str], Report]:
    """Write the fixed adapter into `out_dir` and check it again. Returns (provenance, the output's report)."""
    provenance = format_of(checked.adapter).write(checked.adapter, checked.alignment.chosen, checked.tree, out_dir,
                                                  follow_symlinks=follow_symlinks)
    return provenance, _recheck(checked, out_dir)


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The config fields fix changed: field -> {"from": old, "to": new}."""
    return {k: {"from": before.get(k), "to": after.get(k)} for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)}


def _shown(value: Any) -> str:
    text = "null" if value is None else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refused(report: Report, after: Report, cleaned: list[Finding], out: Path) -> Report:
    """The report of a fix that wrote nothing: what it could not mend, as the rewritten adapter shows it."""
    landing = mended_by(FIX)
    # what fix mends is left out: errors, and the consequences shown under them; what remains is said anew below
    report.findings = [f for f in report.findings if f.code not in landing or (f.severity != "error"
                                                                               and not f.caused_by)]
    for f in after.findings:
        if f.severity == "error":
            f.message = f"after the best rewrite: {f.message}"
            report.findings.append(f)
    report.findings += cleaned
    report.result = {"written": False, "out": str(out)}
    return report


def fix(adapter: Adapter | str | Path, base: str | Path | Any, out: str | Path, class_name: str | type | None = None,
        key_mapping: Sequence[str] | dict[str, str] | None = None, force: bool = False,
        follow_symlinks: bool = False, revision: str | None = None,
        config_overrides: Sequence[str] | dict[str, Any] | None = None) -> Report:
    """Rewrite `adapter` so that `PeftModel.from_pretrained(C.from_pretrained(base), out)` loads it completely.

    Args:
        base: as for check (None: the base the adapter names).
        force: replace `out` if it exists.
        follow_symlinks: copy files that are symlinks out of the adapter directory (refused by default).
        revision: the branch, tag or commit of a hub id's snapshot in the HF cache.
        config_overrides: the config kwargs the base is loaded with (from_pretrained(..., num_labels=3)).
    Returns:
        a Report with command "fix". When `report.ok` is False nothing was written and the findings say why.
    Raises:
        LorafitError: unreadable input, unknown class, base not found, `out` exists without force (or
            appeared while writing), `out` inside an input, a symlink out of the adapter directory.
    """
    out = Path(out)
    try:
        checked = run_check_on(adapter, base, class_name, key_mapping, revision, config_overrides=config_overrides)
    except TargetRefused as e:
        return adapter_only_report("fix", adapter, e.finding, out)
    report = checked.report
    report.command = "fix"
    if checked.alignment.ambiguous:
        report.result = {"written": False, "out": str(out)}
        return report
    inputs = [checked.adapter.path]
    if checked.target.path is not None:  # a base read from disk: never written into
        inputs.append(checked.target.path)
    staging = OutputDir(out, force=force, protect=inputs)
    with staging as tmp:
        provenance, after = _write_checked(checked, tmp, follow_symlinks)
        if not after.ok:
            staging.discard()  # nothing is renamed into place: the staging directory is removed on exit
        else:
            write_manifest(tmp)
    if not after.ok:
        return _refused(report, after, _cleaned(staging), out)
    before = [f for f in report.findings if f.code in mended_by(FIX)]
    changes = config_changes(checked.adapter.config, read_adapter(out).config)
    report.findings = list(after.findings)
    mended = ", ".join(sorted({f.code for f in before})) or "none: the adapter already landed, copied as is"
    how = checked.alignment.chosen.rewrite.describe()
    if checked.adapter.unrooted_keys:
        how += ", keys under base_model.model."
    changed = "; ".join(f"{k}: {_shown(v['from'])} → {_shown(v['to'])}" for k, v in changes.items())
    report.findings.append(Finding("fixed", f"wrote {out} ({how}); mended: {mended}; config: "
                                   f"{changed or 'unchanged'}"))
    report.findings += _cleaned(staging)
    report.result = {"written": True, "out": str(out), **provenance, "config_changes": changes}
    return report

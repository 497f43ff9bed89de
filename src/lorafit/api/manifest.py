"""verify-files, and inspect's manifest: SHA-256 sums of an adapter's or an output's files (fileio/manifest.py)."""

from __future__ import annotations

from pathlib import Path

from ..diagnose import plural, verb
from ..errors import LorafitError
from ..fileio.manifest import MANIFEST_NAME, compare, read_manifest
from ..findings import Finding
from ..report import Report


def verify_files(directory: str | Path, manifest: str | Path | None = None) -> Report:
    """Check every file of `directory` against its manifest (default: DIR/lorafit-manifest.json).

    Returns:
        a Report (command "verify-files"): files-verified, or file-changed / file-missing / file-unlisted.
    Raises:
        LorafitError: no such directory, or no readable manifest.
    """
    root = Path(directory)
    if not root.is_dir():
        raise LorafitError("is not a directory", root)
    path = Path(manifest) if manifest is not None else root / MANIFEST_NAME
    if not path.is_file():
        raise LorafitError(f"no manifest here ({MANIFEST_NAME}); pass --manifest FILE, or write one with lorafit "
                           "inspect --manifest", path)
    listed = read_manifest(path)
    changed, missing, unlisted = compare(root, listed)
    if manifest is None:
        unlisted = [n for n in unlisted if n != MANIFEST_NAME]
    findings = []
    if changed:
        findings.append(Finding("file-changed", f"{len(changed)} of {plural(len(listed), 'file')} "
                                f"{verb(len(changed), 'differs', 'differ')} from the manifest",
                                changed))
    if missing:
        findings.append(Finding("file-missing", f"{plural(len(missing), 'file')} the manifest lists "
                                f"{verb(len(missing), 'is', 'are')} gone", missing))
    if unlisted:
        findings.append(Finding("file-unlisted", f"{plural(len(unlisted), 'file')} the manifest does not list",
                                unlisted))
    if not changed and not missing:
        findings.append(Finding("files-verified", f"{'all ' if len(listed) > 1 else ''}{plural(len(listed), 'file')} "
                                f"{verb(len(listed), 'matches', 'match')} {path}"))
    return Report("verify-files", findings=findings,
                  result={"directory": str(root), "manifest": str(path), "files": len(listed)})

"""The findings catalog is the one home of finding policy: docs/findings.md states each code's scope and the
operations that mend it exactly as lorafit.findings.CATALOG does, and fix and merge read their sets from it."""

from __future__ import annotations

import re
from pathlib import Path

from lorafit.findings import CATALOG, FIX, MERGE, mended_by

DOC = Path(__file__).resolve().parents[1] / "docs" / "findings.md"


def _documented_policy() -> dict[str, tuple[str, tuple[str, ...]]]:
    text = DOC.read_text()
    out = {}
    for code, scope, mends in re.findall(r"^### `([a-z0-9-]+)`\n\*Scope: (\w+)\. Mended by: ([^*]+)\.\*$", text,
                                         flags=re.M):
        out[code] = (scope, tuple(re.findall(r"`(\w+)`", mends)))
    return out


def test_docs_state_each_codes_policy_as_the_catalog_does() -> None:
    assert _documented_policy() == {code: (c.scope, c.mended_by) for code, c in CATALOG.items()}


def test_what_fix_and_merge_mend() -> None:
    """The sets fix and merge act on (they used to be hand-kept copies in fixer.py and merger.py)."""
    assert mended_by(FIX) == {
        "unprefixed-keys", "targets-nothing", "layout-mismatch", "ambiguous-layout", "dropped-tensors",
        "missing-adapter-weights", "shape-mismatch", "embedding-size", "pattern-mismatch", "modules-to-save-absent",
        "task-type-incompatible", "task-type-mismatch", "parameter-dropout"}
    assert mended_by(MERGE) == {
        "layout-mismatch", "dropped-tensors", "missing-adapter-weights", "modules-to-save-absent", "shape-mismatch",
        "embedding-size", "pattern-mismatch", "task-type-incompatible", "task-type-mismatch", "tied-embeddings",
        "parameter-dropout"}
    # Proofs and outputs are never mended: they are what an operation shows, not what it repairs.
    assert all(not c.mended_by for c in CATALOG.values() if c.scope in ("proof", "output"))

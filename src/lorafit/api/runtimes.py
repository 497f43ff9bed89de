"""check --runtime: one verdict per runtime an adapter may be deployed on, and inspect's matrix of them.

The transformers runtime is today's check (it needs a base). The serving runtimes (targets/serving) judge the
adapter alone, and with a base also where its paths land in the base's own class, as the runtime loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..errors import LorafitError
from ..findings import Finding
from ..formats import ensure_adapter
from ..report import Report
from ..targets import DEFAULT_RUNTIME, TargetRefused
from ..targets.serving import BaseView, parse_spec, resolve_version, serving_runtimes, verdict_of
from ..targets.serving.traits import is_vision, layer_of

# transformers findings on which PEFT raises instead of loading (the rest load and apply something else)
_RAISES = {"targets-nothing", "task-type-incompatible", "modules-to-save-missing", "rank-mismatch", "shape-mismatch",
           "embedding-size", "parameter-dropout", "parameter-option", "custom-code-required", "rank-inconsistent"}


def known_runtimes() -> list[str]:
    return [DEFAULT_RUNTIME, *serving_runtimes()]


def parse_runtimes(specs: Sequence[str]) -> list[tuple[str, str | None]]:
    """['vllm@0.8.3', 'mlx'] -> [('vllm', '0.8.3'), ('mlx', None)], checked against the known runtimes and releases.

    Raises:
        LorafitError: an unknown runtime or release (the message lists the known ones).
    """
    known, out = known_runtimes(), list[tuple[str, str | None]]()
    for spec in specs:
        for one in spec.split(","):
            name, version = parse_spec(one, known)
            if name == DEFAULT_RUNTIME:
                if version is not None:
                    raise LorafitError("--runtime transformers takes no @VERSION: it is the installed transformers "
                                       "and PEFT")
                out.append((name, None))
            else:
                out.append((name, resolve_version(serving_runtimes()[name], version)))
    return list(dict.fromkeys(out))


def _base_view(adapter: Adapter, base: str | Path | None, key_mapping: Any, revision: str | None = None,
               overrides: dict[str, Any] | None = None) -> tuple[BaseView | None, list[Finding]]:
    """How the adapter's saved paths meet the base's own class (the class its checkpoint was saved as)."""
    from .base import resolve_base
    from .check import run_check_for_checkpoint

    ref = resolve_base(adapter, base, revision)
    try:
        checked = run_check_for_checkpoint(adapter, ref.path, None, key_mapping, overrides)
    except TargetRefused as e:
        return None, [e.finding]
    landing, tree = checked.alignment.as_is, checked.tree
    unused = [p for p in landing.unmatched if p in adapter.modules]
    kinds = {}
    for src, dst in landing.pairs.items():
        info = tree.modules.get(dst)
        if info is not None:
            kinds[src] = info.lora_kind or info.kind
    layers = [n for n in (layer_of(p) for p in tree.modules if not is_vision(p)) if n is not None]
    view = BaseView(tree.model_type, tree.class_name, unused, num_layers=max(layers) + 1 if layers else None,
                    kinds=kinds, spec=ref.spec)
    return view, checked.target.notes


def _transformers(adapter: Adapter, base: Any, class_name: Any, key_mapping: Any, revision: str | None,
                  overrides: Any) -> Report:
    from .check import check

    return check(adapter, base, class_name, key_mapping, revision, overrides)  # no base: the one the adapter names


def _verdict_row(name: str, version: str | None, findings: list[Finding], effects: bool = True) -> dict[str, Any]:
    return {"runtime": name, "version": version, "verdict": verdict_of(findings) if effects else None,
            "errors": sum(f.severity == "error" for f in findings), "codes": sorted({f.code for f in findings})}


def check_runtimes(adapter: Adapter | str | Path, runtimes: Sequence[str], base: str | Path | Any | None = None,
                   class_name: str | type | None = None, key_mapping: Sequence[str] | dict[str, str] | None = None,
                   settings: dict[str, Any] | None = None, revision: str | None = None,
                   config_overrides: Sequence[str] | dict[str, Any] | None = None) -> Report:
    """Will `adapter` load, and apply as trained, on each of `runtimes` ('vllm', 'sglang@0.5.2', ...)?

    Args:
        runtimes: runtime names, each optionally @RELEASE; 'transformers' is the default check and needs `base`.
        base: the base model (local dir or cached hub id); optional for serving runtimes, which then judge the
            adapter alone.
        settings: runtime settings by the runtime's own names, e.g. {'max_lora_rank': 64}.
        revision, config_overrides: as for check (the base's snapshot, and how it is loaded).
    Returns:
        a Report (command "check") whose findings each name their runtime, and whose result["runtimes"] holds one
        verdict per runtime: "loads", "loads, not as trained" or "will not load".
    Raises:
        LorafitError: unreadable adapter, unknown runtime or release, transformers without a base.
    """
    wanted = parse_runtimes(runtimes)
    a = ensure_adapter(adapter)
    report: Report | None = None
    rows, findings = [], []
    view: BaseView | None = None
    notes: list[Finding] = []
    from .check import parse_config_overrides

    overrides = parse_config_overrides(config_overrides)
    # a --revision or --config names how the base is loaded: the adapter's own base, when no --base is given
    if (base is not None or revision is not None or overrides) and any(n != DEFAULT_RUNTIME for n, _ in wanted):
        view, notes = _base_view(a, base, key_mapping, revision, overrides or None)
    for name, version in wanted:
        if name == DEFAULT_RUNTIME:
            report = _transformers(a, base, class_name, key_mapping, revision, overrides or None)
            mine = [f for f in report.findings if f.severity == "error"]
            for f in mine:
                f.runtime, f.effect = DEFAULT_RUNTIME, "will-not-load" if f.code in _RAISES else "not-as-trained"
            rows.append(_verdict_row(name, None, mine))
            continue
        assert version is not None
        judged = serving_runtimes()[name].judge(a, version, settings or {}, view)
        findings += judged
        rows.append(_verdict_row(name, version, judged))
    if report is None:
        from .check import inspect

        report = inspect(a)
        report.command = "check"
        report.findings += notes
    report.findings += findings
    report.result["runtimes"] = rows
    return report


def runtime_matrix(adapter: Adapter) -> list[dict[str, Any]]:
    """Each serving runtime's verdict on the adapter alone, at its latest known release (inspect's matrix)."""
    rows = []
    for runtime in serving_runtimes().values():
        rows.append(_verdict_row(runtime.name, runtime.latest, runtime.judge(adapter, runtime.latest, {}, None)))
    return rows


"""The numbers behind `lorafit report`'s pictures: for one adapter, a layer x module grid of where each LoRA module
lands (or is dropped, or stays at init) and of the size of the update it makes, ‖scale·B·A‖_F; for a scan, the
verdict of every adapter on every runtime, and the adapters grouped by base and by finding. Plain data (JSON-ready);
html_report.py draws it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, LoraModule

if TYPE_CHECKING:
    from .check import Checked

# Where a grid cell stands, in the order the legend lists them.
STATUSES = ("lands", "dropped", "lora_B=0", "at init", "not targeted")
_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")  # model.layers.3.self_attn.q_proj -> (model.layers, 3, self_attn.q_proj)


@dataclass
class ModuleCell:
    """One module in the grid: `row` a repeated block (`model.layers.3`) or "other", `column` the module within it."""

    path: str  # the module as saved (the adapter's path), or the target's module it does not reach
    at: str  # where it is drawn: the target's module it lands on (or would, once fixed), else `path`
    row: str
    column: str
    status: str
    kind: str = ""
    rank: int | None = None
    alpha: float | None = None
    scaling: float | None = None
    norm: float | None = None  # ‖scaling·B·A‖_F; None where there is no update or it is not finite


def place(path: str) -> tuple[str, str]:
    """(row, column) of a module path: the first numbered block it sits in, and the rest of the path."""
    m = _LAYER.match(path)
    return (f"{m.group(1)}.{m.group(2)}", m.group(3)) if m else ("other", path)


def delta_norm(module: LoraModule, adapter: Adapter, adapted: tuple[str, int] | None = None) -> float | None:
    """‖scaling·B·A‖_F, exactly, from the factors: trace((BᵀB)(AAᵀ)) needs two r×r products, never the out×in
    delta. A LoRA on fused experts' parameter (`adapted`: the parameter and its experts, as the alignment found
    them) is one such delta per expert, summed in squares. None for a parameter LoRA not landed anywhere (which
    parameter, and so which scale, depends on the target) and for non-finite factors."""
    import torch

    if module.kind == "param" and adapted is None:
        return None
    param, experts = adapted if adapted is not None else ("", 1)
    scaling = module.per_param[param][2] if module.kind == "param" else module.scaling
    a = adapter.tensor(module.keys["A"]).to(torch.float64)
    b = adapter.tensor(module.keys["B"]).to(torch.float64)
    b = b.reshape(b.shape[0], -1)  # conv: [out, r, 1, 1]
    a = a.reshape(a.shape[0], -1)
    if a.shape[0] != b.shape[1] or a.shape[0] % experts:  # a rank the two factors disagree on: no product
        return None
    # PEFT's layout for experts (ParamWrapper): A as [E, r, in], B as [out, r, E]
    a3 = a.reshape(experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, experts)
    squared = float((torch.einsum("eri,esi->ers", a3, a3) * torch.einsum("ore,ose->ers", b3, b3)).sum())
    if not math.isfinite(squared):
        return None
    return abs(scaling) * math.sqrt(max(squared, 0.0))


def adapter_figures(adapter: Adapter, checked: Checked | None = None, zero_b: list[str] | None = None
                    ) -> dict[str, Any]:
    """The grid of one adapter's modules: where each lands on the target (with `checked`) or where it was saved.

    Returns:
        {"cells": [ModuleCell as dict], "rows": [...], "columns": [...], "counts": {status: n}, "norms": bool}
    """
    zero = set(zero_b or [])
    cells: list[ModuleCell] = []
    pairs = checked.alignment.as_is.pairs if checked else None
    params = {**checked.alignment.chosen.params, **checked.alignment.as_is.params} if checked else {}
    for m in adapter.modules.values():
        if pairs is None:
            where, status = m.path, "lands"
        elif m.path in pairs:
            where, status = pairs[m.path], "lands"
        else:  # where lorafit's rewrite would put it, to sit beside its layer; else where it was saved
            where, status = checked.alignment.chosen.pairs.get(m.path, m.path) if checked else m.path, "dropped"
        if status == "lands" and m.path in zero:
            status = "lora_B=0"
        row, column = place(where)
        adapted = params.get(m.path)
        # a parameter LoRA's r, alpha and scale are those of the parameter it adapts on this target
        rank, alpha, scaling = (m.per_param[adapted[0]] if adapted and m.kind == "param"
                                else (m.rank, m.alpha, m.scaling))
        cells.append(ModuleCell(m.path, where, row, column, status, m.kind, rank, alpha, scaling,
                                delta_norm(m, adapter, adapted)))
    if checked is not None:
        cells += _untouched(checked, {c.at for c in cells}, {c.column for c in cells})
    rows = sorted({c.row for c in cells}, key=_row_order)
    # modules in the model's own order (q, k, v, o, ...) when a tree is known, else in the adapter's
    paths = list(checked.target.tree.modules) if checked else [c.at for c in cells]
    order: dict[str, int] = {}
    for p in paths:
        order.setdefault(place(p)[1], len(order))
    columns = sorted({c.column for c in cells}, key=lambda col: (order.get(col, len(order)), col))
    # targeted modules of the target that get no tensor: drawn as such unless a dropped module is drawn there
    at_init = list(checked.alignment.as_is.missing) if checked else []
    return {"cells": [asdict(c) for c in cells], "rows": rows, "columns": columns, "at_init": at_init,
            "counts": dict(Counter(c.status for c in cells)), "landed_on": "target" if checked else "saved paths"}


def _untouched(checked: Checked, adapted: set[str], columns: set[str]) -> list[ModuleCell]:
    """Target modules no adapter module is drawn on: targeted ones stay at init (lora_B = 0); the others of the same
    kinds of module (the grid's columns) are shown as not targeted, so gaps in coverage are visible."""
    tree, al = checked.target.tree, checked.alignment
    missing = set(al.as_is.missing)
    out = []
    for path, info in tree.modules.items():
        if path in adapted or not info.lora_kind:
            continue
        row, column = place(path)
        if path in missing:
            out.append(ModuleCell(path, path, row, column, "at init", info.lora_kind))
        elif column in columns:
            out.append(ModuleCell(path, path, row, column, "not targeted", info.lora_kind))
    return out


def _row_order(row: str) -> tuple[int, str, int]:
    if row == "other":
        return (1, "", 0)
    stack, _, index = row.rpartition(".")
    return (0, stack, int(index))


def scan_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A scan's verdict matrix (adapters x [check, runtimes...]) and its adapters grouped by base and finding code.

    Returns:
        {"adapters": [...], "columns": [...], "verdicts": [[str]], "by_base": {base: [adapter]},
         "by_code": {code: [adapter]}}
    """
    adapters = [r["adapter"] for r in records]
    runtimes: list[str] = []
    for r in records:
        for row in ((r.get("report") or {}).get("result") or {}).get("runtimes") or []:
            if row["runtime"] not in runtimes:
                runtimes.append(row["runtime"])
    verdicts = []
    by_base: dict[str, list[str]] = {}
    by_code: dict[str, list[str]] = {}
    for r in records:
        report = r.get("report") or {}
        rows = {row["runtime"]: row["verdict"] for row in (report.get("result") or {}).get("runtimes") or []}
        verdicts.append([_check_verdict(r)] + [rows.get(rt, "not judged") for rt in runtimes])
        by_base.setdefault(r.get("base") or "(no base)", []).append(r["adapter"])
        codes = {f["code"] for f in report.get("findings", []) if f["severity"] != "info"}
        if "error" in r:
            codes = {"unreadable"}
        for code in sorted(codes):
            by_code.setdefault(code, []).append(r["adapter"])
    return {"adapters": adapters, "columns": ["check"] + runtimes, "verdicts": verdicts, "by_base": by_base,
            "by_code": dict(sorted(by_code.items(), key=lambda kv: (-len(kv[1]), kv[0])))}


def _check_verdict(record: dict[str, Any]) -> str:
    if "error" in record:
        return "unreadable"
    findings = (record.get("report") or {}).get("findings", [])
    if any(f["severity"] == "error" for f in findings):
        return "error"
    return "warning" if any(f["severity"] == "warning" for f in findings) else "ok"

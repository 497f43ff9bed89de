"""verify-merge: prove that a merged checkpoint is the base plus the adapter, and nothing else.

Independent of how the merge was made (lorafit, PEFT, another tool). Streaming: one tensor of each
checkpoint at a time. For every tensor the adapter changes, the expected value is computed again in
higher precision (fp32 for half-precision checkpoints, fp64 for fp32) with the plain formulas
(W + s·B@A, DoRA's m/‖W+ΔW‖·(W+ΔW), a saved copy for modules_to_save), and the merged value must be
within rounding of the checkpoint's dtype: one ulp at the result's magnitude plus one ulp at the
delta's (a safe merge rounds ΔW first). Every other tensor must be bit-identical to the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import Adapter
from .checker import alignment_summary
from .errors import LorafitError
from .findings import Finding
from .merge_math import lora_dtype
from .merge_plan import Delta, TensorPlan, build_plan, check_for_merge
from .report import Report
from .shards import _CHUNK, Checkpoint, torch_dtype
from .target import resolve_model_dir

if TYPE_CHECKING:
    import torch

# DoRA's norm and factor are computed in the adapter dtype (fp32): allow this many of its ulps at the result.
_DORA_ULPS = 16.0


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype`'s numbers at |x| (elementwise, computed in x's precision)."""
    import torch

    fi = torch.finfo(dtype)
    _, exp = torch.frexp(x.abs())
    spacing = torch.ldexp(torch.full_like(x, fi.eps / 2), exp)
    return torch.where(x.abs() < fi.tiny, torch.full_like(x, fi.tiny * fi.eps), spacing)


def expected_value(tp: TensorPlan, start: torch.Tensor, adapter: Adapter,
                   hp: torch.dtype, ldt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """base (or its replacement) + every delta in `hp`, with the textbook formulas.

    Returns:
        (expected value, slack): slack bounds the rounding of the merge's own arithmetic in the adapter dtype
        `ldt` (an r-term dot product per element of B @ A, DoRA's norm), which can exceed the checkpoint
        dtype's ulp where the delta nearly cancels the weight.
    """
    import torch

    w = start.to(hp)
    slack = torch.zeros_like(w)
    for d in tp.deltas:
        w, extra = _apply(w, d, adapter, hp, ldt)
        slack = slack + extra
    return w, slack


def _apply(w: torch.Tensor, d: Delta, adapter: Adapter, hp: torch.dtype,
           ldt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    def t(role: str) -> torch.Tensor:
        return adapter.tensor(d.keys[role]).to(hp)

    if d.role == "bias":
        change = d.scaling * t("bias")
        return w + change, ulp(change, ldt)
    a, b = t("A"), t("B")
    delta = d.scaling * (b @ a)  # [out, in]; an embedding's B @ A is [dim, vocab]
    bound = a.shape[0] * ulp(d.scaling * (b.abs() @ a.abs()), ldt)  # fl(dot of r terms) error <= r u sum|terms|
    if d.kind in ("conv1d", "embedding"):
        delta, bound = delta.T, bound.T  # GPT-2's Conv1D stores [in, out]; an embedding [vocab, dim]
    if not d.dora:
        return w + delta, bound
    v = w + delta
    m = t("magnitude")
    if d.kind == "linear":
        out = v * (m / v.norm(dim=1))[:, None]  # one norm per output row
    else:
        out = v * (m / v.norm(dim=0))[None, :]  # per output column (Conv1D) or per embedding dimension
    return out, bound + _DORA_ULPS * ulp(out, ldt)


@dataclass
class _Row:
    name: str
    modules: list[str]
    ok: bool
    unchanged: bool
    max_abs_error: float
    max_ulps: float
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.name, "modules": self.modules, "ok": self.ok, "unchanged": self.unchanged,
                "max_abs_error": self.max_abs_error, "max_ulps": round(self.max_ulps, 3), "note": self.note}


def _check_tensor(tp: TensorPlan, base: Checkpoint, merged: Checkpoint, adapter: Adapter) -> _Row:
    import torch

    modules = [d.module + (".bias" if d.role == "bias" else "") for d in tp.deltas]
    got = merged.read(tp.name)
    want_shape = base.tensors[tp.source].shape
    if tuple(got.shape) != tuple(want_shape):
        return _Row(tp.name, modules, False, False, float("inf"), float("inf"),
                    f"shape {list(got.shape)}, base {list(want_shape)}")
    dt = got.dtype
    if not dt.is_floating_point:
        return _Row(tp.name, modules, False, False, float("inf"), float("inf"), f"stored as {dt}")
    hp = torch.float64 if dt in (torch.float32, torch.float64) else torch.float32
    ldt = lora_dtype(dt)
    base_value = base.read(tp.source).to(dt)
    start = adapter.tensor(tp.replace).to(dt) if tp.replace is not None else base_value
    unchanged = torch.equal(got, base_value)
    expected, slack = expected_value(tp, start, adapter, hp, ldt)
    err = (got.to(hp) - expected).abs()
    # Rounding to the checkpoint dtype: the result once, and the delta once more for a safe merge.
    tol = ulp(expected, dt) + ulp(expected - start.to(hp), dt) + slack
    if tp.replace is not None and not tp.deltas:
        tol = torch.zeros_like(tol)  # a saved copy is loaded by an exact cast: nothing to round
    ok = bool((err <= tol).all()) and not bool(torch.isnan(got).any() and not torch.isnan(expected).any())
    # Reported in ulps at the magnitude of the operands (where W + ΔW cancels, the result's own ulp is tiny).
    scale = ulp(torch.maximum(expected.abs(), start.to(hp).abs()), dt)
    max_ulps = float((err / scale).max()) if err.numel() else 0.0
    return _Row(tp.name, modules, ok, unchanged, float(err.max()) if err.numel() else 0.0, max_ulps)


def _bit_identical(base: Checkpoint, key: str, merged: Checkpoint, mkey: str) -> bool:
    """Streamed equality; a merged tensor in another dtype must equal the base's exact cast (--dtype)."""
    import torch

    b, m = base.tensors[key], merged.tensors[mkey]
    if tuple(b.shape) != tuple(m.shape):
        return False
    if b.dtype == m.dtype:
        return all(x == y for x, y in zip(base.chunks(key), merged.chunks(mkey), strict=True))
    bsize, msize = b.nbytes // max(1, _numel(b.shape)), m.nbytes // max(1, _numel(m.shape))
    step = _CHUNK // max(bsize, msize)
    for i in range(0, _numel(b.shape), step):
        x = torch.frombuffer(base.read_range(key, i * bsize, step * bsize), dtype=torch_dtype(b.dtype))
        y = merged.read_range(mkey, i * msize, step * msize)
        if bytes(x.to(torch_dtype(m.dtype)).view(torch.uint8).numpy()) != bytes(y):
            return False
    return True


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def verify_merge(merged: str | Path, base: str | Path, adapter: Adapter | str | Path, class_name: str | None = None,
                 key_mapping: Sequence[str] | dict[str, str] | None = None) -> Report:
    """Prove that `merged` is `base` with `adapter` merged: adapted weights within rounding, the rest bit-equal.

    Args:
        merged: directory of the merged safetensors checkpoint.
        base: the base model directory (or cached hub id).
        adapter: adapter dir, cached hub id, or Adapter.
        class_name, key_mapping: as for merge (which class the adapter is aligned against).
    Returns:
        a Report (command "verify-merge") with one row per adapted tensor (max error, in ulps) and the findings
        merge-unchanged, merge-delta-wrong, merge-extra-change, merge-missing-tensor.
    Raises:
        LorafitError: unreadable inputs (missing or truncated shards, no adapter).
    """
    import json

    merged_dir, model_dir = Path(merged), resolve_model_dir(base)
    with Checkpoint.open(model_dir) as bck, Checkpoint.open(merged_dir) as mck:
        checked = check_for_merge(adapter, model_dir, class_name, key_mapping)
        a = checked.adapter
        plan = build_plan(a, checked.tree, checked.alignment.chosen, list(bck.tensors), model_dir)
        missing = [n for n in plan.order if n not in mck.tensors]
        changed = [n for n in plan.order if n not in plan.changes and n not in missing
                   and not _bit_identical(bck, plan.sources[n], mck, n)]
        changed += [f"{n} (not in the base)" for n in mck.tensors if n not in plan.sources]
        rows = [_check_tensor(tp, bck, mck, a) for n, tp in plan.changes.items() if n not in missing]
    findings: list[Finding] = []
    bad = [r for r in rows if not r.ok]
    if rows and len(bad) == len(rows) and all(r.unchanged for r in bad):
        findings.append(Finding("merge-unchanged", f"all {len(rows)} tensors the adapter changes are bit-identical to "
                                "the base: the adapter was not merged", [r.name for r in bad],
                                hint=f"lorafit merge {a.path} --base {base} -o MERGED"))
    elif bad:
        same = [r for r in bad if r.unchanged]
        worst = max(bad, key=lambda r: r.max_ulps)
        detail = f"{len(same)} of them unchanged from the base (not merged); " if same else ""
        findings.append(Finding("merge-delta-wrong", f"{len(bad)} of {len(rows)} adapted tensors differ from "
                                f"base + ΔW beyond dtype rounding: {detail}worst {worst.name} off by "
                                f"{worst.max_abs_error:.3g} ({worst.max_ulps:.3g} ulp) {worst.note}".rstrip(),
                                [r.name for r in sorted(bad, key=lambda r: not r.unchanged)]))
    if plan.untied and (merged_dir / "config.json").exists():
        config = json.loads((merged_dir / "config.json").read_text())
        if config.get("tie_word_embeddings", True) is not False:
            findings.append(Finding("merge-delta-wrong", "the merged embeddings are no longer tied, but config.json "
                                    "does not say tie_word_embeddings=false: loading ties them again and loses the "
                                    "trained side", plan.untied))
    if changed:
        findings.append(Finding("merge-extra-change", f"{len(changed)} tensors the adapter does not touch differ "
                                "from the base", changed))
    if missing:
        findings.append(Finding("merge-missing-tensor", f"{len(missing)} base tensors are missing from the merged "
                                "checkpoint", missing))
    if not rows and not plan.changes:
        raise LorafitError("the adapter changes no tensor of this base (run `lorafit check`)", a.path)
    return Report("verify-merge", adapter=checked.report.adapter, target=checked.report.target,
                  alignment=alignment_summary(checked.alignment), findings=findings,
                  modules=[r.to_json() for r in rows],
                  result={"merged": str(merged_dir), "tensors": len(plan.order), "adapted": len(rows),
                          "adapted_ok": len(rows) - len(bad), "bit_identical": len(plan.order) - len(plan.changes)
                          - len(missing) - len([c for c in changed if not c.endswith("(not in the base)")]),
                          "max_ulps": max((r.max_ulps for r in rows), default=0.0)})

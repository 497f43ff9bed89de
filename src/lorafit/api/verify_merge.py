"""verify-merge: prove that a merged checkpoint is the base plus the adapter, and nothing else.

Independent of how the merge was made (lorafit, PEFT, another tool). Streaming: one tensor of each
checkpoint at a time, worked through in row blocks. For every tensor the adapter changes, the expected
value is computed again in higher precision (fp32 for half-precision checkpoints, fp64 for fp32) with the
plain formulas (W + s·B@A, DoRA's m/‖W+ΔW‖·(W+ΔW), a saved copy for modules_to_save), and the merged
value must be within rounding of the checkpoint's dtype: one ulp at the result, one at the delta (a safe
merge rounds ΔW first), plus the error bound of the merge's own fp32 arithmetic. Every other tensor must
be bit-identical to the base.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter
from ..diagnose import plural, verb
from ..errors import LorafitError
from ..fileio.checkpoint import _CHUNK, FLOAT_CODES, TORCH_NAMES, Checkpoint, torch_dtype
from ..findings import Finding
from ..formats import ensure_adapter
from ..merging.math import lora_dtype, parameter_product, torch_threads
from ..merging.plan import Delta, TensorPlan
from ..report import Report
from ..targets import TargetRefused
from ..targets.transformers.resolve import read_model_config
from .base import resolve_base
from .check import adapter_only_report, alignment_summary, run_check_for_checkpoint
from .merge import plan_merge

if TYPE_CHECKING:
    import torch

# DoRA's norm and factor are computed in the adapter dtype (fp32): allow this many of its epsilons at the result.
_DORA_ULPS = 16.0
_BLOCK = 1 << 18  # elements per block: the dozen temporaries of a block stay in cache


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype`'s numbers at |x|, elementwise; x is fp32 or fp64 (read from its exponent bits).

    The spacing is 2^(e - p + 1) for |x| in [2^e, 2^(e+1)) with p the precision of `dtype`; below `dtype`'s
    smallest normal it is the subnormal spacing (floored at x's own smallest normal).
    """
    import math

    import torch

    fi = torch.finfo(dtype)
    precision = round(-math.log2(fi.eps)) + 1
    int_dt, mant, bias = (torch.int32, 23, 127) if x.dtype == torch.float32 else (torch.int64, 52, 1023)
    floor = max(1, bias + round(math.log2(fi.tiny)) - precision + 1)
    exponent = x.abs().view(int_dt) >> mant
    return ((exponent - (precision - 1)).clamp_(min=floor) << mant).view(x.dtype)


@dataclass
class _Factors:
    """One delta's adapter tensors in the reference precision, read once per tensor."""

    d: Delta
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    abs_a: torch.Tensor | None = None
    abs_b: torch.Tensor | None = None
    extra: torch.Tensor | None = None  # lora_B.bias or the DoRA magnitude


def _factors(d: Delta, adapter: Adapter, hp: torch.dtype) -> _Factors:
    def t(role: str) -> torch.Tensor:
        return adapter.tensor(d.keys[role]).to(hp)

    if d.role == "bias":
        return _Factors(d, extra=t("bias"))
    a, b = t("A"), t("B")
    return _Factors(d, a, b, a.abs(), b.abs(), t("magnitude") if d.dora else None)


def _parameter_delta(f: _Factors, rows: slice, window: tuple[int, int, int] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔW, s·|B|·|A|) of a LoRA on a parameter at rows `rows`: experts of the parameter, or rows of one
    expert's part when the checkpoint stores it per expert (`window`)."""
    assert f.a is not None and f.b is not None and f.abs_a is not None and f.abs_b is not None
    d = f.d
    if window is not None:
        e, start, stop = window
        pick = slice(e, e + 1)
        delta = d.scaling * parameter_product(f.a, f.b, d, pick)[0, start:stop][rows]
        return delta, d.scaling * parameter_product(f.abs_a, f.abs_b, d, pick)[0, start:stop][rows]
    if d.experts == 1:
        return d.scaling * (f.b[rows] @ f.a), d.scaling * (f.abs_b[rows] @ f.abs_a)
    return d.scaling * parameter_product(f.a, f.b, d, rows), d.scaling * parameter_product(f.abs_a, f.abs_b, d, rows)


def _apply(w: torch.Tensor, f: _Factors, rows: slice, eps: float,
           window: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (rows `rows` of the tensor, in hp) with one delta applied.

    Returns:
        (new w, bound of the merge's own rounding error in the adapter dtype whose machine epsilon is `eps`,
        magnitude of the terms summed: s·|B|·|A|, which can dwarf |W| and |W'| where the dot product cancels).
    """
    import torch

    d = f.d
    if d.role == "bias":
        assert f.extra is not None
        change = d.scaling * f.extra[rows]
        return w + change, eps * change.abs(), change.abs()
    assert f.a is not None and f.b is not None and f.abs_a is not None and f.abs_b is not None
    if d.kind == "param":  # A holds r rows per expert: the error bound counts r terms
        delta, size = _parameter_delta(f, rows, window)
        return w + delta, (f.a.shape[0] // d.experts * eps) * size, size
    if d.kind == "linear":  # weight [out, in]: rows are rows of B
        delta = d.scaling * (f.b[rows] @ f.a)
        size = d.scaling * (f.abs_b[rows] @ f.abs_a)
    else:  # Conv1D [in, out] and Embedding [vocab, dim]: rows are columns of A
        delta = (d.scaling * (f.b @ f.a[:, rows])).T
        size = (d.scaling * (f.abs_b @ f.abs_a[:, rows])).T
    bound = (f.a.shape[0] * eps) * size  # fl(dot of r terms) is within r units of roundoff of sum |terms|
    if not d.dora:
        return w + delta, bound, size
    assert f.extra is not None
    v = w + delta
    if d.kind == "linear":
        out = v * (f.extra[rows] / v.norm(dim=1))[:, None]  # one norm per output row
    else:
        out = v * (f.extra / v.norm(dim=0))[None, :]  # per output column (Conv1D) or embedding dimension
    return out, bound + (_DORA_ULPS * eps) * out.abs(), torch.maximum(size, v.abs())


@dataclass
class _Row:
    name: str
    modules: list[str]
    ok: bool
    unchanged: bool
    max_abs_error: float
    max_eps: float  # largest error relative to the largest quantity in the computation, in dtype epsilons
    note: str = ""
    non_finite: int = 0  # NaN or Inf elements where base and adapter are finite

    def to_json(self) -> dict[str, Any]:
        return {"path": self.name, "modules": self.modules, "ok": self.ok, "unchanged": self.unchanged,
                "max_abs_error": self.max_abs_error, "max_error_eps": round(self.max_eps, 3),
                "non_finite": self.non_finite, "note": self.note}


def _check_tensor(tp: TensorPlan, base: Checkpoint, merged: Checkpoint, adapter: Adapter) -> _Row:
    import torch

    modules = [d.module + (".bias" if d.role == "bias" else "") for d in tp.deltas]
    got = merged.read(tp.name)
    want_shape = tuple(base.tensors[tp.source].shape)
    if tuple(got.shape) != want_shape:
        return _Row(tp.name, modules, False, False, float("inf"), float("inf"),
                    f"shape {list(got.shape)}, base {list(want_shape)}")
    dt = got.dtype
    if not dt.is_floating_point:
        return _Row(tp.name, modules, False, False, float("inf"), float("inf"), f"stored as {dt}")
    hp = torch.float64 if dt in (torch.float32, torch.float64) else torch.float32
    eps, ldt_eps = torch.finfo(dt).eps, torch.finfo(lora_dtype(dt)).eps
    base_value = base.read(tp.source).to(dt)
    start = adapter.tensor(tp.replace).to(dt) if tp.replace is not None else base_value
    unchanged = torch.equal(got, base_value)
    exact = tp.replace is not None and not tp.deltas  # a saved copy is loaded by an exact cast: nothing to round
    factors = [_factors(d, adapter, hp) for d in tp.deltas]
    whole = got.dim() < 2 or any(d.dora and d.kind != "linear" for d in tp.deltas)  # column norms need all rows
    step = got.shape[0] if whole else max(1, _BLOCK // max(1, got[0].numel()))
    ok, max_err, max_rel, non_finite = True, 0.0, 0.0, 0
    for r0 in range(0, got.shape[0], step):
        rows = slice(r0, r0 + step)
        s = start[rows].to(hp)
        w, slack, size = s, torch.zeros_like(s), s.abs()
        for f in factors:
            w, extra, terms = _apply(w, f, rows, ldt_eps, tp.window)
            slack += extra
            size = torch.maximum(size, terms)
        g = got[rows].to(hp)
        if not g.numel():
            continue
        finite = torch.isfinite(w)
        if not bool(finite.all()):
            # Where base or delta is not finite the merge must give the same value (NaN stays NaN); elsewhere
            # the comparisons below hold. Non-finite expectations are left out of the error statistics.
            same = (g[~finite] == w[~finite]) | (torch.isnan(g[~finite]) & torch.isnan(w[~finite]))
            ok = ok and bool(same.all())
            g, w, s, slack, size = (t[finite] for t in (g, w, s, slack, size))
        bad = ~torch.isfinite(g)
        if bool(bad.any()):  # NaN or Inf where base and adapter are finite: the merge broke the weight
            non_finite += int(bad.sum())
            ok = False
            g, w, s, slack, size = (t[~bad] for t in (g, w, s, slack, size))
        err = (g - w).abs()
        if not err.numel():
            continue
        if exact:
            ok = ok and bool((err == 0).all())
        else:
            # tolerance = ulp(w) + ulp(w - s) + slack. ulp(x) >= |x| eps/2, so elements within this lower bound
            # pass; only the rest (few or none) need the exact ulps.
            change = (w - s).abs()
            suspect = ~(err <= (w.abs() + change) * (eps / 2) + slack)
            if bool(suspect.any()):
                tol = ulp(w[suspect], dt) + ulp((w - s)[suspect], dt) + slack[suspect]
                ok = ok and bool((err[suspect] <= tol).all())
        magnitude = torch.maximum(w.abs(), size)  # the largest quantity the merge computed with
        max_err = max(max_err, float(err.max()))
        max_rel = max(max_rel, float((err / magnitude.clamp_min(torch.finfo(dt).tiny)).max()) / eps)
    return _Row(tp.name, modules, ok, unchanged, max_err, max_rel, non_finite=non_finite)


def _checked_tensor(tp: TensorPlan, base: Checkpoint, merged: Checkpoint, adapter: Adapter) -> _Row:
    """_check_tensor, with adapter factors that do not fit together (rank-inconsistent) a failed row, not a crash."""
    try:
        return _check_tensor(tp, base, merged, adapter)
    except RuntimeError as e:
        modules = [d.module for d in tp.deltas]
        return _Row(tp.name, modules, False, False, float("inf"), float("inf"),
                    f"the adapter's tensors for it do not fit together ({str(e)[:120]}); see lorafit inspect")


def _bit_identical(base: Checkpoint, key: str, merged: Checkpoint, mkey: str) -> bool:
    """Streamed equality; a merged tensor in another dtype must equal the base's exact cast (--dtype)."""
    import torch

    b, m = base.tensors[key], merged.tensors[mkey]
    if tuple(b.shape) != tuple(m.shape):
        return False
    if b.dtype == m.dtype:
        return all(x == y for x, y in zip(base.chunks(key), merged.chunks(mkey), strict=True))
    numel = 1
    for n in b.shape:
        numel *= n
    bsize, msize = b.nbytes // max(1, numel), m.nbytes // max(1, numel)
    step = _CHUNK // max(bsize, msize)
    for i in range(0, numel, step):
        x = torch.frombuffer(base.read_range(key, i * bsize, step * bsize), dtype=torch_dtype(b.dtype))
        y = merged.read_range(mkey, i * msize, step * msize)
        if bytes(x.to(torch_dtype(m.dtype)).view(torch.uint8).numpy()) != bytes(y):
            return False
    return True


def verify_merge(merged: str | Path, base: str | Path | None, adapter: Adapter | str | Path,
                 class_name: str | None = None, key_mapping: Sequence[str] | dict[str, str] | None = None,
                 workers: int = 2, revision: str | None = None) -> Report:
    """Prove that `merged` is `base` with `adapter` merged: adapted weights within rounding, the rest bit-equal.

    Args:
        merged: directory of the merged safetensors checkpoint.
        base: the base model directory (or cached hub id); None: the base the adapter names.
        adapter: adapter dir, cached hub id, or Adapter.
        class_name, key_mapping: as for merge (which class the adapter is aligned against).
        workers: tensors checked at once (threads).
    Returns:
        a Report (command "verify-merge") with one row per adapted tensor (max error, in ulps) and the findings
        merge-unchanged, merge-delta-wrong, merge-extra-change, merge-missing-tensor.
    Raises:
        LorafitError: unreadable inputs (missing or truncated shards, no adapter), or an adapter that changes
            no tensor of the base.
    """
    adapter = ensure_adapter(adapter)
    ref = resolve_base(adapter, base, revision, needs="weights")
    merged_dir, model_dir = Path(merged), ref.path
    with Checkpoint.open(model_dir) as bck, Checkpoint.open(merged_dir) as mck:
        try:
            checked = run_check_for_checkpoint(adapter, model_dir, class_name, key_mapping)
        except TargetRefused as e:
            return adapter_only_report("verify-merge", adapter, e.finding)
        a = checked.adapter
        plan = plan_merge(checked, bck, model_dir)
        if not plan.changes:
            raise LorafitError("the adapter changes no tensor of this base (run `lorafit check`)", a.path)
        missing = [n for n in plan.order if n not in mck.tensors]
        same = [n for n in plan.order if n not in plan.changes and n not in missing]
        adapted = [tp for n, tp in plan.changes.items() if n not in missing]
        with torch_threads(workers), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            identical = list(pool.map(lambda n: _bit_identical(bck, plan.sources[n], mck, n), same))
            rows = list(pool.map(lambda tp: _checked_tensor(tp, bck, mck, a), adapted))
    changed = [n for n, eq in zip(same, identical, strict=True) if not eq]
    changed += [f"{n} (not in the base)" for n in mck.tensors if n not in plan.sources]
    dtypes = {TORCH_NAMES[t.dtype] for t in mck.tensors.values() if t.dtype in FLOAT_CODES}
    findings = _findings(rows, changed, missing, plan.untied, merged_dir, a, ref.spec, model_dir, dtypes)
    bad = sum(not r.ok for r in rows)
    return Report("verify-merge", adapter=checked.report.adapter, target=(checked.report.target or {}) | ref.summary(),
                  alignment=alignment_summary(checked.alignment), findings=findings,
                  modules=[r.to_json() for r in rows],
                  result={"merged": str(merged_dir), "tensors": len(plan.order), "adapted": len(rows),
                          "adapted_ok": len(rows) - bad, "bit_identical": sum(identical),
                          "max_error_eps": max((r.max_eps for r in rows), default=0.0),
                          "units": {"max_error_eps": "epsilons of the merged dtype, relative to the largest quantity "
                                                     "in the computation", "max_abs_error": "absolute (per module)"}})


def _findings(rows: list[_Row], changed: list[str], missing: list[str], untied: list[str], merged_dir: Path,
              adapter: Adapter, base: str | Path, model_dir: Path, merged_dtypes: set[str]) -> list[Finding]:
    findings: list[Finding] = []
    broken = [r for r in rows if r.non_finite]
    if broken:
        total = sum(r.non_finite for r in broken)
        findings.append(Finding("merge-non-finite", f"{total} values in {len(broken)} merged tensors are NaN or Inf "
                                "where the base and the adapter are finite: the merged model is broken",
                                [r.name for r in broken], count=len(broken),
                                hint=shlex.join(["lorafit", "merge", str(adapter.path), "--base", str(base), "-o",
                                                 str(merged_dir), "--overwrite"])))
    bad = [r for r in rows if not r.ok and not r.non_finite]
    if rows and len(bad) == len(rows) and all(r.unchanged for r in bad):
        findings.append(Finding("merge-unchanged", f"all {len(rows)} tensors the adapter changes are bit-identical to "
                                "the base: the adapter was not merged", [r.name for r in bad],
                                hint=shlex.join(["lorafit", "merge", str(adapter.path), "--base", str(base), "-o",
                                                 str(merged_dir), "--overwrite"])))
    elif bad:
        same = [r for r in bad if r.unchanged]
        worst = max(bad, key=lambda r: r.max_eps)
        detail = f"{len(same)} of them unchanged from the base (not merged); " if same else ""
        findings.append(Finding("merge-delta-wrong", f"{len(bad)} of {len(rows)} adapted tensors differ from "
                                f"base + ΔW beyond dtype rounding: {detail}worst {worst.name} off by "
                                f"{worst.max_abs_error:.3g} ({worst.max_eps:.3g} eps) {worst.note}".rstrip(),
                                [r.name for r in sorted(bad, key=lambda r: not r.unchanged)]))
    findings += _config_findings(model_dir, merged_dir, merged_dtypes, untied)
    if changed:
        differ = verb(len(changed), 'differs', 'differ')
        what = plural(len(changed), "tensor")
        findings.append(Finding("merge-extra-change", f"{what} the adapter does not touch {differ} from the base",
                                changed))
    if missing:
        are = verb(len(missing), 'is', 'are')
        what = plural(len(missing), "base tensor")
        findings.append(Finding("merge-missing-tensor", f"{what} {are} missing from the merged checkpoint", missing))
    return findings


# Fields a correct merge may change: bookkeeping, and the dtype (checked against the tensors instead).
_MAY_DIFFER = frozenset({"transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype", "use_cache"})


def _config_diff(base: dict[str, Any], merged: dict[str, Any], where: str = "") -> list[str]:
    """Fields that differ between two configs, as 'field: base -> merged', nested configs included."""
    out = []
    for key in sorted(set(base) | set(merged), key=str):
        if key in _MAY_DIFFER:
            continue
        b, m = base.get(key, "<absent>"), merged.get(key, "<absent>")
        if isinstance(b, dict) and isinstance(m, dict):
            out += _config_diff(b, m, f"{where}{key}.")
        elif b != m:
            out.append(f"{where}{key}: {str(b)[:60]} -> {str(m)[:60]}")
    return out


def _config_findings(model_dir: Path, merged_dir: Path, merged_dtypes: set[str], untied: list[str]) -> list[Finding]:
    """The merged config.json must describe the base's model: same architecture and sizes, the tensors' dtype.

    Tied embeddings written apart must say tie_word_embeddings=false (else loading ties them again).
    """
    path = merged_dir / "config.json"
    try:
        merged = read_model_config(merged_dir)
    except LorafitError as e:
        return [Finding("merge-config-differs", f"the merged model's config.json cannot be used: {e}", [str(path)])]
    base = read_model_config(model_dir)
    if untied:
        if merged.get("tie_word_embeddings", True) is not False:
            return [Finding("merge-delta-wrong", "the merged embeddings are no longer tied, but config.json does not "
                            "say tie_word_embeddings=false: loading ties them again and loses the trained side",
                            untied)]
        base = {**base, "tie_word_embeddings": False}
        for sub in ("text_config",):
            if isinstance(base.get(sub), dict) and "tie_word_embeddings" in base[sub]:
                base[sub] = {**base[sub], "tie_word_embeddings": False}
    diffs = _config_diff(base, merged)
    stated = merged.get("dtype") or merged.get("torch_dtype")
    if isinstance(stated, str) and len(merged_dtypes) == 1 and stated.removeprefix("torch.") not in merged_dtypes:
        diffs.append(f"dtype: config says {stated}, the merged weights are {next(iter(merged_dtypes))}")
    if not diffs:
        return []
    return [Finding("merge-config-differs", f"the merged config.json differs from the base's in {len(diffs)} fields "
                    "that describe the model: " + "; ".join(diffs[:3]), diffs)]

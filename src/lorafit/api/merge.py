"""merge: stream the base checkpoint tensor by tensor, merge the adapter in with PEFT's arithmetic, write shards.

Check first (refuse on an error finding unless forced), plan from the Alignment (so an adapter saved for
another class layout still lands on the right weights; merging/plan.py), run the plan (merging/run.py)
into a staged output directory, copy the base's support files, and rename it into place.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..diagnose import plural, rule_coverage
from ..errors import LorafitError, OutputExistsError
from ..fileio.checkpoint import (
    Checkpoint,
    ShardWriter,
    layout_shards,
    parse_size,
    write_index,
)
from ..fileio.inputs import confined, load_json
from ..fileio.manifest import write_manifest
from ..fileio.outputs import OutputDir, write_json
from ..findings import MERGE, Finding, mended_by
from ..formats import ensure_adapter
from ..merging.plan import MergePlan, build_plan
from ..merging.run import execute, out_code
from ..report import Report
from ..targets import TargetRefused
from ..targets.transformers.resolve import overridden_config
from ..version import __version__
from .base import resolve_base
from .check import Checked, adapter_only_report, alignment_summary, parse_config_overrides, run_check_for_checkpoint

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "fp64": "float64"}
# Files of the base that hold weights (or are indexes of them): never copied into the merged model.
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|.*\.index\.json$")


def parse_dtype(name: str | None) -> str | None:
    """'bf16' -> 'bfloat16' and so on; None keeps the base dtype. Raises LorafitError for anything else."""
    if name is None:
        return None
    key = name.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise LorafitError(f"--dtype {name!r} is not one of float32, float16, bfloat16, float64")
    return _DTYPES[key]


def plan_merge(checked: Checked, ckpt: Checkpoint, where: Path) -> MergePlan:
    """The merge plan of a checked adapter into `ckpt`, following how the checkpoint stores converted parameters."""
    stored = {}
    if checked.tree.converts_keys:
        from ..targets.transformers.conversion import stored_layout

        stored = stored_layout(checked.tree.model_type, {k: t.shape for k, t in ckpt.tensors.items()})
    return build_plan(checked.adapter, checked.tree, checked.alignment.chosen, list(ckpt.tensors), where, stored)


def merge_findings(checked: Checked) -> list[Finding]:
    """check's findings as they bear on a merge: coverage judged on the mapping merge uses, not on stock PEFT's.

    Findings that judge what the stock loader would do are the catalog's `mended_by` merge: merge lands the
    adapter itself through the chosen rewrite, so they are judged again on that landing or do not apply.
    """
    findings = [f for f in checked.report.findings if f.code not in mended_by(MERGE)]
    findings += rule_coverage(checked.adapter, checked.tree, checked.alignment.chosen, None)
    return findings


class _Progress:
    """Bytes written, with a rich progress bar (bytes/s) on stderr when asked for."""

    def __init__(self, total: int, show: bool) -> None:
        self._lock = threading.Lock()
        self._bar: Any = None
        if show:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(TextColumn("merging"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("merge", total=total)
            self._bar.start()

    def add(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def copy_support_files(model_dir: Path, out_dir: Path, untied: bool, out_dtype: str | None,
                       follow_symlinks: bool = False, overrides: dict[str, Any] | None = None) -> list[str]:
    """Copy config, generation config, tokenizer and every other non-weight file of the base; returns their names.

    config.json is rewritten only when the merge changes what it must say (untied embeddings, --dtype, the config
    overrides the base was loaded with, as save_pretrained would write them).
    Sub-directories are not copied: they hold other formats of the weights (e.g. original/*.pth).
    Raises:
        LorafitError: a file is a symlink out of the base directory (unless follow_symlinks), a FIFO or device.
    """
    copied = []
    for f in sorted(model_dir.iterdir()):
        if f.is_dir() or f.name.startswith(".") or _WEIGHT_FILE.fullmatch(f.name):
            continue
        confined(f, model_dir, follow_symlinks)
        if f.name == "config.json" and (untied or out_dtype or overrides):
            config = load_json(f)
            if not isinstance(config, dict):
                raise LorafitError("is not a JSON object", f)
            if overrides:
                config = overridden_config(config, overrides)
            if untied:
                config["tie_word_embeddings"] = False
                if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
                    config["text_config"]["tie_word_embeddings"] = False
            if out_dtype:
                for k in ("dtype", "torch_dtype"):
                    if k in config or k == "dtype":
                        config[k] = out_dtype
            write_json(out_dir / f.name, config)
        else:
            shutil.copyfile(f, out_dir / f.name)
        copied.append(f.name)
    return copied


def merge(adapter: Adapter | str | Path, base: str | Path | None, out: str | Path, class_name: str | None = None,
          key_mapping: Sequence[str] | dict[str, str] | None = None, dtype: str | None = None,
          safe_merge: bool = False, max_shard_size: str | int = "5GB", force: bool = False, workers: int = 2,
          progress: bool = False, follow_symlinks: bool = False, overwrite: bool = False,
          revision: str | None = None, config_overrides: Sequence[str] | dict[str, Any] | None = None) -> Report:
    """Merge `adapter` into the base checkpoint and write a full model to `out`, bit-identical to PEFT's merge.

    Args:
        adapter: adapter dir, cached hub id, or Adapter.
        base: a local model dir (safetensors, one file or sharded) or a hub id in the local cache; None: the base
            the adapter names.
        out: the output directory; it appears only when complete.
        class_name: the class the adapter is aligned against; default: the class the checkpoint was saved with.
        key_mapping: user regex rewrites of module paths, as for check.
        dtype: cast floating tensors first, as from_pretrained(dtype=...) would (default: keep the base dtype).
        safe_merge: follow merge_and_unload(safe_merge=True): ΔW rounded to the weight dtype first, NaN refused.
        max_shard_size: largest output shard ("5GB", "2GiB", bytes).
        force: merge even when check reports errors.
        overwrite: replace `out` if it exists (atomically, once the new output is complete).
        workers: threads merging tensors at once (memory grows with each).
        progress: show a progress bar on stderr.
        follow_symlinks: read files that are symlinks out of the base or adapter directory (refused by default,
            since their content would land in the output).
    Returns:
        the Report (command "merge"). With an error finding and no force, nothing is written.
    Raises:
        LorafitError: unreadable adapter or base, a missing or truncated shard, `out` exists (or appeared while
            writing) or cannot be written, `out` inside an input, a symlink out of an input directory.
    """
    out = Path(out)
    out_dtype = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    if os.path.lexists(out) and not overwrite:
        raise OutputExistsError("output already exists; pass --overwrite to replace it", out)
    adapter = ensure_adapter(adapter)
    overrides = parse_config_overrides(config_overrides)
    ref = resolve_base(adapter, base, revision, needs="weights")
    model_dir = ref.path
    t0 = time.perf_counter()
    with Checkpoint.open(model_dir, follow_symlinks=follow_symlinks) as ckpt:
        try:
            checked = run_check_for_checkpoint(adapter, model_dir, class_name, key_mapping, overrides)
        except TargetRefused as e:
            return adapter_only_report("merge", adapter, e.finding, out)
        for f in (checked.adapter.path / "adapter_config.json", checked.adapter.weights_path):
            confined(f, checked.adapter.path, follow_symlinks)
        report = Report("merge", adapter=checked.report.adapter, target=(checked.report.target or {}) | ref.summary(),
                        alignment=alignment_summary(checked.alignment), findings=merge_findings(checked))
        if not report.ok and not force:
            report.result = {"written": False, "out": str(out)}
            return report
        plan = plan_merge(checked, ckpt, model_dir)
        codes = {n: out_code(ckpt.tensors[plan.sources[n]].dtype, out_dtype) for n in plan.order}
        entries = [(n, codes[n], _out_shape(plan, n, ckpt, checked.adapter)) for n in plan.order]
        if not overrides:
            _refuse_reshaped(plan, ckpt, checked.adapter, out)
        metadata = {"format": "pt", "lorafit.version": __version__, "lorafit.adapter": str(checked.adapter.path),
                    "lorafit.safe_merge": str(safe_merge)}
        shards = layout_shards(entries, max_bytes, metadata)
        total = sum(s.size for s in shards)
        bar = _Progress(total, progress)
        try:
            staging = OutputDir(out, force=overwrite, protect=[model_dir, checked.adapter.path])
            with staging as tmp:
                writer = ShardWriter(tmp, shards)
                try:
                    execute(plan, ckpt, checked.adapter, writer, codes, out_dtype, safe_merge, workers, bar.add)
                finally:
                    writer.close()
                write_index(tmp, shards)
                try:
                    copied = copy_support_files(model_dir, tmp, bool(plan.untied), out_dtype, follow_symlinks,
                                                overrides)
                except OSError as e:
                    raise LorafitError(f"cannot copy the base's files ({e.strerror})", out) from None
                write_manifest(tmp)
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    _report_result(report, plan, checked, out, shards, total, seconds, out_dtype, safe_merge, copied, workers)
    report.findings += [Finding("stale-output-removed", line) for line in staging.cleaned]
    return report


def _refuse_reshaped(plan: MergePlan, ckpt: Checkpoint, adapter: Adapter, out: Path) -> None:
    """A saved tensor that replaces a base tensor of another shape (a 3-label head on a 2-label base) makes a model
    its own config.json cannot load: refused even with --force, unless the config overrides say the new size."""
    for name, tp in plan.changes.items():
        if tp.replace is None:
            continue
        new, old = tuple(adapter.infos[tp.replace].shape), tuple(ckpt.tensors[plan.sources[name]].shape)
        if new != old:
            raise LorafitError(f"{name} would be {list(new)} from the adapter where the base's config makes it "
                               f"{list(old)}: the merged model would not load. If you load the base with other "
                               "config values (num_labels=...), pass them with --config", out)


def _out_shape(plan: MergePlan, name: str, ckpt: Checkpoint, adapter: Adapter) -> tuple[int, ...]:
    """The shape written for `name`: the base's, or the adapter tensor's that replaces it (a head of another size)."""
    tp = plan.changes.get(name)
    if tp is not None and tp.replace is not None:
        return tuple(adapter.infos[tp.replace].shape)
    return tuple(ckpt.tensors[plan.sources[name]].shape)


def _report_result(report: Report, plan: MergePlan, checked: Checked, out: Path, shards: Sequence[Any], total: int,
                   seconds: float, out_dtype: str | None, safe: bool, copied: list[str], workers: int) -> None:
    rewrite = checked.alignment.chosen.rewrite.describe()
    report.result = {
        "written": True, "out": str(out), "shards": len(shards), "tensors": len(plan.order),
        "tensors_changed": len(plan.changes), "modules_merged": len(plan.modules), "bytes": total,
        "seconds": round(seconds, 3), "bytes_per_s": int(total / seconds) if seconds > 0 else None,
        "dtype": out_dtype or "as base", "safe_merge": safe, "rewrite": rewrite, "workers": workers,
        "files_copied": copied, "units": {"bytes": "bytes", "seconds": "s", "bytes_per_s": "bytes/s"},
    }
    report.modules = [{"path": tp.name, "modules": [d.module + (".bias" if d.role == "bias" else "")
                                                    for d in tp.deltas],
                       "replaced_by": tp.replace, "dora": any(d.dora for d in tp.deltas)}
                      for tp in plan.changes.values()]
    how = "as saved" if rewrite == "as saved" else f"after '{rewrite}'"
    report.findings.append(Finding("merged", f"wrote {out}: {len(plan.modules)} LoRA modules merged into "
                                   f"{plural(len(plan.changes), 'tensor')} ({how})" +
                                   (", tied embeddings changed together as in PEFT" if plan.tied_shared else "")))
    if plan.untied:
        report.findings.append(Finding(
            "weights-untied", "a modules_to_save copy replaces one side of the tied embeddings, so both are written "
            "and config.json says tie_word_embeddings=false (as PEFT's merge_and_unload does)", plan.untied))

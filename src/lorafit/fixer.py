"""fix: write a remapped adapter that stock PEFT loads completely on the target class.

Tensors are copied bit for bit under their new keys; the config is copied with task_type, pattern keys
and (only when needed) target_modules made to fit the target paths. The output is checked again
against the same tree before it is renamed into place: fix never leaves an adapter that would not land.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, patterns
from .adapter import BIN_NAME, CONFIG_NAME, PEFT_PREFIX, SAFETENSORS_NAME, Adapter, read_adapter, split_key
from .align import Mapping_, Rewrite, split_wrapper
from .checker import Checked, adapter_only_report, run_check, run_check_for
from .diagnose import wrapped_without_tensors
from .errors import LorafitError
from .findings import Finding
from .inputs import confined, open_regular
from .io import write_json
from .outputs import OutputDir
from .report import Report
from .target import CustomCodeRequired, resolve_model_dir

# The findings fix is answerable for: after a fix none of these may remain.
LANDING_CODES = {
    "unprefixed-keys", "targets-nothing",
    "layout-mismatch", "ambiguous-layout", "dropped-tensors", "missing-adapter-weights", "shape-mismatch",
    "embedding-size", "pattern-mismatch", "modules-to-save-absent", "task-type-incompatible",
    "task-type-mismatch",
}


class FixRefused(Exception):
    """The adapter cannot be made to land; carries the report that says why."""

    def __init__(self, report: Report) -> None:
        self.report = report
        super().__init__("fix refused")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(open_regular(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remap_keys(adapter: Adapter, m: Mapping_) -> dict[str, str]:
    """Old checkpoint key -> new key under mapping `m`; entries that do not land keep their key."""
    out = {}
    for key in adapter.infos:
        module, role, suffix = split_key(key)
        if role is not None and module in m.pairs:
            new_module = m.pairs[module]
        elif key in m.tensor_pairs:
            new_module = m.tensor_pairs[key] + split_wrapper(module)[1]
        else:
            new_module = module
        out[key] = f"{PEFT_PREFIX}{new_module}.{suffix}"
    return out


def _rewrite_names(names: Any, rewrite: Rewrite) -> Any:
    """Rewrite the prefix of names (pattern keys, modules_to_save) that spell out the old prefix."""
    if rewrite.regexes or not isinstance(names, list):
        return names
    out = []
    for n in names:
        rule = next(((s, d) for s, d in rewrite.rules if s and n.startswith(s)), None)
        out.append(rule[1] + n[len(rule[0]):] if rule else n)
    return out


def fixed_config(checked: Checked, m: Mapping_) -> dict[str, Any]:
    """The adapter config, made consistent with the target class and paths."""
    adapter, tree = checked.adapter, checked.tree
    cfg = dict(adapter.config)
    # The target's own task, unless its PEFT wrapper would wrap a head the adapter never trained (KeyError).
    task = tree.implied_task_type
    if wrapped_without_tensors(cfg, task, tree, m):
        task = None
    cfg["task_type"] = task
    for name in ("rank_pattern", "alpha_pattern"):
        pat = dict(cfg.get(name) or {})
        pat = dict(zip(_rewrite_names(list(pat), m.rewrite), pat.values(), strict=True))
        # Pin any module that would now resolve differently with an exact-path key, placed first so it wins.
        pinned = {}
        for src, dst in m.pairs.items():
            mod = adapter.modules[src]
            want = mod.rank if name == "rank_pattern" else mod.alpha
            got = patterns.resolve_rank_alpha({**cfg, name: pat}, dst)[0 if name == "rank_pattern" else 1]
            if got != want:
                pinned[re.escape(dst)] = int(want) if name == "rank_pattern" else want
        cfg[name] = {**pinned, **pat}
    cfg["modules_to_save"] = _rewrite_names(cfg.get("modules_to_save"), m.rewrite)
    landed = set(m.pairs.values())
    targeted = {p for p, info in tree.modules.items() if info.lora_kind and patterns.is_targeted(cfg, p)}
    if targeted != landed and landed:
        # target_modules spelled with the old prefix (a regex, or full paths): name the landed modules exactly.
        cfg["target_modules"] = sorted(landed)
    return cfg


def write_fixed(checked: Checked, out_dir: Path, source_desc: str | None = None,
                follow_symlinks: bool = True) -> dict[str, Any]:
    """Write the remapped adapter of `checked` into the existing empty dir `out_dir`. Returns provenance.

    Raises:
        LorafitError: with follow_symlinks False, an adapter file is a symlink out of the adapter directory;
            or a file to carry along is a FIFO or device.
    """
    from safetensors.torch import save_file

    adapter, al = checked.adapter, checked.alignment
    for f in (adapter.path / CONFIG_NAME, adapter.weights_path):
        confined(f, adapter.path, follow_symlinks)
    m = al.chosen
    keymap = remap_keys(adapter, m)
    tensors = {keymap[k]: adapter.tensor(k).contiguous() for k in adapter.infos}
    provenance = {
        "lorafit.version": __version__,
        "lorafit.source": source_desc or str(adapter.path),
        "lorafit.source_sha256": _sha256(adapter.weights_path),
        "lorafit.target_class": checked.tree.class_name,
        "lorafit.rewrite": m.rewrite.describe(),
        "lorafit.keys_renamed": str(sum(k != v for k, v in keymap.items())),
    }
    try:
        save_file(tensors, str(out_dir / SAFETENSORS_NAME), metadata={"format": "pt", **provenance})
    except Exception as e:  # safetensors reports a failed write (disk full) as its own SafetensorError
        raise LorafitError(f"cannot write the output ({(str(e).splitlines() or [''])[0][:160]})") from None
    write_json(out_dir / CONFIG_NAME, fixed_config(checked, m))
    for f in sorted(adapter.path.iterdir()):  # README, tokenizer files: carried along unchanged
        if f.name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME) or f.name.startswith(".") or f.is_dir():
            continue
        shutil.copyfile(confined(f, adapter.path, follow_symlinks), out_dir / f.name)
    return provenance


def _cleaned(staging: OutputDir) -> list[Finding]:
    return [Finding("stale-output-removed", line) for line in staging.cleaned]


def _recheck(checked: Checked, out_dir: Path) -> Report:
    return run_check(read_adapter(out_dir), checked.tree, checked.class_name, model=checked.model).report


def fix(adapter: Adapter | str | Path, base: str | Path | Any, out: str | Path, class_name: str | None = None,
        key_mapping: Sequence[str] | dict[str, str] | None = None, force: bool = False,
        follow_symlinks: bool = False) -> Report:
    """Rewrite `adapter` so that `PeftModel.from_pretrained(C.from_pretrained(base), out)` loads it completely.

    Args:
        follow_symlinks: copy files that are symlinks out of the adapter directory (refused by default).
    Returns:
        a Report with command "fix". When `report.ok` is False nothing was written and the findings say why.
    Raises:
        LorafitError: unreadable input, unknown class, base not found, `out` exists without force (or
            appeared while writing), `out` inside an input, a symlink out of the adapter directory.
    """
    out = Path(out)
    try:
        checked = run_check_for(adapter, base, class_name, key_mapping)
    except CustomCodeRequired as e:
        report = adapter_only_report("fix", adapter, e.finding)
        report.result = {"written": False, "out": str(out)}
        return report
    report = checked.report
    report.command = "fix"
    if checked.alignment.ambiguous:
        report.result = {"written": False, "out": str(out)}
        return report
    try:
        inputs = [checked.adapter.path]
        if isinstance(base, (str, Path)):
            inputs.append(resolve_model_dir(base))
        staging = OutputDir(out, force=force, protect=inputs)
        with staging as tmp:
            provenance = write_fixed(checked, tmp, follow_symlinks=follow_symlinks)
            after = _recheck(checked, tmp)
            blocking = [f for f in after.findings if f.severity == "error"]
            if blocking:
                raise FixRefused(after)
    except FixRefused as refused:
        report.findings = [f for f in report.findings if f.code not in LANDING_CODES or f.severity != "error"]
        for f in refused.report.findings:
            if f.severity == "error":
                f.message = f"after the best rewrite: {f.message}"
                report.findings.append(f)
        report.findings += _cleaned(staging)
        report.result = {"written": False, "out": str(out)}
        return report
    before = [f for f in report.findings if f.code in LANDING_CODES]
    report.findings = list(after.findings)
    mended = ", ".join(sorted({f.code for f in before})) or "none: the adapter already landed, copied as is"
    how = checked.alignment.chosen.rewrite.describe()
    if checked.adapter.unprefixed_keys:
        how += ", keys under base_model.model."
    report.findings.append(Finding("fixed", f"wrote {out} ({how}); "
                                   f"mended: {mended}"))
    report.findings += _cleaned(staging)
    report.result = {"written": True, "out": str(out), **provenance}
    return report

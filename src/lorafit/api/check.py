"""inspect and check: build the Report for an adapter alone, or for an adapter against a target class."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter import Adapter, entries_of
from ..align import Alignment, align
from ..diagnose import Health, adapter_findings, layout_findings
from ..errors import LorafitError, UnknownClassError
from ..findings import Finding
from ..formats import ensure_adapter, format_of
from ..formats.health import tensor_health
from ..report import Report, ranges
from ..targets import Runtime, Target, TargetRefused, get_runtime
from ..tree import ModuleTree
from ..user_regex import RegexTimeout


def parse_key_mapping(items: Sequence[str] | dict[str, str] | None) -> list[tuple[str, str]]:
    """Turn ['REGEX=REPL', ...] or {regex: repl} into pairs; raises LorafitError on a bad regex."""
    if not items:
        return []
    pairs = list(items.items()) if isinstance(items, dict) else []
    if not isinstance(items, dict):
        for item in items:
            if "=" not in item:
                raise LorafitError(f"--key-mapping {item!r} must look like REGEX=REPLACEMENT")
            pattern, repl = item.split("=", 1)
            pairs.append((pattern, repl))
    for pattern, repl in pairs:
        try:
            re.compile(pattern)
        except re.error as e:
            raise LorafitError(f"--key-mapping {pattern!r} is not a valid regex ({e})") from None
        try:  # an optional group always matches, so expand() checks the replacement's group references
            re.compile(f"(?:{pattern})?").match("").expand(repl)  # type: ignore[union-attr]
        except (re.error, IndexError) as e:
            raise LorafitError(f"--key-mapping replacement {repl!r} does not fit {pattern!r} ({e})") from None
    return pairs


def parse_config_overrides(items: Sequence[str] | dict[str, Any] | None) -> dict[str, Any]:
    """['num_labels=3', ...] or {'num_labels': 3} -> the config kwargs of from_pretrained. A value is read as JSON
    (3, true, 0.1, "x", [..]) and otherwise kept as a string. Raises LorafitError on a malformed item."""
    if not items:
        return {}
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key.strip().isidentifier():
                raise LorafitError(f"--config {item!r} must look like KEY=VALUE, e.g. num_labels=3")
            try:
                parsed: Any = json.loads(value)
            except ValueError:
                parsed = value
            pairs.append((key.strip(), parsed))
    for key, _ in pairs:
        if not isinstance(key, str) or not key.isidentifier():
            raise LorafitError(f"config override {key!r} is not a config field name")
    return dict(pairs)


def _coverage(adapter: Adapter) -> dict[str, Any]:
    """Layer x module-name cells the adapter covers, e.g. {'q_proj': '0-31', 'v_proj': '0-15,17'}."""
    cells: dict[str, set[int]] = {}
    other: list[str] = []
    for path, mod in adapter.modules.items():
        m = re.search(r"\.(\d+)\.", path + ".")
        name = path.rsplit(".", 1)[-1]
        if mod.kind == "param":  # a LoRA on parameters of a module (MoE experts): the module and what it may adapt
            name = f"{path[: len(path) - len(mod.wrapper)].rsplit('.', 1)[-1]}[{'/'.join(sorted(mod.per_param))}]"
        if m:
            cells.setdefault(name, set()).add(int(m.group(1)))
        else:
            other.append(path)
    layers = sorted(set().union(*cells.values())) if cells else []
    return {"layers": ranges(layers), "by_module": {k: ranges(sorted(v)) for k, v in sorted(cells.items())},
            "outside_layers": other}


def adapter_summary(adapter: Adapter, health: Health | None) -> dict[str, Any]:
    cfg = adapter.config
    dtypes = sorted({i.dtype for i in adapter.infos.values()})
    return {
        "path": str(adapter.path), "peft_type": cfg.get("peft_type"), "task_type": adapter.task_type,
        "base_model": adapter.base_model, "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora")), "use_dora": bool(cfg.get("use_dora")),
        "modules": len(adapter.modules), "tensors": len(adapter.infos),
        "parameters": health.parameters if health else sum(i.numel for i in adapter.infos.values()),
        "dtype": ",".join(dtypes), "modules_to_save": cfg.get("modules_to_save"),
        "coverage": _coverage(adapter),
    }


def module_rows(adapter: Adapter, health: Health | None) -> list[dict[str, Any]]:
    rows = []
    for m in adapter.modules.values():
        state = "ok"
        if health is not None:
            bad = [health.non_finite[k] for k in m.keys.values() if k in health.non_finite]
            state = bad[0] if bad else ("lora_B=0" if m.path in health.zero_b else "ok")
        rows.append({"path": m.path, "kind": m.kind, "r": m.rank, "alpha": m.alpha, "scaling": round(m.scaling, 6),
                     "in": m.in_features, "out": m.out_features, "dtype": adapter.infos[m.keys["A"]].dtype,
                     "dora": m.has_dora, "bias": m.has_bias, "health": state})
    for x in adapter.extras:
        rows.append({"path": x.key, "kind": x.kind, "r": "", "alpha": "", "scaling": "", "in": "",
                     "out": list(x.info.shape), "dtype": x.info.dtype, "dora": "", "bias": "",
                     "health": (health.non_finite.get(x.key, "ok") if health else "")})
    return rows


def _adapter_findings(adapter: Adapter, health: Health | None) -> list[Finding]:
    return adapter_findings(adapter, health, format_of(adapter).adapter_rules(adapter))


def inspect(adapter: Adapter | str | Path, read_tensors: bool = True, manifest: str | Path | None = None) -> Report:
    """Describe an adapter and judge its health, reading no model.

    Args:
        adapter: adapter dir, a file in it, a hub id in the local cache, or an Adapter.
        read_tensors: also read tensor data for health (all-zero lora_B, NaN, Inf); False reads headers only.
        manifest: also write the SHA-256 sums of the adapter's files to this file (outside the adapter), for
            `lorafit verify-files ADAPTER --manifest FILE` later.
    Returns:
        the Report (command "inspect"); `report.ok` is False when any finding is an error.
    Raises:
        LorafitError: the adapter cannot be read (the message names the file).
    """
    from .runtimes import runtime_matrix

    a = ensure_adapter(adapter)
    health = tensor_health(a) if read_tensors else None
    result: dict[str, Any] = {"runtimes": runtime_matrix(a)}
    if manifest is not None:
        result["manifest"] = str(_write_adapter_manifest(a, Path(manifest)))
    return Report("inspect", adapter=adapter_summary(a, health), findings=_adapter_findings(a, health),
                  modules=module_rows(a, health), result=result)


def _write_adapter_manifest(a: Adapter, to: Path) -> Path:
    """The adapter directory's manifest, written atomically to `to` (never inside the adapter: an input)."""
    from ..fileio.manifest import manifest_of
    from ..fileio.outputs import OutputFile, write_json

    if not a.path.is_dir():
        raise LorafitError("--manifest lists the files of an adapter directory; this adapter is one file", a.path)
    with OutputFile(to, protect=[a.path]) as tmp:
        write_json(tmp, manifest_of(a.path))
    return to


@dataclass
class Checked:
    """Everything check worked out, for fix/load/merge to reuse without aligning again."""

    report: Report
    adapter: Adapter
    target: Target
    alignment: Alignment
    runtime: Runtime

    @property
    def tree(self) -> ModuleTree:
        return self.target.tree

    @property
    def class_name(self) -> str:
        return self.target.how


def alignment_summary(al: Alignment) -> dict[str, Any]:
    return {"total": al.total, "lands_as_is": al.as_is.score, "lands_after_rewrite": al.chosen.score,
            "rewrite": al.chosen.rewrite.to_json(), "needs_rewrite": al.needs_rewrite,
            "ambiguous": [m.rewrite.describe() for m in al.ambiguous],
            "rejected": [{"rewrite": r.describe(), "lands": s, "why": why} for r, s, why in al.rejected[:5]]}


def _fix_command(a: Adapter, target: Target, key_mapping: Sequence[tuple[str, str]]) -> str:
    """The exact `lorafit fix` command line that lands `a` on `target`."""
    # the output is suggested in the current directory: never beside an adapter that lies in the HF cache
    cmd = ["lorafit", "fix", str(a.path), "--base", target.base or "MODEL", *target.hint_args, "--class",
           target.how, "-o", f"{a.path.name}-{target.how.lower()}"]
    for p, r in key_mapping:
        cmd += ["--key-mapping", f"{p}={r}"]
    return shlex.join(cmd)


def run_check(adapter: Adapter | str | Path, target: Target, key_mapping: Sequence[tuple[str, str]] = (),
              read_tensors: bool = True, runtime: Runtime | None = None) -> Checked:
    """Align `adapter` with `target` and collect every finding (adapter alone, alignment, runtime).

    Raises:
        LorafitError: unreadable adapter; a config regex too slow on the target's paths.
    """
    a = ensure_adapter(adapter)
    try:
        return _run_check(a, target, key_mapping, read_tensors, runtime or get_runtime())
    except RegexTimeout as e:  # a config regex too slow on the target's paths: name the config it came from
        raise e.at(a.path / "adapter_config.json") from None


def _run_check(a: Adapter, target: Target, key_mapping: Sequence[tuple[str, str]], read_tensors: bool,
               runtime: Runtime) -> Checked:
    fmt, tree = format_of(a), target.tree
    health = tensor_health(a) if read_tensors else None
    al = align(entries_of(a), tree, fmt.targeting(a), key_mapping, load_renames=runtime.load_renames(a, target))
    findings = _adapter_findings(a, health)
    findings += layout_findings(a, tree, al, lambda: _fix_command(a, target, key_mapping), runtime.trained_as(a),
                                lambda landing, hint: fmt.landing_rules(a, tree, landing, hint))
    runtime.refine(findings, a, al)
    findings += _linked(findings, runtime.rules(a, target, al)) + target.notes
    for f in findings:
        if f.code == "unprefixed-keys" and target.base is not None:  # with a target: the user's own command
            f.hint = _fix_command(a, target, key_mapping)
    report = Report("check", adapter=adapter_summary(a, health),
                    target=tree.summary() | {"requested_class": target.how}, alignment=alignment_summary(al),
                    findings=findings, modules=module_rows(a, health))
    return Checked(report, a, target, al, runtime)


# Loading with another class than the adapter was trained on is one cause: when its paths show it (layout-mismatch),
# the task_type findings that the same choice of class brings are shown under it.
_SAME_CAUSE = {"task-type-incompatible", "task-type-mismatch"}


def _linked(findings: list[Finding], runtime_findings: list[Finding]) -> list[Finding]:
    if any(f.code == "layout-mismatch" and not f.caused_by for f in findings):
        for f in runtime_findings:
            if f.code in _SAME_CAUSE:
                f.caused_by, f.severity = "layout-mismatch", "warning"
    return runtime_findings


def check(adapter: Adapter | str | Path, base: str | Path | Any = None, class_name: str | type | None = None,
          key_mapping: Sequence[str] | dict[str, str] | None = None, revision: str | None = None,
          config_overrides: Sequence[str] | dict[str, Any] | None = None) -> Report:
    """Will this adapter land on `base` loaded as `class_name`? Works from config and headers only.

    Args:
        adapter: adapter dir, hub id in the local cache, or an Adapter.
        base: a local model dir or cached hub id, or a live nn.Module / PeftModel; default: the base the adapter
            names (base_model_name_or_path). The report's target says which, and where it came from.
        class_name: Auto class or concrete class, by name or as the class itself (AutoModel);
            default: what the adapter's task_type implies.
        key_mapping: user regex rewrites of module paths ('REGEX=REPL' strings or a dict).
        revision: the branch, tag or commit of a hub id's snapshot in the HF cache.
        config_overrides: the config kwargs you pass to from_pretrained ({"num_labels": 3} or ["num_labels=3"]).
    Returns:
        the Report; `report.ok` is False when any finding is an error.
    Raises:
        LorafitError: unreadable adapter, unknown class, base not found locally.
    """
    try:
        return run_check_on(adapter, base, class_name, key_mapping, revision,
                            config_overrides=config_overrides).report
    except TargetRefused as e:
        return adapter_only_report("check", adapter, e.finding)


def run_check_on(adapter: Adapter | str | Path, base: str | Path | Any, class_name: str | type | None = None,
                 key_mapping: Sequence[str] | dict[str, str] | None = None, revision: str | None = None,
                 needs: str = "config", config_overrides: Sequence[str] | dict[str, Any] | None = None) -> Checked:
    """run_check_for with the base resolved as check resolves it (default: the adapter's own; see api/base.py);
    the report's target says which base, and from where."""
    from .base import is_live, resolve_base

    a = ensure_adapter(adapter)
    if is_live(base):
        return run_check_for(a, base, class_name, key_mapping)
    ref = resolve_base(a, base, revision, needs)
    overrides = parse_config_overrides(config_overrides)
    hint_args = (["--revision", revision] if revision else []) + [
        a for k, v in overrides.items() for a in ("--config", f"{k}={v if isinstance(v, str) else json.dumps(v)}")]
    checked = run_check_for(a, ref.path, class_name, key_mapping, label=ref.spec, config_overrides=overrides,
                            hint_args=hint_args)
    if checked.report.target is not None:
        checked.report.target |= ref.summary()
    return checked


def adapter_only_report(command: str, adapter: Adapter | str | Path, finding: Finding,
                        out: Path | None = None) -> Report:
    """What a command can say without a module tree: the adapter's own findings, plus `finding` (why no tree).

    With `out`, the report also says that nothing was written there.
    """
    report = inspect(adapter)
    report.command = command
    report.result = {}
    report.findings.append(finding)
    if out is not None:
        report.result = {"written": False, "out": str(out)}
    return report


def class_name_of(class_name: str | type | None) -> str | None:
    """A class given as an object (AutoModel, LlamaForCausalLM) by its name; transformers' own classes only.

    Raises:
        UnknownClassError: the class is not one transformers exports under that name.
    """
    if class_name is None or isinstance(class_name, str):
        return class_name
    name = getattr(class_name, "__name__", None)
    import transformers

    if not isinstance(class_name, type) or name is None or getattr(transformers, name, None) is not class_name:
        raise UnknownClassError(f"{class_name!r} is not a transformers model class; pass a transformers class or "
                                "its name, or load the model yourself and pass the model as the base")
    return name


def run_check_for(adapter: Adapter | str | Path, base: str | Path | Any, class_name: str | type | None = None,
                  key_mapping: Sequence[str] | dict[str, str] | None = None, label: str | None = None,
                  config_overrides: Sequence[str] | dict[str, Any] | None = None,
                  hint_args: Sequence[str] = ()) -> Checked:
    """check, keeping the intermediate objects (see Checked). `label` names the base in hints (the user's hub id
    where `base` is its snapshot directory)."""
    a = ensure_adapter(adapter)
    mapping = parse_key_mapping(key_mapping)
    runtime = get_runtime()
    target = runtime.target(base, class_name_of(class_name), a, parse_config_overrides(config_overrides) or None)
    if label is not None:
        target.base = label
    target.hint_args = list(hint_args)
    return run_check(a, target, mapping, runtime=runtime)


def run_check_for_checkpoint(adapter: Adapter | str | Path, model_dir: Path, class_name: str | type | None,
                             key_mapping: Sequence[str] | dict[str, str] | None,
                             config_overrides: dict[str, Any] | None = None) -> Checked:
    """run_check_for against the class the checkpoint was saved with, unless the user names one.

    The saved class's module paths are the checkpoint's tensor names, which a merge writes and verify-merge reads.

    Raises:
        LorafitError: unreadable adapter, unknown --class, unreadable config.
    """
    from ..targets.transformers.resolve import saved_class

    over = config_overrides
    if class_name:
        return run_check_for(adapter, str(model_dir), class_name, key_mapping, config_overrides=over)
    saved_as = saved_class(model_dir)
    if saved_as:
        try:
            return run_check_for(adapter, str(model_dir), saved_as, key_mapping, config_overrides=over)
        except UnknownClassError:
            pass  # custom code: fall back to the class the adapter's task_type implies
    return run_check_for(adapter, str(model_dir), None, key_mapping, config_overrides=over)

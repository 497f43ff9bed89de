"""inspect and check: build the Report for an adapter alone, or for an adapter against a target class."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .adapter import Adapter, ensure_adapter, entries_of
from .align import Alignment, align
from .diagnose import adapter_findings, target_findings
from .errors import LorafitError
from .findings import Finding
from .health import Health, tensor_health
from .report import Report, ranges
from .target import default_class_name
from .tree import ModuleTree
from .user_regex import RegexTimeout


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


def _coverage(adapter: Adapter) -> dict[str, Any]:
    """Layer x module-name cells the adapter covers, e.g. {'q_proj': '0-31', 'v_proj': '0-15,17'}."""
    cells: dict[str, set[int]] = {}
    other: list[str] = []
    for path in adapter.modules:
        m = re.search(r"\.(\d+)\.", path + ".")
        name = path.rsplit(".", 1)[-1]
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


def inspect(adapter: Adapter | str | Path, read_tensors: bool = True) -> Report:
    """Describe an adapter and judge its health. Returns a Report; raises LorafitError on unreadable input."""
    a = ensure_adapter(adapter)
    health = tensor_health(a) if read_tensors else None
    return Report("inspect", adapter=adapter_summary(a, health), findings=adapter_findings(a, health),
                  modules=module_rows(a, health))


@dataclass
class Checked:
    """Everything check worked out, for fix/load/merge to reuse without aligning again."""

    report: Report
    adapter: Adapter
    tree: ModuleTree
    alignment: Alignment
    class_name: str
    model: Callable[[], Any] | None = None  # the target model on demand (see run_check)


def alignment_summary(al: Alignment) -> dict[str, Any]:
    return {"total": al.total, "lands_as_is": al.as_is.score, "lands_after_rewrite": al.chosen.score,
            "rewrite": al.chosen.rewrite.to_json(), "needs_rewrite": al.needs_rewrite,
            "ambiguous": [m.rewrite.describe() for m in al.ambiguous],
            "rejected": [{"rewrite": r.describe(), "lands": s, "why": why} for r, s, why in al.rejected[:5]]}


def run_check(adapter: Adapter | str | Path, tree: ModuleTree, class_name: str,
              key_mapping: Sequence[tuple[str, str]] = (), base: str | None = None,
              read_tensors: bool = True, model: Callable[[], Any] | None = None) -> Checked:
    """Align `adapter` with `tree` and collect every finding (adapter alone and adapter x target).

    `model` returns the target model (meta is fine); it is called only for model types whose keys PEFT
    converts on load, to ask PEFT how it will rename this adapter's keys.
    """
    a = ensure_adapter(adapter)
    try:
        return _run_check(a, tree, class_name, key_mapping, base, read_tensors, model)
    except RegexTimeout as e:  # a config regex too slow on the target's paths: name the config it came from
        raise e.at(a.path / "adapter_config.json") from None


def _run_check(a: Adapter, tree: ModuleTree, class_name: str, key_mapping: Sequence[tuple[str, str]],
               base: str | None, read_tensors: bool, model: Callable[[], Any] | None) -> Checked:
    health = tensor_health(a) if read_tensors else None
    renames = None
    if tree.converts_keys and model is not None:
        from .conversion import load_renames

        renames = load_renames(a, model())
    al = align(entries_of(a), tree, a.config, key_mapping, load_renames=renames)

    def fix_cmd() -> str:
        cmd = ["lorafit", "fix", str(a.path), "--base", base or "MODEL", "--class", class_name,
               "-o", str(a.path.parent / f"{a.path.name}-{class_name.lower()}")]
        for p, r in key_mapping:
            cmd += ["--key-mapping", f"{p}={r}"]
        return shlex.join(cmd)

    auto = tree.implied_task_type
    class_hint = (f"lorafit fix rewrites task_type to {auto or 'null'}; or load with the class the adapter was "
                  f"trained with (--class {default_class_name(a.task_type)})")
    findings = adapter_findings(a, health) + target_findings(a, tree, al, fix_cmd, class_hint)
    target = tree.summary() | {"requested_class": class_name}
    report = Report("check", adapter=adapter_summary(a, health), target=target,
                    alignment=alignment_summary(al), findings=findings, modules=module_rows(a, health))
    return Checked(report, a, tree, al, class_name, model)


def check(adapter: Adapter | str | Path, base: str | Path | Any, class_name: str | None = None,
          key_mapping: Sequence[str] | dict[str, str] | None = None) -> Report:
    """Will this adapter land on `base` loaded as `class_name`? Works from config and headers only.

    Args:
        adapter: adapter dir, hub id in the local cache, or an Adapter.
        base: a local model dir or cached hub id, or a live nn.Module / PeftModel.
        class_name: Auto class or concrete class; default: what the adapter's task_type implies.
        key_mapping: user regex rewrites of module paths ('REGEX=REPL' strings or a dict).
    Returns:
        the Report; `report.ok` is False when any finding is an error.
    Raises:
        LorafitError: unreadable adapter, unknown class, base not found locally.
    """
    from .target import CustomCodeRequired

    try:
        return run_check_for(adapter, base, class_name, key_mapping).report
    except CustomCodeRequired as e:
        return adapter_only_report("check", adapter, e.finding)


def adapter_only_report(command: str, adapter: Adapter | str | Path, finding: Finding) -> Report:
    """What a command can say without a module tree: the adapter's own findings, plus `finding` (why no tree)."""
    report = inspect(adapter)
    report.command = command
    report.findings.append(finding)
    return report


def meta_model_thunk(base: str | Path, class_name: str) -> Callable[[], Any]:
    """A function that builds (once) the meta-device model of `class_name` for `base`."""

    @cache
    def build() -> Any:
        from .target import build_meta_model, load_config, resolve_class, resolve_model_dir

        model_dir = resolve_model_dir(base)
        config = load_config(model_dir)
        return build_meta_model(resolve_class(class_name, config, model_dir), config, model_dir)

    return build


def run_check_for(adapter: Adapter | str | Path, base: str | Path | Any, class_name: str | None = None,
                  key_mapping: Sequence[str] | dict[str, str] | None = None) -> Checked:
    """check, keeping the intermediate objects (see Checked)."""
    a = ensure_adapter(adapter)
    mapping = parse_key_mapping(key_mapping)
    if isinstance(base, (str, Path)):
        from .target import custom_code_finding, read_model_config, resolve_model_dir, tree_from_pretrained

        model_dir = resolve_model_dir(base)
        note = custom_code_finding(model_dir, read_model_config(model_dir))
        name = class_name or default_class_name(a.task_type)
        tree = tree_from_pretrained(base, name)
        checked = run_check(a, tree, name, mapping, base=str(base), model=meta_model_thunk(base, name))
        if note is not None:
            checked.report.findings.append(note)
        return checked
    from .tree import tree_from_module

    tree = tree_from_module(base)
    return run_check(a, tree, tree.class_name, mapping, model=lambda: base)

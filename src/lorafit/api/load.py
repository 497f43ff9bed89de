"""load_adapter and verify: load through stock PEFT after aligning, then prove the load bit for bit."""

from __future__ import annotations

import logging
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..align import Landing
from ..diagnose import never_trained, never_trained_findings
from ..errors import AdapterMismatchError
from ..findings import Finding
from ..formats import ensure_adapter, format_of
from ..formats.peft.reader import split_key
from ..formats.peft.writer import remap_keys
from ..report import Report
from ..targets import get_runtime
from .check import Checked, run_check


def _check_live(adapter: Adapter, model: Any, read_tensors: bool = True) -> Checked:
    """check against a live model (a PeftModel is judged by the model it wraps)."""
    runtime = get_runtime()
    return run_check(adapter, runtime.target(model, None, adapter), read_tensors=read_tensors, runtime=runtime)


def _same_bits(loaded: Any, saved: Any) -> bool:
    """Bit equality after casting the loaded tensor back to the checkpoint's dtype (PEFT may upcast bf16)."""
    import torch

    if loaded.device.type == "meta":
        return False
    x = loaded.detach().cpu().to(saved.dtype).contiguous()
    return x.shape == saved.shape and torch.equal(x.view(torch.uint8), saved.contiguous().view(torch.uint8))


def _problems(findings: list[Finding]) -> list[str]:
    """One line per finding and one per example key, for AdapterMismatchError's list."""
    out = []
    for f in findings:
        out.append(f"{f.code}: {f.message}")
        out += [f"    {k}" for k in f.keys]
    return out


def _probe(peft_model: Any, adapter_name: str, paths: list[str]) -> list[str]:
    """Adapted modules whose output does not change on a random input although their lora_B is non-zero."""
    import torch

    base = peft_model.get_base_model()
    dead = []
    g = torch.Generator().manual_seed(0)
    previous = list(getattr(peft_model, "active_adapters", [adapter_name]))
    peft_model.set_adapter(adapter_name)
    try:
        with torch.no_grad():
            for path in paths:
                layer = base.get_submodule(path)
                b = None
                if adapter_name in getattr(layer, "lora_B", {}):
                    b = layer.lora_B[adapter_name].weight
                elif adapter_name in getattr(layer, "lora_embedding_B", {}):
                    b = layer.lora_embedding_B[adapter_name]
                if b is None or not b.any():
                    continue
                inner = layer.base_layer
                w = inner.weight
                if isinstance(inner, torch.nn.Embedding):
                    x = torch.randint(0, inner.num_embeddings, (2, 3), generator=g)
                else:
                    n_in = w.shape[0] if type(inner).__name__ == "Conv1D" else w.shape[1]
                    x = torch.randn(2, n_in, generator=g).to(w.dtype)
                if torch.equal(layer(x), inner(x)):
                    dead.append(path)
    finally:
        peft_model.set_adapter(previous[0] if len(previous) == 1 else previous)
    return dead


@dataclass
class _Comparison:
    """How the checkpoint's tensors compare with what the model holds, key by key (the evidence verify judges)."""

    not_loaded: list[str] = field(default_factory=list)  # checkpoint keys whose remapped key the model lacks
    unequal: list[str] = field(default_factory=list)  # loaded keys whose value differs from the checkpoint's
    equal: int = 0  # tensors loaded bit-equal
    left_at_init: list[str] = field(default_factory=list)  # modules holding LoRA tensors the checkpoint has not


def _adapter_name(peft_model: Any, adapter_name: str | None) -> str:
    """The adapter to verify: the one named, else the model's active one (the first, if several are active)."""
    active = getattr(peft_model, "active_adapter", "default")
    return adapter_name or (active[0] if isinstance(active, list) else str(active))


def _meta_findings(peft_model: Any) -> list[Finding]:
    """meta-tensors: parameters never loaded for real, so the forward pass computes garbage."""
    meta = [n for n, p in peft_model.named_parameters() if p.device.type == "meta"]
    if not meta:
        return []
    return [Finding("meta-tensors", f"{len(meta)} parameters are still on the meta device: the "
                    "forward pass returns garbage (low_cpu_mem_usage=True with keys that did not match)",
                    meta, hint="lorafit.load_adapter(model, adapter) loads them for real")]


def _compare(a: Adapter, keymap: dict[str, str], loaded: dict[str, Any]) -> _Comparison:
    """Compare every checkpoint tensor with the loaded one under its remapped key; find LoRA tensors none maps to."""
    c = _Comparison()
    for old, new in keymap.items():
        if new not in loaded:
            c.not_loaded.append(old)
        elif not _same_bits(loaded[new], a.tensor(old)):
            c.unequal.append(new)
        else:
            c.equal += 1
    expected = set(keymap.values())
    c.left_at_init = sorted({split_key(k)[0] for k in loaded if k not in expected and split_key(k)[1] is not None})
    return c


def _not_loaded_findings(c: _Comparison) -> list[Finding]:
    """dropped-tensors: adapter tensors the loaded model does not hold at all."""
    if not c.not_loaded:
        return []
    return [Finding("dropped-tensors", f"{len(c.not_loaded)} adapter tensors are not in the loaded model",
                    c.not_loaded)]


def _left_at_init_findings(a: Adapter, c: _Comparison, keymap: dict[str, str], where: str) -> list[Finding]:
    """missing-adapter-weights: adapted modules whose LoRA tensors the checkpoint did not fill (never-trained-modules
    for those in a part of the model the adapter never had, where lora_B = 0 keeps them inert)."""
    if not c.left_at_init:
        return []
    landed = {split_key(k)[0] for k in keymap.values()}
    lost, branches = never_trained(c.left_at_init, landed, inert=a.init_b_zero)
    out = [Finding("missing-adapter-weights", f"{len(lost)} adapted modules hold tensors the "
                   "checkpoint does not have: they kept their init values", lost)] if lost else []
    return out + never_trained_findings(where, branches)


def _not_bit_equal_findings(c: _Comparison, loaded: dict[str, Any]) -> list[Finding]:
    """not-bit-equal: loaded tensors that differ from the checkpoint; all-zero ones mean PEFT left them at init."""
    if not c.unequal:
        return []
    zeros = sum(1 for k in c.unequal if loaded[k].device.type != "meta" and not loaded[k].any())
    why = (f"; {zeros} of them are all zero: PEFT left them at init because the checkpoint's paths did not "
           "match this model" if zeros else "")
    hint = "lorafit.load_adapter(model, adapter), or lorafit fix" if zeros else None
    return [Finding("not-bit-equal", f"{len(c.unequal)} loaded tensors differ from the checkpoint{why}",
                    c.unequal, hint=hint)]


def _probe_findings(peft_model: Any, adapter_name: str, mapping: Landing) -> list[Finding]:
    """no-output-change: adapted modules whose output a non-zero lora_B does not change (see _probe)."""
    dead = _probe(peft_model, adapter_name, sorted(mapping.pairs.values()))
    if not dead:
        return []
    return [Finding("no-output-change", f"{len(dead)} adapted modules give the base output although "
                    "their lora_B is non-zero (adapter disabled or merged away?)", dead)]


def verify(peft_model: Any, adapter: Adapter | str | Path, adapter_name: str | None = None,
           probe: bool = False) -> Report:
    """Prove that `adapter` is loaded in `peft_model`, however it was loaded.

    Checks that every adapter tensor is present and bit-equal to the checkpoint (after the layout rewrite
    that maps the adapter onto this model), that no targeted module was left without a tensor, and that no
    parameter is on the meta device. With probe=True, each adapted module's output must change on a random
    input wherever its lora_B is non-zero.

    Returns:
        a Report with command "verify"; `ok` is False on any problem.
    """
    from peft.utils import get_peft_model_state_dict

    a = ensure_adapter(adapter)
    name = _adapter_name(peft_model, adapter_name)
    checked = _check_live(a, peft_model, read_tensors=False)
    tree = checked.tree
    mapping = checked.alignment.chosen if not checked.alignment.ambiguous else checked.alignment.as_is
    keymap = remap_keys(a, mapping)
    loaded = get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)
    if any(x.kind in ("embedding_base", "other") or x.wrapper for x in a.extras):
        # Whole embedding layers were saved (a resized vocabulary): PEFT's view with them, beside the plain one.
        loaded = {**get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=True), **loaded}
    findings = _meta_findings(peft_model)
    compared = _compare(a, keymap, loaded)
    findings += _not_loaded_findings(compared)
    findings += _left_at_init_findings(a, compared, keymap, tree.class_name)
    findings += _not_bit_equal_findings(compared, loaded)
    if probe:
        findings += _probe_findings(peft_model, name, mapping)
    return Report("verify", adapter={"path": str(a.path), "adapter_name": name}, target=tree.summary(),
                  findings=findings, result={"tensors_bit_equal": compared.equal, "tensors_expected": len(keymap),
                                             "probed": probe})


_log = logging.getLogger("lorafit")


def load_adapter(model: Any, adapter: Adapter | str | Path, adapter_name: str = "default", strict: bool = True,
                 **kwargs: Any) -> Any:
    """Load `adapter` onto `model` (any class) through stock PEFT, aligning paths first, then verify.

    Args:
        model: a transformers model of any class, or a PeftModel to add the adapter to.
        adapter: adapter dir, cached hub id, or Adapter.
        adapter_name: the name PEFT registers it under.
        strict: raise AdapterMismatchError when any tensor is not loaded bit-equal, or when the adapter
            cannot be aligned; with strict=False problems are only warned about.
        kwargs: passed to PeftModel.from_pretrained / load_adapter (e.g. is_trainable).
    Returns:
        an ordinary PeftModel. Its `lorafit_report` attribute holds the verify Report.
    Raises:
        AdapterMismatchError: strict and the adapter does not land completely.
    """
    import warnings

    from peft import PeftModel

    a = ensure_adapter(adapter)
    is_peft = isinstance(model, PeftModel)
    checked = _check_live(a, model)
    tree = checked.tree
    chosen = checked.alignment.chosen
    if checked.alignment.ambiguous or chosen.conflicts or chosen.collisions:
        # PEFT would fail here with a size-mismatch RuntimeError, or lorafit would have to guess.
        problems = _problems([f for f in checked.report.errors()
                              if f.code in ("ambiguous-layout", "shape-mismatch", "embedding-size")])
        raise AdapterMismatchError(f"{a.path} does not land on {tree.class_name}", problems, checked.report)
    how = chosen.rewrite.describe()
    if how != "as saved" or a.unrooted_keys:
        _log.info("lorafit: loading %s onto %s after rewriting its module paths (%s)", a.path, tree.class_name, how)
    with tempfile.TemporaryDirectory(prefix="lorafit-load-") as tmp:
        format_of(a).write(a, chosen, tree, Path(tmp))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's warnings are replaced by the verify report below
            if is_peft:
                model.load_adapter(tmp, adapter_name=adapter_name, **kwargs)
                peft_model = model
            else:
                peft_model = PeftModel.from_pretrained(model, tmp, adapter_name=adapter_name, **kwargs)
    report = verify(peft_model, a, adapter_name=adapter_name)
    peft_model.lorafit_report = report
    if not report.ok:
        problems = _problems(report.errors())
        if strict:
            raise AdapterMismatchError(f"{a.path} did not load completely onto {tree.class_name}", problems, report)
        warnings.warn(f"lorafit: {a.path} did not load completely: " + "; ".join(problems), stacklevel=2)
    return peft_model


def verify_pretrained(adapter: Adapter | str | Path, base: str | Path | None = None,
                      class_name: str | type | None = None, probe: bool = False, lorafit_load: bool = False,
                      revision: str | None = None, config_overrides: Sequence[str] | dict[str, Any] | None = None
                      ) -> Report:
    """Load `base` as `class_name` and `adapter` on top (stock PEFT, or load_adapter), then verify the load.

    Stock PEFT raising while it loads is itself the finding (load-failed), not an error of this call.

    Raises:
        LorafitError: unreadable adapter, base not found locally, unknown class.
    """
    from ..targets.transformers.resolve import load_config, resolve_class
    from .base import resolve_base
    from .check import class_name_of, parse_config_overrides

    a = ensure_adapter(adapter)
    ref = resolve_base(a, base, revision, needs="weights")
    overrides = parse_config_overrides(config_overrides)
    model_dir = ref.path
    name = class_name_of(class_name) or get_runtime().default_how(a)
    cls = resolve_class(name, load_config(model_dir, None, overrides), model_dir)
    # A head of another size (num_labels=3 on a 2-label checkpoint) loads only with ignore_mismatched_sizes, as a
    # user loading it with those overrides must pass too; the adapter's trained head then replaces it.
    extra = {"ignore_mismatched_sizes": True} if overrides else {}
    model = cls.from_pretrained(str(model_dir), **overrides, **extra)  # type: ignore[attr-defined]
    if lorafit_load:
        return _with_base(verify(load_adapter(model, a, strict=False), a, probe=probe), ref)
    from peft import PeftModel

    try:
        pm = PeftModel.from_pretrained(model, str(a.path))
    except Exception as e:  # stock PEFT's own failure is the finding here, not a crash
        first = (str(e).splitlines() or [""])[0][:200]
        return _with_base(Report("verify", adapter={"path": str(a.path)}, target={}, findings=[Finding(
            "load-failed", f"stock PeftModel.from_pretrained raised {type(e).__name__}: {first}",
            hint=shlex.join(["lorafit", "check", str(a.path), "--base", ref.spec, "--class", name]))]), ref)
    return _with_base(verify(pm, a, probe=probe), ref)


def _with_base(report: Report, ref: Any) -> Report:
    """The report's target says which base was loaded and where its name came from (as check's does)."""
    report.target = (report.target or {}) | ref.summary()
    return report

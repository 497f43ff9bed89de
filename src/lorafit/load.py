"""load_adapter and verify: load through stock PEFT after aligning, then prove the load bit for bit."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .adapter import Adapter, ensure_adapter, split_key
from .checker import run_check
from .errors import AdapterMismatchError
from .findings import Finding
from .fixer import remap_keys, write_fixed
from .report import Report
from .tree import tree_from_module


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
    active = getattr(peft_model, "active_adapter", "default")
    name: str = adapter_name or (active[0] if isinstance(active, list) else str(active))
    tree = tree_from_module(peft_model)
    checked = run_check(a, tree, tree.class_name, read_tensors=False, model=peft_model.get_base_model)
    mapping = checked.alignment.chosen if not checked.alignment.ambiguous else checked.alignment.as_is
    keymap = remap_keys(a, mapping)
    has_emb_copy = any(x.kind == "embedding_base" for x in a.extras)
    loaded = get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=has_emb_copy)
    findings: list[Finding] = []
    meta = [n for n, p in peft_model.named_parameters() if p.device.type == "meta"]
    if meta:
        findings.append(Finding("meta-tensors", f"{len(meta)} parameters are still on the meta device: the "
                                "forward pass returns garbage (low_cpu_mem_usage=True with keys that did not match)",
                                meta, hint="lorafit.load_adapter(model, adapter) loads them for real"))
    not_loaded, unequal, equal = [], [], 0
    for old, new in keymap.items():
        if new not in loaded:
            not_loaded.append(old)
        elif not _same_bits(loaded[new], a.tensor(old)):
            unequal.append(new)
        else:
            equal += 1
    left_at_init = sorted({split_key(k)[0] for k in loaded if k not in set(keymap.values())
                           and split_key(k)[1] is not None})
    if not_loaded:
        findings.append(Finding("dropped-tensors", f"{len(not_loaded)} adapter tensors are not in the loaded model",
                                not_loaded))
    if left_at_init:
        findings.append(Finding("missing-adapter-weights", f"{len(left_at_init)} adapted modules hold tensors the "
                                "checkpoint does not have: they kept their init values", left_at_init))
    if unequal:
        zeros = sum(1 for k in unequal if loaded[k].device.type != "meta" and not loaded[k].any())
        why = (f"; {zeros} of them are all zero: PEFT left them at init because the checkpoint's paths did not "
               "match this model" if zeros else "")
        hint = "lorafit.load_adapter(model, adapter), or lorafit fix" if zeros else None
        findings.append(Finding("not-bit-equal", f"{len(unequal)} loaded tensors differ from the checkpoint{why}",
                                unequal, hint=hint))
    if probe:
        dead = _probe(peft_model, name, sorted(mapping.pairs.values()))
        if dead:
            findings.append(Finding("no-output-change", f"{len(dead)} adapted modules give the base output although "
                                    "their lora_B is non-zero (adapter disabled or merged away?)", dead))
    return Report("verify", adapter={"path": str(a.path), "adapter_name": name}, target=tree.summary(),
                  findings=findings, result={"tensors_bit_equal": equal, "tensors_expected": len(keymap),
                                             "probed": probe})


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
    tree = tree_from_module(model)
    checked = run_check(a, tree, tree.class_name, model=lambda: model.get_base_model() if is_peft else model)
    chosen = checked.alignment.chosen
    if checked.alignment.ambiguous or chosen.conflicts or chosen.collisions:
        # PEFT would fail here with a size-mismatch RuntimeError, or lorafit would have to guess.
        problems = _problems([f for f in checked.report.errors()
                              if f.code in ("ambiguous-layout", "shape-mismatch", "embedding-size")])
        raise AdapterMismatchError(f"{a.path} does not land on {tree.class_name}", problems, checked.report)
    with tempfile.TemporaryDirectory(prefix="lorafit-load-") as tmp:
        write_fixed(checked, Path(tmp))
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

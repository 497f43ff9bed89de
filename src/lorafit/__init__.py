"""lorafit: make sure a LoRA adapter really lands on the model it is loaded into.

Public API: inspect, check, fix, load_adapter, verify, merge, verify_merge.
Heavy modules (torch, transformers, peft) are imported only by the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .report import Report

__all__ = ["inspect", "check", "fix", "load_adapter", "verify", "merge", "verify_merge", "__version__"]


def inspect(adapter: Any, read_tensors: bool = True) -> Report:
    """See lorafit.checker.inspect."""
    from .checker import inspect as _inspect

    return _inspect(adapter, read_tensors=read_tensors)


def check(adapter: Any, base: Any, class_name: str | None = None, key_mapping: Any = None) -> Report:
    """See lorafit.checker.check."""
    from .checker import check as _check

    return _check(adapter, base, class_name, key_mapping)


def fix(adapter: Any, base: Any, out: Any, class_name: str | None = None, key_mapping: Any = None,
        force: bool = False) -> Report:
    """See lorafit.fixer.fix."""
    from .fixer import fix as _fix

    return _fix(adapter, base, out, class_name=class_name, key_mapping=key_mapping, force=force)


def load_adapter(model: Any, adapter: Any, adapter_name: str = "default", strict: bool = True, **kwargs: Any) -> Any:
    """See lorafit.load.load_adapter."""
    from .load import load_adapter as _load

    return _load(model, adapter, adapter_name=adapter_name, strict=strict, **kwargs)


def verify(peft_model: Any, adapter: Any, adapter_name: str | None = None, probe: bool = False) -> Report:
    """See lorafit.load.verify."""
    from .load import verify as _verify

    return _verify(peft_model, adapter, adapter_name=adapter_name, probe=probe)


def merge(adapter: Any, base: Any, out: Any, **kwargs: Any) -> Report:
    """See lorafit.merger.merge."""
    from .merger import merge as _merge

    return _merge(adapter, base, out, **kwargs)


def verify_merge(merged: Any, base: Any, adapter: Any, **kwargs: Any) -> Report:
    """See lorafit.merge_verifier.verify_merge."""
    from .merge_verifier import verify_merge as _vm

    return _vm(merged, base, adapter, **kwargs)

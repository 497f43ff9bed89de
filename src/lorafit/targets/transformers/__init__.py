"""The transformers runtime: PEFT loading an adapter onto a transformers model class.

Its Target is the class's ModuleTree, built without weights (tree cache, shipped blueprint, or a
meta-device build; see resolve.py), or the tree of a live model. Its rules are how PEFT's wrapper for
the adapter's task_type treats that class (rules.py), and its load-time key conversion (conversion.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from ...adapter import Adapter
from ...align import Alignment
from ...findings import Finding
from .. import Target, register_runtime
from .module_tree import TASK_TO_AUTO
from .resolve import ModelDir, default_class_name


def meta_model_thunk(md: ModelDir, class_name: str) -> Callable[[], Any]:
    """A function that builds (once) the meta-device model of `class_name` for the model directory `md`."""

    @cache
    def build() -> Any:
        from .resolve import build_meta_model, load_config, resolve_class

        config = load_config(md.path, md.config, md.overrides)
        return build_meta_model(resolve_class(class_name, config, md.path), config, md.path)

    return build


class TransformersRuntime:
    """PeftModel.from_pretrained(<class>.from_pretrained(base), adapter)."""

    name = "transformers"

    def default_how(self, adapter: Adapter) -> str:
        return default_class_name(adapter.task_type)

    def trained_as(self, adapter: Adapter) -> str | None:
        return TASK_TO_AUTO.get(adapter.task_type or "")

    def target(self, base: Any, how: str | None, adapter: Adapter, overrides: dict[str, Any] | None = None) -> Target:
        """A local model dir or cached hub id (tree without weights), or a live nn.Module / PeftModel.
        `overrides`: config kwargs of from_pretrained (num_labels=3) for a base on disk."""
        if isinstance(base, (str, Path)):
            from . import tree_cache
            from .resolve import (
                custom_code_finding,
                open_model_dir,
                quantized_base_finding,
                tree_from_pretrained,
                unloaded_weights_finding,
            )

            md = open_model_dir(base).with_overrides(overrides)  # config.json is read here, once
            note = custom_code_finding(md.path, md.config)
            name = how or self.default_how(adapter)
            tree = tree_from_pretrained(md, name, source=str(base))
            notes = [n for n in (note, quantized_base_finding(md.config), unloaded_weights_finding(md, tree))
                     if n is not None]
            return Target(tree, name, str(base), notes, meta_model_thunk(md, name), tree_cache.cache_key(md.raw, name),
                          md.path)
        from .module_tree import tree_from_module

        tree = tree_from_module(base)
        wrapped = getattr(base, "get_base_model", None) if hasattr(base, "peft_config") else None
        return Target(tree, tree.class_name, None, [], wrapped or (lambda: base))

    def load_renames(self, adapter: Adapter, target: Target) -> dict[str, str] | None:
        tree = target.tree
        if not tree.converts_keys or target.model is None:
            return None
        if tree.conversion_patterns is not None:
            from .conversion import may_convert

            if not may_convert(tree.conversion_patterns, list(adapter.modules) + [x.module for x in adapter.extras]):
                return {}  # no key the conversion touches: PEFT loads the adapter as saved
        from . import tree_cache

        # PEFT's conversion needs transformers, PEFT and a meta model (~5 s); its answer depends only on the
        # base as loaded and the adapter's keys and config, so a repeated check reads it from the cache.
        key = tree_cache.renames_key(target.key, adapter) if target.key else None
        cached = tree_cache.load_renames(key) if key else None
        if cached is not None:
            return cached
        from .conversion import load_renames

        renames = load_renames(adapter, target.model())
        if key:
            tree_cache.store_renames(key, renames)
        return renames

    def refine(self, findings: list[Finding], adapter: Adapter, alignment: Alignment) -> None:
        """Sharpen the hints of format-neutral findings with what this runtime knows (a head's num_labels)."""
        from .rules import head_size_hint

        landing = alignment.chosen if alignment.needs_rewrite and not alignment.ambiguous else alignment.as_is
        hint = head_size_hint(adapter, landing)
        for f in findings:
            if hint and f.code == "shape-mismatch":
                f.hint = hint

    def rules(self, adapter: Adapter, target: Target, alignment: Alignment) -> list[Finding]:
        from ...formats.peft.targeting import wrapped_without_tensors
        from .rules import runtime_rules

        auto = target.tree.implied_task_type
        landing = alignment.chosen if alignment.needs_rewrite and not alignment.ambiguous else alignment.as_is
        if auto and wrapped_without_tensors(adapter.config, auto, target.tree, landing):
            auto = None  # as fix writes it: that task's wrapper would wrap a head the adapter never trained
        class_hint = (f"`lorafit fix` rewrites task_type to {auto or 'null'}; or load with the class the adapter was "
                      f"trained with (--class {self.default_how(adapter)})")
        return runtime_rules(adapter, target.tree, alignment, class_hint)


register_runtime(TransformersRuntime())

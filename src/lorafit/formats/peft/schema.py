"""What the installed PEFT accepts, read from its source with `ast` so that the CLI need not import peft.

Importing peft takes ~7 s on a 2-core machine (it pulls in transformers' model code); `inspect` and
`check` only need the names of LoraConfig's fields and of PeftType's members. tests/test_peft_schema.py
compares these answers with the imported classes, so a PEFT refactor that breaks the parse fails a test.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path

# Used when peft's sources cannot be found or parsed (a zipped install, say).
_FALLBACK_PEFT_TYPES = frozenset({
    "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "LORA", "ADALORA", "BOFT", "ADAPTION_PROMPT", "IA3",
    "LOHA", "LOKR", "OFT", "POLY", "LN_TUNING", "VERA", "FOURIERFT", "XLORA", "HRA", "VBLORA", "CPT",
    "BONE", "RANDLORA", "TRAINABLE_TOKENS", "C3A", "SHIRA", "MISS", "ROAD",
})


def _peft_root() -> Path | None:
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _class_node(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _dataclass_fields(cls: ast.ClassDef) -> set[str]:
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


@lru_cache(maxsize=1)
def lora_config_fields() -> frozenset[str] | None:
    """Field names that this PEFT's LoraConfig (with its bases) accepts; None when they cannot be read."""
    root = _peft_root()
    if root is None:
        return None
    try:
        base = ast.parse((root / "config.py").read_text())
        lora = ast.parse((root / "tuners" / "lora" / "config.py").read_text())
    except (OSError, SyntaxError):
        return None
    fields: set[str] = set()
    for tree, name in ((base, "PeftConfigMixin"), (base, "PeftConfig"), (lora, "LoraConfig")):
        node = _class_node(tree, name)
        if node is None:
            return None
        fields |= _dataclass_fields(node)
    return frozenset(fields)


def _enum_members(name: str) -> frozenset[str]:
    """Member names of an enum class in peft/utils/peft_types.py; empty when it cannot be read."""
    root = _peft_root()
    try:
        node = _class_node(ast.parse((root / "utils" / "peft_types.py").read_text()), name) if root else None
    except (OSError, SyntaxError):
        node = None
    if node is None:
        return frozenset()
    return frozenset(t.id for n in node.body if isinstance(n, ast.Assign) for t in n.targets
                     if isinstance(t, ast.Name))


@lru_cache(maxsize=1)
def peft_types() -> frozenset[str]:
    """Members of this PEFT's PeftType enum."""
    return _enum_members("PeftType") or _FALLBACK_PEFT_TYPES


@lru_cache(maxsize=1)
def task_types() -> frozenset[str]:
    """Members of this PEFT's TaskType enum (empty when they cannot be read: then nothing is refused)."""
    return _enum_members("TaskType")


def peft_version() -> str | None:
    """The installed PEFT's version, from its metadata (no import)."""
    from ...version import installed_version

    return installed_version("peft")

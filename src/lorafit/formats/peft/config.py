"""Validate the adapter_config.json fields that PEFT and lorafit interpret, before any rule uses them.

A field of the wrong type or a regex that does not compile would otherwise surface as a TypeError or
re.error deep inside a rule; here it becomes one line naming the file and the field (exit 2).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ...errors import AdapterFormatError
from . import targeting
from .schema import task_types


def _regex(value: str, field: str, path: Path, built: str | None = None) -> None:
    """`value` must compile as PEFT uses it: alone, or spliced into the regex `built` that PEFT makes of it."""
    try:
        re.compile(value if built is None else built)
    except re.error as e:
        how = f"; PEFT builds {built!r} from it and re raises" if built is not None else ""
        raise AdapterFormatError(f"{field} {value!r} is not a valid regex{how} ({e})", path) from None


def _names(config: dict[str, Any], field: str, path: Path, regex_if_str: bool) -> None:
    """A list of module (or parameter) names, or (for target/exclude_modules) one regex string, or null."""
    value = config.get(field)
    if value is None:
        return
    if isinstance(value, str):
        if not regex_if_str:
            raise AdapterFormatError(f"{field} must be a list of names, got the string {value!r}", path)
        _regex(value, field, path)
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterFormatError(f"{field} must be a list of module names or a regex string, got {value!r}", path)


def _number(value: Any) -> bool:
    """A finite JSON number that fits a float (PEFT computes alpha / r in floating point)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond 1.8e308
        return False


def _list_of(value: Any, kind: type) -> bool:
    """Whether `value` is a JSON list of `kind` only (the list form several fields allow)."""
    return isinstance(value, list) and all(isinstance(x, kind) for x in value)


def _check_rank_and_alpha(config: dict[str, Any], path: Path) -> None:
    """r and lora_alpha must be finite numbers, and r a positive integer: PEFT scales by alpha / r."""
    for name in ("r", "lora_alpha"):
        if name in config and not _number(config[name]):
            raise AdapterFormatError(f"{name} must be a finite number, got {config[name]!r}", path)
    if "r" in config and (not isinstance(config["r"], int) or config["r"] <= 0):
        raise AdapterFormatError(f"r must be a positive integer, got {config['r']!r}", path)


def _check_task_type(config: dict[str, Any], path: Path) -> None:
    """task_type must be null or a member of this PEFT's TaskType (any string when those cannot be read)."""
    task = config.get("task_type")
    known = task_types()
    if task is not None and (not isinstance(task, str) or (known and task not in known)):
        raise AdapterFormatError(f"task_type {task!r} is not a PEFT task type ({', '.join(sorted(known))} or "
                                 "null); PEFT raises ValueError on it", path)


def _check_pattern(config: dict[str, Any], name: str, kind: type, path: Path) -> None:
    """rank_pattern / alpha_pattern: an object of module regexes (as PEFT splices them) to numbers of `kind`."""
    pattern = config.get(name)
    if pattern is None:
        return
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"{name} must be an object of module pattern -> number, got {pattern!r}", path)
    for key, value in pattern.items():
        _regex(key, f"{name} key", path, targeting.pattern_regex(key))
        if not _number(value) or (kind is int and not isinstance(value, int)):
            raise AdapterFormatError(f"{name}[{key!r}] must be a{'n integer' if kind is int else ' number'}, "
                                     f"got {value!r}", path)
        if kind is int and value <= 0:  # PEFT refuses it ("`r` should be a positive integer value")
            raise AdapterFormatError(f"{name}[{key!r}] must be a positive rank, got {value!r}", path)


def _check_module_names(config: dict[str, Any], path: Path) -> None:
    """target_modules, exclude_modules and modules_to_save, each entry of the last as PEFT builds its regex."""
    _names(config, "target_modules", path, regex_if_str=True)
    _names(config, "exclude_modules", path, regex_if_str=True)
    _names(config, "modules_to_save", path, regex_if_str=False)
    _names(config, "target_parameters", path, regex_if_str=False)  # PEFT takes no regex string here
    for name in config.get("modules_to_save") or []:
        _regex(name, "modules_to_save entry", path, targeting.modules_to_save_regex(name))


def _check_layers_to_transform(config: dict[str, Any], path: Path) -> None:
    """layers_to_transform must be null, an integer (not a boolean) or a list of integers."""
    layers = config.get("layers_to_transform")
    is_int = isinstance(layers, int) and not isinstance(layers, bool)
    if layers is not None and not is_int and not _list_of(layers, int):
        raise AdapterFormatError(f"layers_to_transform must be an integer or a list of integers, got {layers!r}", path)


def _check_layers_pattern(config: dict[str, Any], path: Path) -> None:
    """layers_pattern must be null, a string or a list of strings, each valid in the regex PEFT builds of it."""
    pattern = config.get("layers_pattern")
    if pattern is not None and not isinstance(pattern, str) and not _list_of(pattern, str):
        raise AdapterFormatError(f"layers_pattern must be a string or a list of strings, got {pattern!r}", path)
    for p in [pattern] if isinstance(pattern, str) else pattern or []:
        _regex(p, "layers_pattern", path, targeting.layers_regex(p))


def validate_config(config: dict[str, Any], path: Path) -> None:
    """Raise AdapterFormatError for the first field PEFT would choke on (or lorafit could not judge)."""
    _check_rank_and_alpha(config, path)
    _check_task_type(config, path)
    for name, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        _check_pattern(config, name, kind, path)
    _check_module_names(config, path)
    _check_layers_to_transform(config, path)
    _check_layers_pattern(config, path)

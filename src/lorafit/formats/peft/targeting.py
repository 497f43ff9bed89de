"""PEFT's rules for which rank and alpha a module gets, and which modules a config targets.

They restate the rules of peft.utils.other.get_pattern_key and
peft.tuners.tuners_utils.check_target_module_exists as plain functions, so that the PEFT format's
targeting predicate (what `align` is given) is pure and the CLI need not import peft. tests/test_patterns.py checks them
against PEFT's own functions on generated keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ... import user_regex
from ...align import Landing
from ...tree import ModuleTree


def pattern_regex(key: str) -> str:
    """The regex PEFT builds from a rank_pattern / alpha_pattern key (get_pattern_key)."""
    return rf"(.*\.)?({key})$"


def layers_regex(layers_pattern: str) -> str:
    """The regex PEFT builds from one layers_pattern entry to find the layer index."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def pattern_key(pattern_keys: Sequence[str], module_path: str) -> str | None:
    """Return the first pattern key that matches `module_path` as PEFT does (a dotted suffix regex), or None."""
    for key in pattern_keys:
        if user_regex.match(pattern_regex(key), module_path):
            return key
    return None


def resolve_rank_alpha(config: Mapping[str, Any], module_path: str) -> tuple[int, float]:
    """The (r, lora_alpha) PEFT gives the module at `module_path`, after rank_pattern and alpha_pattern."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rk = pattern_key(list(rank_pattern), module_path)
    ak = pattern_key(list(alpha_pattern), module_path)
    r = int(rank_pattern[rk]) if rk is not None else int(config.get("r", 8))
    alpha = float(alpha_pattern[ak]) if ak is not None else float(config.get("lora_alpha", 8))
    return r, alpha


def scaling(config: Mapping[str, Any], r: int, alpha: float) -> float:
    """LoRA scaling: alpha / r, or alpha / sqrt(r) with use_rslora."""
    if r <= 0:
        return 0.0
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# Heads that PeftModelFor<Task> adds to modules_to_save by itself (see peft/peft_model.py).
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}


def wrapped_names(config: Mapping[str, Any], task_type: str | None) -> list[str]:
    """modules_to_save as PEFT will apply it: the config's list plus the heads the task's wrapper adds."""
    return list(config.get("modules_to_save") or []) + TASK_HEADS.get(task_type or "", [])


def is_wrapped(names: Sequence[str], path: str) -> bool:
    """PEFT wraps every module whose path ends with one of the names (a plain suffix, not a dotted one).

    This is not names_module: PEFT's wrapping (_set_trainable) tests a plain string suffix, while its
    targeting keeps modules_to_save out by the dotted regex; each rule restates the PEFT code it mirrors.
    """
    return any(path.endswith(n) for n in names)


def modules_to_save_regex(name: str) -> str:
    """The regex PEFT builds from a modules_to_save entry to keep it out of targeting (the entry is spliced in)."""
    return rf"(^|.*\.){name}($|\..*)"


def names_module(name: str, path: str) -> bool:
    """True when the modules_to_save entry `name` names the module at `path` or one it is inside (PEFT's regex)."""
    return user_regex.match(modules_to_save_regex(name), path) is not None


def in_modules_to_save(config: Mapping[str, Any], path: str) -> bool:
    """True when `path` is a module named in modules_to_save, or inside one, by PEFT's regex rule."""
    return any(names_module(m, path) for m in (config.get("modules_to_save") or []))


def wrapped_without_tensors(config: Mapping[str, Any], task_type: str | None, tree: ModuleTree,
                            m: Landing) -> list[str]:
    """Target modules PEFT will wrap as modules_to_save (config + task heads) that get no saved tensor.

    PEFT 0.21 then fails in set_peft_model_state_dict with a KeyError on the wrapper's weight.
    """
    names = wrapped_names(config, task_type)
    # A saved copy of the wrong size is still a copy: PEFT fails on its size (embedding-size), not a KeyError.
    landed = set(m.tensor_pairs.values()) | {c.target_path for c in m.conflicts}
    wrapped = [p for p in tree.modules if p and is_wrapped(names, p)]
    # Only the outermost wrapped module counts: PEFT does not wrap inside a wrapper.
    outer = [p for p in wrapped if not any(p.startswith(q + ".") for q in wrapped)]
    return [p for p in outer if not any(t == p or t.startswith(p + ".") for t in landed)]


def _excluded(config: Mapping[str, Any], path: str) -> bool:
    exclude = config.get("exclude_modules")
    if not exclude:
        return False
    if isinstance(exclude, str):
        return user_regex.fullmatch(exclude, path) is not None
    return path in exclude or any(path.endswith(f".{e}") for e in exclude)


def _layer_index_ok(config: Mapping[str, Any], path: str) -> bool:
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        match = user_regex.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = user_regex.match(layers_regex(p), path)
            if match:
                break
    if not match:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


# PEFT nests one wrapper per targeted parameter of a module; each inner one sits under `.base_layer`.
PARAM_WRAPPER = ".base_layer"


def parameter_names(config: Mapping[str, Any], module: str) -> list[str]:
    """The parameters of the module at `module` that target_parameters names, as PEFT matches `module.param`."""
    out = []
    for t in config.get("target_parameters") or []:
        name = str(t).rpartition(".")[2]
        key = f"{module}.{name}"
        if (key == t or key.endswith(f".{t}")) and name not in out:
            out.append(name)
    return out


def parameter_target(config: Mapping[str, Any], saved_path: str) -> tuple[str, int, list[str]] | None:
    """(module path, nesting depth, candidate parameters) if the LoRA saved at `saved_path` adapts parameters.

    PEFT saves the outermost wrapper's factors under the module's path and each inner one under one more
    `.base_layer`; a module that target_modules also names is an ordinary LoRA layer.
    """
    if not config.get("target_parameters"):
        return None
    base, depth = saved_path, 0
    while base.endswith(PARAM_WRAPPER):
        base, depth = base[: -len(PARAM_WRAPPER)], depth + 1
    names = parameter_names(config, base)
    if not names or (depth == 0 and is_targeted(config, base)):
        return None
    return base, depth, names


def is_targeted(config: Mapping[str, Any], path: str) -> bool:
    """True when PEFT would put a LoRA layer on the module at `path` (target_modules, exclusions, layers)."""
    if _excluded(config, path) or in_modules_to_save(config, path):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return user_regex.fullmatch(targets, path) is not None
    if path in targets:
        return True
    if not any(path.endswith(f".{t}") for t in targets):
        return False
    return _layer_index_ok(config, path)

"""The PEFT writer: an Adapter re-keyed onto a target's paths, saved as PeftModel.save_pretrained would save it.

Tensors are copied bit for bit under their new keys; the config is copied with task_type, pattern keys
and (only when needed) target_modules made to fit the target paths.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

from ...adapter import Adapter
from ...align import Landing, Rewrite
from ...fileio.inputs import confined, open_regular
from ...fileio.outputs import save_tensors, write_json
from ...tree import ModuleTree
from ...version import __version__
from . import targeting
from .reader import BIN_NAME, CONFIG_NAME, PEFT_PREFIX, SAFETENSORS_NAME, split_key, split_wrapper


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(open_regular(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remap_keys(adapter: Adapter, m: Landing) -> dict[str, str]:
    """Old checkpoint key -> new key under mapping `m`; entries that do not land keep their key."""
    out = {}
    for key in adapter.infos:
        module, role, suffix = split_key(key)
        if role is not None and module in m.pairs:
            new_module = m.pairs[module] + adapter.modules[module].wrapper
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


def fixed_config(adapter: Adapter, tree: ModuleTree, m: Landing) -> dict[str, Any]:
    """The adapter config, made consistent with the target class and paths."""
    cfg = dict(adapter.config)
    # The target's own task, unless its PEFT wrapper would wrap a head the adapter never trained (KeyError).
    task = tree.implied_task_type
    if targeting.wrapped_without_tensors(cfg, task, tree, m):
        task = None
    cfg["task_type"] = task
    for name in ("rank_pattern", "alpha_pattern"):
        pat = dict(cfg.get(name) or {})
        pat = dict(zip(_rewrite_names(list(pat), m.rewrite), pat.values(), strict=True))
        # Pin any module that would now resolve differently with an exact-path key, placed first so it wins.
        pinned = {}
        for src, dst in m.pairs.items():
            mod = adapter.modules[src]
            want: float = mod.rank if name == "rank_pattern" else mod.alpha
            if src in m.params:  # a parameter LoRA resolves its pattern on `module.param`
                param = m.params[src][0]
                dst = f"{dst}.{param}"
                want = mod.per_param[param][0 if name == "rank_pattern" else 1]
            got = targeting.resolve_rank_alpha({**cfg, name: pat}, dst)[0 if name == "rank_pattern" else 1]
            if got != want:
                pinned[re.escape(dst)] = int(want) if name == "rank_pattern" else want
        cfg[name] = {**pinned, **pat}
    cfg["modules_to_save"] = _rewrite_names(cfg.get("modules_to_save"), m.rewrite)
    if m.params:
        cfg["target_parameters"] = _rewrite_names(cfg.get("target_parameters"), m.rewrite)
        cfg["lora_dropout"] = 0.0  # PEFT's ParamWrapper refuses dropout; it only ever acted in training
    landed = {dst for src, dst in m.pairs.items() if src not in m.params}
    targeted = {p for p, info in tree.modules.items() if info.lora_kind and targeting.is_targeted(cfg, p)}
    if targeted != landed and landed:
        # target_modules spelled with the old prefix (a regex, or full paths): name the landed modules exactly.
        cfg["target_modules"] = sorted(landed)
    return cfg


def write_adapter(adapter: Adapter, m: Landing, tree: ModuleTree, out_dir: Path, source_desc: str | None = None,
                  follow_symlinks: bool = True) -> dict[str, str]:
    """Write `adapter` re-keyed by landing `m` into the existing empty dir `out_dir`, as PEFT saves it.

    Tensors are copied bit for bit; the config is made to fit `tree` (see fixed_config); other files of the
    adapter directory (README, tokenizer) are carried along. Returns the provenance written into the metadata.

    Raises:
        LorafitError: with follow_symlinks False, an adapter file is a symlink out of the adapter directory;
            or a file to carry along is a FIFO or device.
    """
    for f in (adapter.path / CONFIG_NAME, adapter.weights_path):
        confined(f, adapter.path, follow_symlinks)
    keymap = remap_keys(adapter, m)
    tensors = {keymap[k]: adapter.tensor(k).contiguous() for k in adapter.infos}
    provenance = {
        "lorafit.version": __version__,
        "lorafit.source": source_desc or str(adapter.path),
        "lorafit.source_sha256": _sha256(adapter.weights_path),
        "lorafit.target_class": tree.class_name,
        "lorafit.rewrite": m.rewrite.describe(),
        "lorafit.keys_renamed": str(sum(k != v for k, v in keymap.items())),
    }
    save_tensors(tensors, out_dir / SAFETENSORS_NAME, {"format": "pt", **provenance})
    write_json(out_dir / CONFIG_NAME, fixed_config(adapter, tree, m))
    for f in sorted(adapter.path.iterdir()):  # README, tokenizer files: carried along unchanged
        if f.name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME) or f.name.startswith(".") or f.is_dir():
            continue
        shutil.copyfile(confined(f, adapter.path, follow_symlinks), out_dir / f.name)
    return provenance

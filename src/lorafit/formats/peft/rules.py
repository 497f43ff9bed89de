"""PEFT's own rules: an adapter's config against its tensors, and against the paths it lands on."""

from __future__ import annotations

import math

from ...adapter import Adapter
from ...align import Landing
from ...diagnose import plural, rank_mismatch, verb
from ...findings import Finding
from ...tree import ModuleTree
from . import targeting
from .schema import lora_config_fields


def rule_dora(adapter: Adapter) -> list[Finding]:
    """use_dora must agree with the magnitude tensors saved."""
    cfg = adapter.config
    dora = [m.path for m in adapter.modules.values() if m.has_dora]
    if cfg.get("use_dora") and len(dora) < len(adapter.modules):
        no = [m.path for m in adapter.modules.values() if not m.has_dora]
        return [Finding("dora-mismatch", f"use_dora is true but {plural(len(no), 'module')} have no "
                        "lora_magnitude_vector; PEFT would compute a fresh magnitude", no)]
    if dora and not cfg.get("use_dora"):
        return [Finding("dora-mismatch", f"{plural(len(dora), 'module')} carry DoRA magnitudes but use_dora is "
                        "false; PEFT would drop them", dora, hint='set "use_dora": true in adapter_config.json')]
    return []


def rule_bias(adapter: Adapter) -> list[Finding]:
    """lora_bias must agree with the lora_B.bias tensors saved."""
    bias = [m.path for m in adapter.modules.values() if m.has_bias]
    if bool(bias) == bool(adapter.config.get("lora_bias")):
        return []
    return [Finding("bias-mismatch", f"lora_bias is {bool(adapter.config.get('lora_bias'))} but "
                    f"{plural(len(bias), 'module')} carry lora_B.bias", bias)]


def rule_modules_to_save_saved(adapter: Adapter) -> list[Finding]:
    """modules_to_save that the checkpoint holds no copy of at all."""
    mts = adapter.config.get("modules_to_save") or []
    saved = {x.module for x in adapter.extras if x.kind == "modules_to_save"}
    absent = [name for name in mts if not any(targeting.names_module(name, p) for p in saved)]
    if not mts or len(absent) < len(mts):
        return []
    return [Finding("modules-to-save-not-saved", f"modules_to_save lists {', '.join(mts)} but the checkpoint holds "
                    "none of them; the model keeps its own (possibly random) heads", absent)]


def rule_unknown_fields(adapter: Adapter) -> list[Finding]:
    known = lora_config_fields()
    unknown = sorted(set(adapter.config) - known) if known is not None else []
    if not unknown:
        return []
    return [Finding("unknown-config-field", f"{plural(len(unknown), 'config field')} unknown to this PEFT; an older "
                    "PEFT refuses the config, a newer feature may be ignored", unknown,
                    hint="upgrade peft, or delete the fields if they are unused")]


def rule_unprefixed(adapter: Adapter) -> list[Finding]:
    n = len(adapter.unrooted_keys)
    if not n:
        return []
    return [Finding("unprefixed-keys", f"{plural(n, 'key')} {verb(n, 'lacks', 'lack')} the 'base_model.model.' "
                    "prefix that PeftModel.from_pretrained matches: it loads none of them and leaves those modules "
                    "at their init values; fix writes them with the prefix", adapter.unrooted_keys,
                    hint=fix_command(adapter))]


def fix_command(adapter: Adapter) -> str:
    """`lorafit fix` for an adapter judged alone: on the base it names (else --base MODEL), output in the cwd."""
    import shlex

    base = [] if adapter.base_model else ["--base", "MODEL"]
    return shlex.join(["lorafit", "fix", str(adapter.path), *base, "-o", f"{adapter.path.name}-fixed"])


def adapter_rules(adapter: Adapter) -> list[Finding]:
    """PEFT's own rules on an adapter alone: its config against its tensors."""
    return (rule_dora(adapter) + rule_bias(adapter) + rule_modules_to_save_saved(adapter)
            + rule_unknown_fields(adapter) + rule_unprefixed(adapter) + rule_parameter_options(adapter))


def rule_targets_nothing(adapter: Adapter, tree: ModuleTree, hint: str | None) -> list[Finding]:
    """target_modules that select no module of the target: PEFT refuses to inject at all, even when every saved
    key would have matched a module path."""
    if not adapter.modules or adapter.config.get("target_modules") == "all-linear":
        return []  # "all-linear" is expanded by PEFT against the model itself
    if any(info.lora_kind and targeting.is_targeted(adapter.config, p) for p, info in tree.modules.items()):
        return []
    targets = adapter.config.get("target_modules")
    names = list(targets) if isinstance(targets, list) else [str(targets)]
    shown = ", ".join(names[:3]) + (f", … ({len(names)} in all)" if len(names) > 3 else "")
    also = [k for k in ("layers_to_transform", "exclude_modules") if adapter.config.get(k)]
    return [Finding("targets-nothing", f"target_modules [{shown}]{' with ' + ' and '.join(also) if also else ''} "
                    f"selects no module of {tree.class_name}: PeftModel.from_pretrained raises "
                    "NoMatchingPeftModuleError (a ValueError)", names, hint=hint)]


def rule_parameter_options(adapter: Adapter) -> list[Finding]:
    """Options PEFT's ParamWrapper refuses with a ValueError on load: dropout, DoRA, lora_bias, fan_in_fan_out."""
    cfg = adapter.config
    if not any(m.kind == "param" for m in adapter.modules.values()):
        return []
    out = []
    if cfg.get("lora_dropout"):
        out.append(Finding("parameter-dropout", f"lora_dropout={cfg['lora_dropout']} with target_parameters: PEFT "
                           "raises ValueError('lora.ParamWrapper does not work with lora_dropout != 0') on load. "
                           "Dropout only acts in training, so 0 loads the same trained adapter; fix writes 0",
                           hint=fix_command(adapter)))
    refused = [f"{k}={cfg[k]}" for k in ("use_dora", "lora_bias", "fan_in_fan_out") if cfg.get(k)]
    if refused:
        out.append(Finding("parameter-option", f"{', '.join(refused)} with target_parameters: PEFT's ParamWrapper "
                           "raises ValueError on load; no stock PEFT loads this adapter", refused))
    return out


def rule_parameter_ranks(adapter: Adapter, m: Landing) -> list[Finding]:
    """A LoRA on a parameter of E experts holds r·E rows, r resolved on the target's `module.param` path."""
    wrong, moved = [], []
    for src, (param, experts) in m.params.items():
        mod = adapter.modules[src]
        saved_r, saved_alpha, _ = mod.per_param[param]
        if mod.rank != saved_r * experts:
            wrong.append(f"{src} ({param}): tensors have {mod.rank} rows = r {mod.rank / experts:g} x {experts} "
                         f"experts, config gives r={saved_r}")
            continue
        r, alpha = targeting.resolve_rank_alpha(adapter.config, f"{m.pairs[src]}.{param}")
        if r != saved_r or not math.isclose(alpha, saved_alpha):
            moved.append(f"{m.pairs[src]}.{param}: r={r} alpha={alpha:g} on the target, saved r={saved_r} "
                         f"alpha={saved_alpha:g}")
    out = []
    if wrong:
        out.append(rank_mismatch(plural(len(wrong), "parameter LoRA"), wrong,
                                 "set a rank_pattern entry for the parameter to the tensors' rank per expert"))
    if moved:
        out.append(_pattern_mismatch(moved))
    return out


def _pattern_mismatch(bad: list[str]) -> Finding:
    return Finding("pattern-mismatch", f"{plural(len(bad), 'module')} resolve rank_pattern/alpha_pattern "
                   "differently on the target's paths: a wrong rank fails to load, a wrong alpha silently "
                   "rescales the adapter", bad, hint="`lorafit fix` rewrites the pattern keys")


def rule_patterns(adapter: Adapter, m: Landing) -> list[Finding]:
    """rank/alpha patterns are matched against the target path: a prefixed pattern may stop matching."""
    bad = []
    for src, dst in m.pairs.items():
        mod = adapter.modules.get(src)
        if mod is None or mod.kind == "param" or mod.rank != mod.config_rank:
            continue  # already a rank-mismatch, or a parameter LoRA (rule_parameter_ranks)
        r, alpha = targeting.resolve_rank_alpha(adapter.config, dst)
        if r != mod.rank or not math.isclose(alpha, mod.alpha):
            bad.append(f"{dst}: r={r} alpha={alpha:g} on the target, saved r={mod.rank} alpha={mod.alpha:g}")
    return [_pattern_mismatch(bad)] if bad else []


def landing_rules(adapter: Adapter, tree: ModuleTree, landing: Landing, hint: str | None) -> list[Finding]:
    """PEFT's rules on one landing: does target_modules select anything, do the patterns still resolve."""
    return (rule_targets_nothing(adapter, tree, hint) + rule_patterns(adapter, landing)
            + rule_parameter_ranks(adapter, landing))

"""The rules: (adapter, health, tree, alignment) -> [Finding], one small function per rule.

Rules on the adapter alone serve `inspect`; rules on an Alignment serve `check` and `fix`. Coverage
rules take one Mapping_ (the result of one rewrite) so the same rule judges what stock PEFT would do
(`as_is`) and what lorafit's rewrite would do (`chosen`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from . import patterns
from .adapter import Adapter
from .align import Alignment, Mapping_
from .findings import Finding
from .health import Health
from .peft_schema import lora_config_fields
from .tree import ModuleTree

GENERATION_TASKS = {"CAUSAL_LM", "SEQ_2_SEQ_LM"}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _verb(n: int, singular: str, plural: str) -> str:
    return singular if n == 1 else plural


# ----------------------------------------------------------------------------- adapter alone

def rule_health(adapter: Adapter, health: Health) -> list[Finding]:
    out = []
    n = len(adapter.modules)
    if n and len(health.zero_b) == n:
        out.append(Finding("adapter-no-effect",
                           f"all {n} modules have lora_B == 0, so the adapter adds nothing: it was never trained, "
                           "or was saved before training or from the wrong model",
                           health.zero_b, hint="re-save the adapter from the trained PeftModel"))
    elif health.zero_b:
        out.append(Finding("lora-b-zero", f"{_plural(len(health.zero_b), 'module')} of {n} have lora_B == 0 and "
                           "change nothing", health.zero_b))
    if health.non_finite:
        kinds = sorted(set("+".join(sorted(health.non_finite.values())).split("+")))
        out.append(Finding("non-finite", f"{_plural(len(health.non_finite), 'tensor')} hold {'/'.join(kinds)}; "
                           "the adapted model's outputs will be NaN", list(health.non_finite),
                           hint="retrain from a checkpoint before the divergence, or lower the learning rate"))
    return out


def rule_ranks(adapter: Adapter) -> list[Finding]:
    wrong, inconsistent = [], []
    for m in adapter.modules.values():
        b_rank = adapter.infos[m.keys["B"]].shape[1]
        if b_rank != m.rank:
            inconsistent.append(f"{m.path}: lora_A rank {m.rank}, lora_B rank {b_rank}")
        elif m.rank != m.config_rank:
            wrong.append(f"{m.path}: tensors have r={m.rank}, config gives r={m.config_rank}")
    out = []
    if wrong:
        out.append(Finding("rank-mismatch", f"{_plural(len(wrong), 'module')} disagree with r / rank_pattern in "
                           "adapter_config.json; PEFT will fail with a size mismatch on load", wrong,
                           hint="set r (or a rank_pattern entry) to the tensors' rank in adapter_config.json"))
    if inconsistent:
        out.append(Finding("rank-inconsistent", f"{_plural(len(inconsistent), 'module')} have lora_A and lora_B "
                           "of different rank: the checkpoint is corrupt", inconsistent))
    return out


def rule_structure(adapter: Adapter) -> list[Finding]:
    out = []
    cfg = adapter.config
    if adapter.incomplete:
        out.append(Finding("incomplete-module", f"{_plural(len(adapter.incomplete), 'module')} lack lora_A or "
                           "lora_B; PEFT leaves the missing half at init",
                           [f"{p} (has {', '.join(r)})" for p, r in adapter.incomplete.items()]))
    dora = [m.path for m in adapter.modules.values() if m.has_dora]
    if cfg.get("use_dora") and len(dora) < len(adapter.modules):
        no = [m.path for m in adapter.modules.values() if not m.has_dora]
        out.append(Finding("dora-mismatch", f"use_dora is true but {_plural(len(no), 'module')} have no "
                           "lora_magnitude_vector; PEFT would compute a fresh magnitude", no))
    elif dora and not cfg.get("use_dora"):
        out.append(Finding("dora-mismatch", f"{_plural(len(dora), 'module')} carry DoRA magnitudes but use_dora is "
                           "false; PEFT would drop them", dora, hint='set "use_dora": true in adapter_config.json'))
    bias = [m.path for m in adapter.modules.values() if m.has_bias]
    if bool(bias) != bool(cfg.get("lora_bias")):
        out.append(Finding("bias-mismatch", f"lora_bias is {bool(cfg.get('lora_bias'))} but "
                           f"{_plural(len(bias), 'module')} carry lora_B.bias", bias))
    mts = cfg.get("modules_to_save") or []
    if mts:
        saved = {x.module for x in adapter.extras if x.kind == "modules_to_save"}
        absent = [name for name in mts if not any(p == name or p.endswith("." + name) or
                                                  p.startswith(name + ".") or f".{name}." in p for p in saved)]
        if len(absent) == len(mts):
            out.append(Finding("modules-to-save-not-saved", f"modules_to_save lists {', '.join(mts)} but the "
                               "checkpoint holds none of them; the model keeps its own (possibly random) heads",
                               absent))
    known = lora_config_fields()
    if known is not None:
        unknown = sorted(set(cfg) - known)
        if unknown:
            out.append(Finding("unknown-config-field", f"{_plural(len(unknown), 'config field')} unknown to this "
                               "PEFT; an older PEFT refuses the config, a newer feature may be ignored", unknown,
                               hint="upgrade peft, or delete the fields if they are unused"))
    if adapter.unprefixed_keys:
        n = len(adapter.unprefixed_keys)
        out.append(Finding("unprefixed-keys", f"{_plural(n, 'key')} {_verb(n, 'lacks', 'lack')} the "
                           "'base_model.model.' prefix that PeftModel.from_pretrained matches: it loads none of "
                           "them and leaves those modules at their init values", adapter.unprefixed_keys,
                           hint=f"lorafit fix {adapter.path} --base MODEL -o OUT writes them with the prefix"))
    return out


def adapter_findings(adapter: Adapter, health: Health | None) -> list[Finding]:
    """Every rule that needs only the adapter."""
    out = rule_ranks(adapter) + rule_structure(adapter)
    if health is not None:
        out += rule_health(adapter, health)
    return out


# ----------------------------------------------------------------------------- adapter x target

def _is_embedding_path(tree: ModuleTree, path: str) -> bool:
    info = tree.modules.get(path)
    return path in (tree.input_embeddings, tree.output_embeddings) or (info is not None and info.kind == "Embedding")


def rule_coverage(adapter: Adapter, tree: ModuleTree, m: Mapping_, fix_hint: str | None) -> list[Finding]:
    """Both directions: tensors PEFT would drop, and targeted modules that would keep their init values."""
    out = []
    mts_keys = {x.key for x in adapter.extras if x.kind == "modules_to_save"}
    dropped = m.unmatched + [k for k in m.unmatched_tensors if k not in mts_keys]
    if dropped:
        tensors = len(dropped) - len(m.unmatched)
        what = " and ".join(x for x in (_plural(len(m.unmatched), "adapter module") if m.unmatched else "",
                                        _plural(tensors, "saved tensor") if tensors else "") if x)
        out.append(Finding("dropped-tensors", f"{what} {_verb(len(dropped), 'has', 'have')} no module of that "
                           f"path in {tree.class_name}; "
                           "PEFT drops them without a word", dropped,
                           hint=fix_hint))
    if m.missing:
        init = ("lora_A and lora_B keep the random values of init_lora_weights=false"
                if adapter.config.get("init_lora_weights") is False
                else "lora_B stays 0 and the adapter does nothing there")
        out.append(Finding("missing-adapter-weights", f"{_plural(len(m.missing), 'targeted module')} of "
                           f"{tree.class_name} would get no tensor: {init}", m.missing, hint=fix_hint))
    absent = [k for k in m.unmatched_tensors if k in mts_keys]
    if absent:
        out.append(Finding("modules-to-save-absent", f"the trained {_plural(len(absent), 'modules_to_save tensor')}"
                           f" have no place in {tree.class_name}; PEFT drops the trained head silently", absent,
                           hint="load with the head class it was trained with (e.g. --class "
                           "AutoModelForSequenceClassification)"))
    emb = [c for c in m.conflicts if _is_embedding_path(tree, c.target_path)]
    shapes = [c for c in m.conflicts if c not in emb]
    if emb:
        out.append(Finding("embedding-size", f"{_plural(len(emb), 'embedding tensor')} disagree with the target's "
                           f"vocabulary (vocab_size={tree.vocab_size}): the tokenizer was resized for training",
                           [f"{c.adapter_path}: adapter {c.expected}, target {c.actual}" for c in emb],
                           hint="model.resize_token_embeddings(len(tokenizer)) before loading, with the "
                           "training tokenizer"))
    if shapes:
        out.append(Finding("shape-mismatch", f"{_plural(len(shapes), 'module')} "
                           f"{_verb(len(shapes), 'disagrees', 'disagree')} in shape with the target",
                           [f"{c.adapter_path} -> {c.target_path}: adapter {c.expected}, target {c.actual}"
                            for c in shapes], hint="check that --base is the model the adapter was trained on"))
    if m.collisions:
        out.append(Finding("shape-mismatch", f"{_plural(len(m.collisions), 'target module')} would receive "
                           "several adapter modules", [f"{t} <- {', '.join(p)}" for t, p in m.collisions.items()]))
    return out


def rule_patterns(adapter: Adapter, m: Mapping_) -> list[Finding]:
    """rank/alpha patterns are matched against the target path: a prefixed pattern may stop matching."""
    bad = []
    for src, dst in m.pairs.items():
        mod = adapter.modules.get(src)
        if mod is None or mod.rank != mod.config_rank:
            continue  # already a rank-mismatch
        r, alpha = patterns.resolve_rank_alpha(adapter.config, dst)
        if r != mod.rank or not math.isclose(alpha, mod.alpha):
            bad.append(f"{dst}: r={r} alpha={alpha:g} on the target, saved r={mod.rank} alpha={mod.alpha:g}")
    if not bad:
        return []
    return [Finding("pattern-mismatch", f"{_plural(len(bad), 'module')} resolve rank_pattern/alpha_pattern "
                    "differently on the target's paths: a wrong rank fails to load, a wrong alpha silently "
                    "rescales the adapter", bad, hint="lorafit fix rewrites the pattern keys")]


def wrapped_without_tensors(config: dict, task_type: str | None, tree: ModuleTree, m: Mapping_) -> list[str]:
    """Target modules PEFT will wrap as modules_to_save (config + task heads) that get no saved tensor.

    PEFT 0.21 then fails in set_peft_model_state_dict with a KeyError on the wrapper's weight.
    """
    names = patterns.wrapped_names(config, task_type)
    landed = set(m.tensor_pairs.values())
    wrapped = [p for p in tree.modules if p and patterns.is_wrapped(names, p)]
    # Only the outermost wrapped module counts: PEFT does not wrap inside a wrapper.
    outer = [p for p in wrapped if not any(p.startswith(q + ".") for q in wrapped)]
    return [p for p in outer if not any(t == p or t.startswith(p + ".") for t in landed)]


def rule_modules_to_save_missing(adapter: Adapter, tree: ModuleTree, m: Mapping_) -> list[Finding]:
    missing = wrapped_without_tensors(adapter.config, adapter.task_type, tree, m)
    if not missing:
        return []
    return [Finding("modules-to-save-missing", f"PEFT will wrap {', '.join(missing)} of {tree.class_name} as "
                    f"modules_to_save (from modules_to_save or task_type {adapter.task_type}), but the checkpoint "
                    "holds no trained copy: PeftModel.from_pretrained raises KeyError", missing,
                    hint="lorafit fix sets a task_type that does not wrap a head the adapter never trained")]


def rule_task_type(adapter: Adapter, tree: ModuleTree, class_hint: str) -> list[Finding]:
    task = adapter.task_type
    if task in GENERATION_TASKS and not tree.can_generate:
        return [Finding("task-type-incompatible", f"task_type {task} makes PEFT wrap the model in "
                        f"PeftModelFor{'CausalLM' if task == 'CAUSAL_LM' else 'Seq2SeqLM'}, which needs "
                        f"prepare_inputs_for_generation; {tree.class_name} has none, so PeftModel.from_pretrained "
                        "raises AttributeError", hint=class_hint)]
    if task and tree.implied_task_type and task != tree.implied_task_type:
        return [Finding("task-type-mismatch", f"task_type {task} but {tree.class_name} serves "
                        f"{tree.implied_task_type}; PEFT picks the wrapper class from task_type", hint=class_hint)]
    return []


def rule_tied(adapter: Adapter, tree: ModuleTree, m: Mapping_) -> list[Finding]:
    if not tree.tie_word_embeddings or adapter.config.get("ensure_weight_tying"):
        return []
    emb = {tree.input_embeddings, tree.output_embeddings} - {None}
    touched = sorted({t for t in list(m.pairs.values()) + list(m.tensor_pairs.values()) if t in emb})
    if not touched:
        return []
    return [Finding("tied-embeddings", f"{tree.class_name} ties its input and output embeddings and the adapter "
                    f"changes {', '.join(touched)} only: unmerged, PEFT adapts just that side; merged into the "
                    "shared weight, a LoRA delta reaches both sides (outputs change), and a trained copy unties them",
                    touched, hint="train with LoraConfig(ensure_weight_tying=True) to adapt both sides alike")]


def rule_targets_nothing(adapter: Adapter, tree: ModuleTree, hint: str | None) -> list[Finding]:
    """target_modules that select no module of the target: PEFT refuses to inject at all, even when every saved
    key would have matched a module path."""
    if not adapter.modules or adapter.config.get("target_modules") == "all-linear":
        return []  # "all-linear" is expanded by PEFT against the model itself
    if any(info.lora_kind and patterns.is_targeted(adapter.config, p) for p, info in tree.modules.items()):
        return []
    return [Finding("targets-nothing", f"target_modules {adapter.config.get('target_modules')!r} (with "
                    f"layers_to_transform / exclude_modules) selects no module of {tree.class_name}: "
                    "PeftModel.from_pretrained raises NoMatchingPeftModuleError (a ValueError)", hint=hint)]


def _layouts(adapter: Adapter, tree: ModuleTree, src: str, dst: str) -> tuple[str, str]:
    """Name the saved and the target layout, e.g. 'the AutoModelForCausalLM layout (backbone under model.)'."""
    from .tree import TASK_TO_AUTO

    prefix = f"{tree.base_model_prefix}." if tree.base_model_prefix else None
    head = TASK_TO_AUTO.get(adapter.task_type or "")
    if prefix and src == prefix and not dst:
        saved = f"a head class{f' ({head})' if head and head != 'AutoModel' else ''} with the backbone under {src!r}"
        return saved, f"{tree.class_name}, the bare backbone (AutoModel), with no {src!r} prefix"
    if prefix and dst == prefix and not src:
        return (f"the bare backbone (AutoModel), with no {dst!r} prefix",
                f"{tree.class_name}, which holds the backbone under {dst!r}")
    where = f"paths under {src!r}" if src else "paths without a prefix"
    there = f"paths under {dst!r}" if dst else "paths without a prefix"
    return f"a layout with {where}", f"{tree.class_name}, whose {there.replace('paths', 'modules')}"


def layout_findings(adapter: Adapter, tree: ModuleTree, al: Alignment,
                    fix_cmd: Callable[[], str]) -> list[Finding]:
    """Coverage judged on what stock PEFT does (as_is), plus what a rewrite could and could not do."""
    out: list[Finding] = []
    as_is, chosen = al.as_is, al.chosen
    fixable = al.needs_rewrite and chosen.score > as_is.score and not al.ambiguous
    hint = fix_cmd() if fixable else None
    if al.ambiguous:
        options = [chosen] + al.ambiguous
        out.append(Finding("ambiguous-layout", f"{len(options)} rewrites land the adapter equally well "
                           f"({chosen.score} of {al.total}); lorafit will not guess",
                           [o.rewrite.describe() for o in options],
                           hint="choose one with --key-mapping '^PREFIX=NEWPREFIX'"))
    elif fixable and not chosen.rewrite.is_identity:  # identity: only the key prefix was missing (unprefixed-keys)
        saved, target = _layouts(adapter, tree, chosen.rewrite.src, chosen.rewrite.dst)
        out.append(Finding("layout-mismatch", f"the adapter was saved for {saved}; it is being loaded into "
                           f"{target}. As saved, {as_is.score} of {al.total} land; after "
                           f"'{chosen.rewrite.describe()}', {chosen.score} of {al.total} land",
                           [f"{p} -> {chosen.pairs[p]}" for p in list(chosen.pairs)[:3]], hint=hint))
    out += rule_coverage(adapter, tree, as_is, hint)
    out += rule_targets_nothing(adapter, tree, hint)
    out += rule_patterns(adapter, as_is)
    if chosen.rewrite.regexes and not fixable:
        # The user chose the mapping: say what it fails to land, even when it lands less than the keys as saved.
        for f in rule_coverage(adapter, tree, chosen, None):
            f.message = f"with --key-mapping '{chosen.rewrite.describe()}': {f.message}"
            out.append(f)
    if fixable:
        # What the rewrite cannot mend is reported on its own terms, so fix can refuse with a reason.
        seen = {(f.code, tuple(f.keys)) for f in out}
        for f in rule_coverage(adapter, tree, chosen, None):
            if (f.code, tuple(f.keys)) not in seen:  # the same drop as saved needs saying once
                f.message = f"even after '{chosen.rewrite.describe()}': {f.message}"
                out.append(f)
    return out


def target_findings(adapter: Adapter, tree: ModuleTree, al: Alignment, fix_cmd: Callable[[], str],
                    class_hint: str) -> list[Finding]:
    """Every rule on adapter x target."""
    best = al.chosen if al.needs_rewrite and not al.ambiguous else al.as_is
    return (layout_findings(adapter, tree, al, fix_cmd)
            + rule_modules_to_save_missing(adapter, tree, best)
            + rule_task_type(adapter, tree, class_hint)
            + rule_tied(adapter, tree, best))

"""The format-neutral rules: (adapter, health, tree, alignment) -> [Finding], one small function per rule.

Rules on the adapter alone serve `inspect`; rules on an Alignment serve `check` and `fix`. Coverage
rules take one Landing (the result of one rewrite) so the same rule judges what the stock loader would do
(`as_is`) and what lorafit's rewrite would do (`chosen`). A format's own rules (formats/<name>/rules.py)
and a runtime's (targets/<name>/rules.py) are passed in where they belong in the order of findings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .adapter import Adapter
from .align import Alignment, Landing, ShapeConflict
from .findings import Finding
from .tree import ModuleTree


@dataclass
class Health:
    """What reading an adapter's tensor data found (see formats/health.py)."""

    zero_b: list[str] = field(default_factory=list)  # module paths whose lora_B is all zero
    non_finite: dict[str, str] = field(default_factory=dict)  # key -> "NaN" / "Inf" / "NaN+Inf"
    parameters: int = 0


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def verb(n: int, singular: str, plural: str) -> str:
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
        out.append(Finding("lora-b-zero", f"{plural(len(health.zero_b), 'module')} of {n} have lora_B == 0 and "
                           "change nothing", health.zero_b))
    if health.non_finite:
        kinds = sorted(set("+".join(sorted(health.non_finite.values())).split("+")))
        out.append(Finding("non-finite", f"{plural(len(health.non_finite), 'tensor')} hold {'/'.join(kinds)}; "
                           "the adapted model's outputs will be NaN", list(health.non_finite),
                           hint="retrain from a checkpoint before the divergence, or lower the learning rate"))
    return out


def rank_mismatch(what: str, wrong: list[str], hint: str) -> Finding:
    """rank-mismatch: `what` ("3 modules") disagree with the config's ranks; PEFT's load fails on their sizes."""
    return Finding("rank-mismatch", f"{what} disagree with r / rank_pattern in adapter_config.json; PEFT will fail "
                   "with a size mismatch on load", wrong, hint=hint)


def rule_ranks(adapter: Adapter) -> list[Finding]:
    wrong, inconsistent = [], []
    for m in adapter.modules.values():
        b_rank = m.rank if m.rank_b is None else m.rank_b
        if b_rank != m.rank:
            inconsistent.append(f"{m.path}: lora_A rank {m.rank}, lora_B rank {b_rank}")
        elif m.kind == "param":
            # A holds r rows per expert; the target tells how many experts (landing_rules checks the exact r).
            ranks = sorted({r for r, _, _ in m.per_param.values()})
            if not any(r > 0 and m.rank % r == 0 for r in ranks):
                wrong.append(f"{m.path}: tensors have {m.rank} rows, not a multiple of r="
                             f"{' or '.join(map(str, ranks))} per expert")
        elif m.rank != m.config_rank:
            wrong.append(f"{m.path}: tensors have r={m.rank}, config gives r={m.config_rank}")
    out = []
    if wrong:
        out.append(rank_mismatch(plural(len(wrong), "module"), wrong,
                                 "set r (or a rank_pattern entry) to the tensors' rank in adapter_config.json"))
    if inconsistent:
        out.append(Finding("rank-inconsistent", f"{plural(len(inconsistent), 'module')} have lora_A and lora_B "
                           "of different rank: the checkpoint is corrupt", inconsistent))
    return out


def rule_incomplete(adapter: Adapter) -> list[Finding]:
    if not adapter.incomplete:
        return []
    return [Finding("incomplete-module", f"{plural(len(adapter.incomplete), 'module')} lack lora_A or lora_B; "
                    "PEFT leaves the missing half at init",
                    [f"{p} (has {', '.join(r)})" for p, r in adapter.incomplete.items()])]


def adapter_findings(adapter: Adapter, health: Health | None, format_rules: list[Finding]) -> list[Finding]:
    """Every rule that needs only the adapter; `format_rules` are the format's own findings on it."""
    out = rule_ranks(adapter) + rule_incomplete(adapter) + format_rules
    if health is not None:
        out += rule_health(adapter, health)
    return out


# ----------------------------------------------------------------------------- adapter x target

def _is_embedding_path(tree: ModuleTree, path: str) -> bool:
    info = tree.modules.get(path)
    return path in (tree.input_embeddings, tree.output_embeddings) or (info is not None and info.kind == "Embedding")


def _dropped_tensors(tree: ModuleTree, m: Landing, mts_keys: set[str], fix_hint: str | None) -> list[Finding]:
    """dropped-tensors: adapter modules and saved tensors (other than modules_to_save) with no module in the tree."""
    dropped = m.unmatched + [k for k in m.unmatched_tensors if k not in mts_keys]
    if not dropped:
        return []
    tensors = len(dropped) - len(m.unmatched)
    what = " and ".join(x for x in (plural(len(m.unmatched), "adapter module") if m.unmatched else "",
                                    plural(tensors, "saved tensor") if tensors else "") if x)
    # Modules in a named part of the trained model (a vision tower) where none of the adapter lands: the
    # target class lacks that part (a VLM's text-only class), and no rewrite can give them a place.
    _, parts = never_trained(m.unmatched, m.pairs.keys())
    lacks = (f". Those under {', '.join(sorted(parts))} adapt a part of the trained model that {tree.class_name} "
             "does not have (a text-only class of a VLM, say): only a class with that part can use them"
             if parts else "")
    return [Finding("dropped-tensors", f"{what} {verb(len(dropped), 'has', 'have')} no module of that "
                    f"path in {tree.class_name}; PEFT drops them without a word{lacks}", dropped,
                    hint=fix_hint)]


def never_trained(missing: list[str], landed: Iterable[str], inert: bool = True
                  ) -> tuple[list[str], dict[str, list[str]]]:
    """Split modules left without tensors into those the adapter lost, and those in a part of the model it never had.

    A part it never had is a named sub-tree above the numbered blocks (an encoder, a vision tower) in which no
    module of the adapter lands at all, as when an adapter trained on WhisperForCausalLM is loaded on
    WhisperForConditionalGeneration. A numbered block without tensors (layer 20 of layers 0-31), a part of a
    block (the MLP of layer 3) and a module beside landed ones are losses. Unless `inert` (B starts at zero, so
    an untrained LoRA layer changes nothing), every module is a loss.
    Returns (lost paths, {sub-tree prefix: its paths}).
    """
    seen = {".".join(parts[:i]) for p in landed for parts in [p.split(".")] for i in range(1, len(parts) + 1)}
    lost: list[str] = []
    branches: dict[str, list[str]] = {}
    for path in missing:
        parts = path.split(".")
        i = next((i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in seen), len(parts))
        if not inert or not seen or i == len(parts) or any(s.isdigit() for s in parts[:i]):
            lost.append(path)
        else:
            branches.setdefault(".".join(parts[:i]), []).append(path)
    return lost, branches


def _missing_adapter_weights(adapter: Adapter, tree: ModuleTree, m: Landing, fix_hint: str | None) -> list[Finding]:
    """missing-adapter-weights: targeted modules of the tree that get no tensor, and so keep their init values;
    never-trained-modules where they lie in a part of the model the adapter never had and B = 0 keeps them inert."""
    if not m.missing:
        return []
    lost, branches = never_trained(m.missing, m.pairs.values(), inert=adapter.init_b_zero)
    out = never_trained_findings(tree.class_name, branches)
    if lost:
        init = ("lora_A and lora_B keep the random values of init_lora_weights=false" if not adapter.init_b_zero
                else "lora_B stays 0 and the adapter does nothing there")
        out.insert(0, Finding("missing-adapter-weights", f"{plural(len(lost), 'targeted module')} of "
                              f"{tree.class_name} would get no tensor: {init}", lost, hint=fix_hint))
    return out


def never_trained_findings(where: str, branches: dict[str, list[str]]) -> list[Finding]:
    if not branches:
        return []
    paths = [p for ps in branches.values() for p in ps]
    return [Finding("never-trained-modules", f"{plural(len(paths), 'targeted module')} of {where} lie in "
                    f"{', '.join(sorted(branches))}, where the adapter has no module at all: it was trained on a "
                    "class without them. PEFT gives them LoRA layers with lora_B = 0, which change nothing, as "
                    "in training", paths)]


def _modules_to_save_absent(tree: ModuleTree, m: Landing, mts_keys: set[str]) -> list[Finding]:
    """modules-to-save-absent: trained modules_to_save tensors (a head, usually) with no place in the tree."""
    absent = [k for k in m.unmatched_tensors if k in mts_keys]
    if not absent:
        return []
    return [Finding("modules-to-save-absent", f"the trained {plural(len(absent), 'modules_to_save tensor')}"
                    f" have no place in {tree.class_name}; PEFT drops the trained head silently", absent,
                    hint="load with the head class it was trained with (e.g. --class "
                    "AutoModelForSequenceClassification)")]


def _trained_vocabulary(adapter: Adapter, emb: list[ShapeConflict]) -> int | None:
    """The vocabulary size the adapter's embedding tensors were trained with, if they all agree on one."""
    rows = set()
    extras = {x.key: x for x in adapter.extras}
    for c in emb:
        if c.adapter_path in extras:
            rows.add(extras[c.adapter_path].info.shape[0])  # [vocab, dim] for embed_tokens and lm_head alike
        elif c.adapter_path in adapter.modules:
            m = adapter.modules[c.adapter_path]
            rows.add(m.in_features if m.kind == "embedding" else m.out_features)
    return rows.pop() if len(rows) == 1 else None


def _embedding_size(adapter: Adapter, tree: ModuleTree, emb: list[ShapeConflict]) -> list[Finding]:
    """embedding-size: shape conflicts on embeddings, which mean the tokenizer was resized for training."""
    if not emb:
        return []
    n = _trained_vocabulary(adapter, emb)
    resize = f"model.resize_token_embeddings({n})" if n else "model.resize_token_embeddings(len(tokenizer))"
    return [Finding("embedding-size", f"{plural(len(emb), 'embedding tensor')} disagree with the target's "
                    f"vocabulary (vocab_size={tree.vocab_size}): the tokenizer was resized for training"
                    + (f" to {n} tokens" if n else "") + "; PeftModel.from_pretrained raises a size-mismatch "
                    "RuntimeError", [f"{c.adapter_path}: adapter {c.expected}, target {c.actual}" for c in emb],
                    hint=f"{resize} before loading" + ("" if n else ", with the training tokenizer"))]


def _shape_mismatch(shapes: list[ShapeConflict]) -> list[Finding]:
    """shape-mismatch: shape conflicts on other modules, which mean another base model."""
    if not shapes:
        return []
    return [Finding("shape-mismatch", f"{plural(len(shapes), 'module')} "
                    f"{verb(len(shapes), 'disagrees', 'disagree')} in shape with the target",
                    [f"{c.adapter_path} -> {c.target_path}: adapter {c.expected}, target {c.actual}"
                     for c in shapes], hint="check that --base is the model the adapter was trained on")]


def _module_collisions(m: Landing) -> list[Finding]:
    """shape-mismatch (collisions): tree modules that several adapter modules would land on."""
    if not m.collisions:
        return []
    return [Finding("shape-mismatch", f"{plural(len(m.collisions), 'target module')} would receive "
                    "several adapter modules", [f"{t} <- {', '.join(p)}" for t, p in m.collisions.items()])]


def rule_coverage(adapter: Adapter, tree: ModuleTree, m: Landing, fix_hint: str | None) -> list[Finding]:
    """Both directions: tensors PEFT would drop, and targeted modules that would keep their init values."""
    mts_keys = {x.key for x in adapter.extras if x.kind == "modules_to_save"}
    out = _dropped_tensors(tree, m, mts_keys, fix_hint)
    out += _missing_adapter_weights(adapter, tree, m, fix_hint)
    out += _modules_to_save_absent(tree, m, mts_keys)
    emb = [c for c in m.conflicts if _is_embedding_path(tree, c.target_path)]
    shapes = [c for c in m.conflicts if c not in emb]
    out += _embedding_size(adapter, tree, emb)
    out += _shape_mismatch(shapes)
    out += _module_collisions(m)
    return out


def _layouts(tree: ModuleTree, trained_as: str | None, src: str, dst: str) -> tuple[str, str]:
    """Name the saved and the target layout, e.g. 'a head class (AutoModelForCausalLM) with the backbone under ...'.

    `trained_as` is the class the adapter's task implies, as the runtime names it (None if it implies none).
    """
    prefix = f"{tree.base_model_prefix}." if tree.base_model_prefix else None
    head = trained_as
    if prefix and src == prefix and not dst:
        saved = f"a head class{f' ({head})' if head and head != 'AutoModel' else ''} with the backbone under {src!r}"
        return saved, f"{tree.class_name}, the bare backbone (AutoModel), with no {src!r} prefix"
    if prefix and dst == prefix and not src:
        return (f"the bare backbone (AutoModel), with no {dst!r} prefix",
                f"{tree.class_name}, which holds the backbone under {dst!r}")
    where = f"paths under {src!r}" if src else "paths without a prefix"
    there = f"paths under {dst!r}" if dst else "paths without a prefix"
    return f"a layout with {where}", f"{tree.class_name}, whose {there.replace('paths', 'modules')}"


def layout_findings(adapter: Adapter, tree: ModuleTree, al: Alignment, fix_cmd: Callable[[], str],
                    trained_as: str | None, format_rules: Callable[[Landing, str | None], list[Finding]]
                    ) -> list[Finding]:
    """Coverage judged on what the stock loader does (as_is), plus what a rewrite could and could not do.

    `format_rules(landing, hint)` are the format's rules on a landing (PEFT: targets-nothing, pattern-mismatch).
    """
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
        saved, target = _layouts(tree, trained_as, chosen.rewrite.src, chosen.rewrite.dst)
        out.append(Finding("layout-mismatch", f"the adapter was saved for {saved}; it is being loaded into "
                           f"{target}. As saved, {as_is.score} of {al.total} land; after "
                           f"'{chosen.rewrite.describe()}', {chosen.score} of {al.total} land",
                           [f"{p} -> {chosen.pairs[p]}" for p in chosen.pairs], hint=hint))
    consequences = rule_coverage(adapter, tree, as_is, hint) + format_rules(as_is, hint)
    # What the stock loader does then follows from the layout, or (a rewrite that only adds the key root) from
    # keys saved without base_model.model.: one root cause, one error, its consequences shown under it.
    root = "layout-mismatch" if out and out[-1].code == "layout-mismatch" else \
        "unprefixed-keys" if fixable and chosen.rewrite.is_identity and adapter.unrooted_keys else None
    for f in consequences if root else []:
        f.caused_by = root
        if f.severity == "error":
            f.severity = "warning"
    out += consequences
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



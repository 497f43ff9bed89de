"""Property tests for lorafit.align.align on generated ModuleTrees, plus real trees of Llama, GPT-2 and BERT.

The generated trees are plain data: a stack of repeated layers of Linear modules under a prefix P, with
a distractor head outside P. The adapter holds a subset of the Linear modules (and optionally saved
tensors of others) under a prefix Q derived from P: unchanged, with a prefix added, with leading
segments stripped, or with them replaced. align must undo exactly that change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_adapter, tiny_config
from lorafit.adapter import Entry, entries_of
from lorafit.align import Rewrite, _tree_key, align, candidate_rewrites
from lorafit.formats import format_of, read_adapter
from lorafit.formats.peft.targeting import is_targeted
from lorafit.targets.transformers.module_tree import tree_from_module
from lorafit.tree import ModuleInfo, ModuleTree

PREFIX_SEGMENTS = ["model", "transformer", "base", "language_model", "text_model", "backbone", "inner", "wrapped"]
CONTAINERS = ["layers", "h", "blocks"]
MODULE_NAMES = ["q", "k", "v", "o", "up", "down", "fc1", "fc2"]
DIMS = [8, 16, 24, 32]
PEFT_PREFIX = "base_model.model."
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Case:
    tree: ModuleTree
    entries: list[Entry]
    truth: dict[str, str]  # adapter module path -> the tree path it was derived from
    tensor_truth: dict[str, str]  # saved tensor key -> tree module path
    p: str  # the tree's prefix
    q: str  # the adapter's prefix
    names: list[str]  # module names of the LoRA entries (their target_modules)


def _add_containers(modules: dict[str, ModuleInfo]) -> dict[str, ModuleInfo]:
    """named_modules() lists every parent too: the root '' and each container on the way down."""
    out = {"": ModuleInfo("Model")}
    for path in list(modules):
        parts = path.split(".")
        for i in range(1, len(parts)):
            out.setdefault(".".join(parts[:i]), ModuleInfo("Block"))
    out.update(modules)
    return out


def _key(path: str) -> str:
    return f"{PEFT_PREFIX}{path}.weight"


def _moved(e: Entry, path: str) -> Entry:
    return replace(e, path=path, key=_key(path) if e.kind == "tensor" else None)


def _linear(fin: int, fout: int) -> ModuleInfo:
    return ModuleInfo("Linear", fin, fout, {"weight": (fout, fin)})


@st.composite
def cases(draw: Any, unique_shapes: bool = False, min_entries: int = 1, change: str | None = None) -> Case:
    p_parts = draw(st.lists(st.sampled_from(PREFIX_SEGMENTS), max_size=2, unique=True))
    p = "".join(s + "." for s in p_parts)
    container = draw(st.sampled_from(CONTAINERS))
    n_layers = draw(st.integers(min_entries, 4))
    names = draw(st.lists(st.sampled_from(MODULE_NAMES), min_size=1, max_size=4, unique=True))
    shape_of_name = {n: (draw(st.sampled_from(DIMS)), draw(st.sampled_from(DIMS))) for n in names}
    rests: list[str] = []
    modules: dict[str, ModuleInfo] = {}
    for i in range(n_layers):
        for j, n in enumerate(names):
            rest = f"{container}.{i}.{n}"
            rests.append(rest)
            # Repeated layers repeat their shapes, as in real models; unique mode gives every module its own.
            fin, fout = (100 + i * 10 + j, 200 + i * 10 + j) if unique_shapes else shape_of_name[n]
            modules[p + rest] = _linear(fin, fout)
    modules["head"] = _linear(16, 16)  # outside P: never in the adapter, must not confuse the search
    tree = ModuleTree("Generated", _add_containers(modules))

    kind = change or draw(st.sampled_from(["none", "add", "strip", "replace"] if p_parts else ["none", "add"]))
    fresh = [s for s in PREFIX_SEGMENTS if s not in p_parts]
    if kind == "none":
        q = p
    elif kind == "add":
        q = "".join(s + "." for s in draw(st.lists(st.sampled_from(fresh), min_size=1, max_size=2, unique=True))) + p
    else:
        k = draw(st.integers(1, len(p_parts)))
        kept = "".join(s + "." for s in p_parts[k:])
        q = kept if kind == "strip" else draw(st.sampled_from(fresh)) + "." + kept

    chosen = draw(st.lists(st.sampled_from(rests), min_size=min_entries, max_size=len(rests), unique=True))
    entries = [Entry(q + r, "linear", modules[p + r].in_features, modules[p + r].out_features) for r in chosen]
    truth = {q + r: p + r for r in chosen}
    tensor_truth: dict[str, str] = {}
    others = [r for r in rests if r not in chosen]
    for r in draw(st.lists(st.sampled_from(others), max_size=2, unique=True)) if others else []:
        key = _key(q + r)
        entries.append(Entry(q + r, "tensor", param="weight", shape=modules[p + r].params["weight"], key=key))
        tensor_truth[key] = p + r
    return Case(tree, entries, truth, tensor_truth, p, q, sorted({r.rsplit(".", 1)[1] for r in chosen}))


def _assert_lands_exactly(case: Case, al: Any) -> None:
    m = al.chosen
    assert m.pairs == case.truth
    assert m.tensor_pairs == case.tensor_truth
    assert not (m.unmatched or m.unmatched_tensors or m.conflicts or m.collisions)
    assert al.ambiguous == []
    for e in case.entries:
        assert m.rewrite.apply(e.path) == (case.truth.get(e.path) or case.tensor_truth[e.key or ""])
    for src, dst in m.pairs.items():  # shapes agree on every pair
        e = next(x for x in case.entries if x.path == src and x.kind == "linear")
        info = case.tree.modules[dst]
        assert (info.in_features, info.out_features) == (e.in_features, e.out_features)
    assert len(set(m.pairs.values())) == len(m.pairs)  # one-to-one


@SETTINGS
@given(cases())
def test_align_undoes_any_prefix_change(case: Case) -> None:
    al = align(case.entries, case.tree)
    _assert_lands_exactly(case, al)
    assert al.needs_rewrite == (case.p != case.q)
    assert al.total == len(case.entries)


@SETTINGS
def _naive_votes(entries: list[Entry], tree: ModuleTree) -> Counter[tuple[str, str]]:
    """The vote by definition: every (entry, tree path) pair with a common tail votes for what precedes it."""
    votes: Counter[tuple[str, str]] = Counter()
    for e in entries:
        seen = set()
        for t in tree.modules:
            a, b = _tree_key(e).split("."), t.split(".") if t else []
            k = 0
            while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
                k += 1
            if k:
                seen.add((".".join(a[:-k]) + "." if len(a) > k else "", ".".join(b[:-k]) + "." if len(b) > k else ""))
        votes.update(seen)
    return votes


@given(cases())
def test_candidates_are_the_most_voted_rewrites(case: Case) -> None:
    """The fast vote (grouped by last segment) equals the vote by definition: same ranks, ties in any order."""
    votes = _naive_votes(case.entries, case.tree)
    got = [(r.src, r.dst) for r in candidate_rewrites(case.entries, case.tree)[1:]]
    rank = {sd: (-n, len(sd[0]) + len(sd[1])) for sd, n in votes.items()}
    assert all(sd in votes and sd[0] != sd[1] for sd in got)
    expected = sorted(rank[sd] for sd in votes if sd[0] != sd[1])
    assert [rank[sd] for sd in got] == expected[:len(got)]


@given(cases(unique_shapes=True))
def test_align_undoes_any_prefix_change_unique_shapes(case: Case) -> None:
    _assert_lands_exactly(case, align(case.entries, case.tree))


@SETTINGS
@given(cases())
def test_align_with_config_reports_exactly_the_targeted_modules_left_out(case: Case) -> None:
    # target_modules names the module names the adapter holds; every other module of those names stays at init.
    al = align(case.entries, case.tree, lambda p: is_targeted({"target_modules": case.names}, p))
    _assert_lands_exactly(case, al)
    landed = set(case.truth.values())
    expected = sorted(path for path, info in case.tree.modules.items()
                      if info.kind == "Linear" and path.rsplit(".", 1)[-1] in case.names and path not in landed)
    assert sorted(al.chosen.missing) == expected


@SETTINGS
@given(cases(change="none"))
def test_identity_is_chosen_when_nothing_changed(case: Case) -> None:
    al = align(case.entries, case.tree)
    assert al.chosen.rewrite.is_identity
    assert not al.needs_rewrite
    assert al.as_is.pairs == al.chosen.pairs == case.truth
    assert al.as_is.score == len(case.entries)


@st.composite
def shape_change_cases(draw: Any, unique_shapes: bool) -> tuple[Case, str]:
    case = draw(cases(unique_shapes=unique_shapes, min_entries=2))
    victim = draw(st.sampled_from(sorted(case.truth)))
    target = case.truth[victim]
    info = case.tree.modules[target]
    fout = (info.out_features or 0) + 1000  # a shape no module of the tree has
    case.tree.modules[target] = replace(info, out_features=fout, params={"weight": (fout, info.in_features or 0)})
    return case, victim


@pytest.mark.parametrize("unique_shapes", [False, True])
def test_shape_change_is_a_conflict_not_a_silent_match(unique_shapes: bool) -> None:
    @SETTINGS
    @given(shape_change_cases(unique_shapes))
    def prop(arg: tuple[Case, str]) -> None:
        case, victim = arg
        al = align(case.entries, case.tree)
        m = al.chosen
        assert victim not in m.pairs
        assert m.pairs == {k: v for k, v in case.truth.items() if k != victim}
        assert [(c.adapter_path, c.target_path) for c in m.conflicts] == [(victim, case.truth[victim])]
        assert al.ambiguous == []
        assert m.rewrite.apply(victim) == case.truth[victim]

    prop()


@st.composite
def twin_cases(draw: Any) -> tuple[Case, str, str]:
    """Identical encoder-like and decoder-like subtrees under one parent; the adapter is saved without either."""
    a, b = draw(st.lists(st.sampled_from(["encoder", "decoder", "vision", "text", "left", "right"]),
                         min_size=2, max_size=2, unique=True))
    parent = "".join(s + "." for s in draw(st.lists(st.sampled_from(PREFIX_SEGMENTS), max_size=1)))
    case = draw(cases(change="none"))
    assert case.p == case.q
    modules: dict[str, ModuleInfo] = {"head": case.tree.modules["head"]}
    for path, info in case.tree.modules.items():
        if info.kind == "Linear" and path != "head":
            rest = path[len(case.p):]
            modules[f"{parent}{a}.{rest}"] = info
            modules[f"{parent}{b}.{rest}"] = info
    entries = [_moved(e, e.path[len(case.p):]) for e in case.entries]
    return replace(case, tree=ModuleTree("Twins", _add_containers(modules)), entries=entries), parent + a, parent + b


@SETTINGS
@given(twin_cases())
def test_two_equally_good_rewrites_are_ambiguous(arg: tuple[Case, str, str]) -> None:
    case, a, b = arg
    al = align(case.entries, case.tree)
    assert al.ambiguous, "two identical subtrees must not be chosen between silently"
    options = {al.chosen.rewrite, *(m.rewrite for m in al.ambiguous)}
    assert {Rewrite("", a + "."), Rewrite("", b + ".")} <= options
    assert al.chosen.score == len(case.entries)
    landed = set(al.chosen.pairs.values()) | set(al.chosen.tensor_pairs.values())
    assert all(t.startswith(a + ".") for t in landed) or all(t.startswith(b + ".") for t in landed)


@SETTINGS
@given(twin_cases())
def test_identity_wins_a_tie_with_a_twin_subtree(arg: tuple[Case, str, str]) -> None:
    # Saved for the `a` subtree: it lands as saved; 'replace a. with b.' lands as much but is never preferred.
    case, a, _ = arg
    entries = [_moved(e, f"{a}.{e.path}") for e in case.entries]
    al = align(entries, case.tree)
    assert al.chosen.rewrite.is_identity and al.ambiguous == [] and not al.needs_rewrite
    assert al.chosen.score == len(entries) and al.as_is.complete


@SETTINGS
@given(cases(change="none"), st.sampled_from(["copy", "vision", "draft"]))
def test_identity_wins_a_tie_with_a_prefixed_copy(case: Case, extra: str) -> None:
    # The tree also holds a copy of every module under `extra.`: 'add prefix extra.' lands as much as saved.
    modules = dict(case.tree.modules)
    modules.update({f"{extra}.{p}": info for p, info in case.tree.modules.items() if p})
    al = align(case.entries, ModuleTree("Copies", modules))
    assert al.chosen.rewrite.is_identity and al.ambiguous == [] and not al.needs_rewrite
    assert al.chosen.pairs == case.truth


def test_single_layer_adapter_is_not_ambiguous_with_a_layer_shift() -> None:
    # An adapter on layer 0 only (layers_to_transform=[0]) of two identical layers: 'strip model.' is the answer;
    # 'model.layers.0.' -> 'layers.1.' lands as much but renames a layer, so it is no real alternative.
    tree = ModuleTree("LlamaModel", _add_containers(
        {f"layers.{i}.self_attn.{n}": _linear(16, 16) for i in (0, 1) for n in ("q_proj", "v_proj")}))
    entries = [Entry(f"model.layers.0.self_attn.{n}", "linear", 16, 16) for n in ("q_proj", "v_proj")]
    al = align(entries, tree)
    assert al.chosen.rewrite == Rewrite("model.", "")
    assert al.ambiguous == []
    assert al.chosen.pairs == {f"model.layers.0.self_attn.{n}": f"layers.0.self_attn.{n}" for n in ("q_proj", "v_proj")}


# ----------------------------------------------------------------------------- real trees (meta device)

def _meta_tree(family: str, class_name: str) -> ModuleTree:
    with torch.device("meta"):
        model = getattr(transformers, class_name)(tiny_config(family))
    return tree_from_module(model)


REAL = [
    # (family, class the adapter was trained on, class it is loaded into, expected rewrite)
    ("llama", "AutoModelForCausalLM", "LlamaModel", Rewrite("model.", "")),
    ("llama", "AutoModel", "LlamaForCausalLM", Rewrite("", "model.")),
    ("gpt2", "AutoModelForCausalLM", "GPT2Model", Rewrite("transformer.", "")),
    ("gpt2", "AutoModel", "GPT2LMHeadModel", Rewrite("", "transformer.")),
    ("bert", "AutoModelForSequenceClassification", "BertModel", Rewrite("bert.", "")),
    ("bert", "AutoModel", "BertForSequenceClassification", Rewrite("", "bert.")),
]


@pytest.mark.parametrize(("family", "trained_on", "loaded_into", "expected"), REAL,
                         ids=[f"{r[0]}-{r[1]}-to-{r[2]}" for r in REAL])
def test_real_trees_find_the_base_model_prefix(bases: dict[str, Path], tmp_path: Path, family: str,
                                               trained_on: str, loaded_into: str, expected: Rewrite) -> None:
    make_adapter(bases[family], trained_on, tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    tree = _meta_tree(family, loaded_into)
    al = align(entries_of(adapter), tree, format_of(adapter).targeting(adapter))
    assert al.as_is.score == 0  # stock PEFT lands nothing
    assert al.chosen.rewrite == expected
    assert al.ambiguous == []
    assert al.chosen.pairs == {p: expected.apply(p) for p in adapter.modules}
    assert not (al.chosen.unmatched or al.chosen.conflicts or al.chosen.collisions or al.chosen.missing)
    # Same class: identity, everything lands as saved.
    same_tree = _meta_tree(family, _concrete(family, trained_on))
    al_same = align(entries_of(adapter), same_tree, format_of(adapter).targeting(adapter))
    assert al_same.chosen.rewrite.is_identity
    assert al_same.as_is.score == len(entries_of(adapter)) and al_same.as_is.complete


def _concrete(family: str, auto: str) -> str:
    return {("llama", "AutoModelForCausalLM"): "LlamaForCausalLM", ("llama", "AutoModel"): "LlamaModel",
            ("gpt2", "AutoModelForCausalLM"): "GPT2LMHeadModel", ("gpt2", "AutoModel"): "GPT2Model",
            ("bert", "AutoModelForSequenceClassification"): "BertForSequenceClassification",
            ("bert", "AutoModel"): "BertModel"}[(family, auto)]

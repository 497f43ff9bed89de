"""Map an adapter's module paths onto a ModuleTree: pure data in, an Alignment out (no IO, no torch).

Layouts differ by a prefix: LlamaForCausalLM holds LlamaModel under `model.`, GPT2LMHeadModel under
`transformer.`, a refactored VLM under `model.language_model.` instead of `language_model.model.`.
So the search is over prefix rewrites `src -> dst`: every (adapter prefix, tree prefix) pair that makes
some adapter path land on some tree path gets a vote, the best-voted candidates are scored in full,
and a rewrite is accepted only when it is one-to-one and every shape agrees.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from . import user_regex
from .adapter import Entry
from .tree import ModuleInfo, ModuleTree

# Would the adapter's format put a LoRA layer on the module at this path? (PEFT: target_modules and its kin.)
Targeting = Callable[[str], bool]

# How many of the best-voted candidates are scored in full; the rest are noise (a q_proj of layer 3
# "matching" the q_proj of layer 7).
_CANDIDATES_SCORED = 12


@dataclass(frozen=True)
class Rewrite:
    """A path rewrite: replace the leading `src` with `dst` (kind "prefix"), or user regexes (kind "regex")."""

    src: str = ""
    dst: str = ""
    regexes: tuple[tuple[str, str], ...] = ()
    more: tuple[tuple[str, str], ...] = ()  # further prefix rules, for paths that `src` does not match
    table: tuple[tuple[str, str], ...] = ()  # exact renames: what the runtime's own load-time conversion does

    @property
    def is_identity(self) -> bool:
        return not self.regexes and not self.more and not self.table and self.src == self.dst

    @cached_property
    def _table(self) -> dict[str, str]:
        return dict(self.table)

    @property
    def rules(self) -> tuple[tuple[str, str], ...]:
        """The prefix rules in order; the first whose source prefix matches a path rewrites it."""
        return ((self.src, self.dst), *self.more)

    def apply(self, path: str) -> str:
        if self.table:
            return self._table.get(path, path)
        if self.regexes:
            for pattern, repl in self.regexes:
                new, n = user_regex.subn(pattern, repl, path)
                if n:
                    return new
            return path
        for src, dst in self.rules:
            if path.startswith(src) or (src and path + "." == src):
                return dst + path[len(src):]
        return path

    def describe(self) -> str:
        if self.regexes:
            return ", ".join(f"{p}={r}" for p, r in self.regexes)
        if self.table:
            return f"as PEFT loads it (transformers' conversion renames {len(self.table)} modules)"
        if self.is_identity:
            return "as saved"
        return " and ".join(_describe_rule(s, d) for s, d in self.rules)

    def to_json(self) -> dict[str, Any]:
        if self.regexes:
            return {"type": "regex", "mapping": [list(r) for r in self.regexes], "description": self.describe()}
        if self.table:
            return {"type": "load-time-conversion", "renamed": len(self.table), "description": self.describe()}
        out: dict[str, Any] = {"type": "prefix", "from": self.src, "to": self.dst, "description": self.describe()}
        if self.more:
            out["more"] = [{"from": s, "to": d} for s, d in self.more]
        return out


def _describe_rule(src: str, dst: str) -> str:
    if not src:
        return f"add prefix {dst!r}"
    if not dst:
        return f"strip prefix {src!r}"
    return f"replace prefix {src!r} with {dst!r}"


@dataclass(frozen=True)
class ShapeConflict:
    adapter_path: str
    target_path: str
    expected: str  # what the adapter needs
    actual: str  # what the target has


@dataclass
class Landing:
    """The result of applying one Rewrite: where each entry lands, and what does not."""

    rewrite: Rewrite
    pairs: dict[str, str] = field(default_factory=dict)  # adapter module path -> tree path (shapes agree)
    tensor_pairs: dict[str, str] = field(default_factory=dict)  # saved tensor key -> tree module path
    unmatched: list[str] = field(default_factory=list)  # LoRA module paths with no tree module: dropped
    unmatched_tensors: list[str] = field(default_factory=list)  # saved tensor keys with nowhere to go
    conflicts: list[ShapeConflict] = field(default_factory=list)
    collisions: dict[str, list[str]] = field(default_factory=dict)  # tree path -> adapter paths (not 1:1)
    missing: list[str] = field(default_factory=list)  # targeted tree modules that get no tensor: stay at init
    params: dict[str, tuple[str, int]] = field(default_factory=dict)  # "param" entry -> (parameter, experts)

    @property
    def score(self) -> int:
        return len(self.pairs) + len(self.tensor_pairs)

    @property
    def complete(self) -> bool:
        return not (self.unmatched or self.unmatched_tensors or self.conflicts or self.collisions or self.missing)


@dataclass
class Alignment:
    """Adapter paths x ModuleTree. `as_is` is what the stock loader will do; `chosen` the best rewrite found."""

    as_is: Landing
    chosen: Landing
    ambiguous: list[Landing] = field(default_factory=list)  # other rewrites as good as chosen
    # (rewrite, score, reason); none are ranked when every entry lands as saved
    rejected: list[tuple[Rewrite, int, str]] = field(default_factory=list)
    total: int = 0  # entries to land

    @property
    def needs_rewrite(self) -> bool:
        """True when landing needs a rewrite beyond what the stock loader does by itself."""
        return self.chosen is not self.as_is


def _tree_key(entry: Entry) -> str:
    """The path of the module the entry lands on: its own, without the format's wrapper suffix."""
    return entry.path[: len(entry.path) - len(entry.wrapper)] if entry.wrapper else entry.path


def adapted_parameter(entry: Entry, info: ModuleInfo) -> tuple[str, int] | str:
    """(parameter, experts) a "param" entry adapts on the module `info`, or what does not agree.

    The module's targeted parameters are wrapped in the order it registers them, each wrapper around the
    last; so the outermost (depth 0) adapts the last one.
    """
    targeted = [n for n in info.params if n in entry.params and info.param_features(n) is not None]
    if entry.depth >= len(targeted):
        have = ", ".join(targeted) or "none of " + ", ".join(entry.params)
        return f"{info.kind} has {len(targeted)} targeted parameters ({have}), not {entry.depth + 1}"
    name = targeted[len(targeted) - 1 - entry.depth]
    experts, fin, fout = info.param_features(name) or (1, 0, 0)
    if (fin, fout) != (entry.in_features, entry.out_features) or (entry.rank or 0) % experts:
        return f"{name} of {experts} experts ({fin}->{fout})"
    return name, experts


def _fits(entry: Entry, tree: ModuleTree, path: str) -> str | None:
    """None when `entry` fits the tree module at `path`; otherwise what does not agree."""
    info = tree.modules[path]
    if entry.kind == "tensor" and entry.param == "trainable_tokens_delta":
        # [n tokens, embedding dim]: fits any embedding of that width (token indices are checked by PEFT).
        ok = info.kind == "Embedding" and entry.shape is not None and entry.shape[-1] == info.out_features
        return None if ok else f"{info.kind}({info.in_features}->{info.out_features}) cannot take trainable tokens"
    if entry.kind == "tensor":
        have = info.params.get(entry.param or "")
        if have is None:
            return f"no parameter {entry.param!r}"
        return None if tuple(have) == entry.shape else f"{entry.param} {list(have)} vs {list(entry.shape or ())}"
    if info.lora_kind != entry.kind:
        return f"{info.kind} cannot take a LoRA {entry.kind} adapter"
    if (info.in_features, info.out_features) != (entry.in_features, entry.out_features):
        return f"{info.kind}({info.in_features}->{info.out_features})"
    return None


def apply_rewrite(entries: Sequence[Entry], tree: ModuleTree, rewrite: Rewrite,
                  targeted: Targeting | None = None, stock: bool = False) -> Landing:
    """Land every entry under `rewrite`; collect pairs, drops, shape conflicts, collisions and misses.

    With stock=True, entries saved outside the format's key root land nowhere, as with the stock loader;
    otherwise they are judged as lorafit will write them (under the root). With `targeted`, targeted tree
    modules that get no LoRA module are reported as missing.
    """
    m = Landing(rewrite)
    owners: dict[str, list[str]] = {}
    for e in entries:
        target = rewrite.apply(_tree_key(e))
        if target not in tree.modules or (stock and not e.rooted):
            (m.unmatched_tensors if e.kind == "tensor" else m.unmatched).append(e.key or e.path)
            continue
        found: tuple[str, int] | str | None = None
        if e.kind == "param":  # fits when the module has the parameter it adapts; else the text says why not
            found = adapted_parameter(e, tree.modules[target])
            problem = found if isinstance(found, str) else None
        else:
            problem = _fits(e, tree, target)
        if problem is not None:
            expected = (f"{e.param} {list(e.shape or ())}" if e.kind == "tensor"
                        else f"{e.kind}({e.in_features}->{e.out_features})")
            m.conflicts.append(ShapeConflict(e.key or e.path, target, expected, problem))
            continue
        if e.kind == "tensor":
            m.tensor_pairs[e.key or e.path] = target
        else:
            owners.setdefault(target if e.kind != "param" else f"{target}{e.wrapper}", []).append(e.path)
            m.pairs[e.path] = target
            if isinstance(found, tuple):
                m.params[e.path] = found
    for target, paths in owners.items():
        if len(paths) > 1:
            m.collisions[target] = paths
            for p in paths:
                m.pairs.pop(p, None)
                m.params.pop(p, None)
    if targeted is not None:
        landed = set(m.pairs.values())
        m.missing = [p for p, info in tree.modules.items() if info.lora_kind and p not in landed and targeted(p)]
    return m


def _prefixes(path: str) -> Iterable[tuple[str, str]]:
    """(prefix, rest) splits of a dotted path at every dot, prefix ending in '.' or empty."""
    parts = path.split(".")
    for i in range(len(parts)):
        yield (".".join(parts[:i]) + "." if i else ""), ".".join(parts[i:])


def _last_segment(prefix: str) -> str:
    """'model.layers.' -> 'layers'; '' for the empty prefix."""
    return prefix[:-1].rsplit(".", 1)[-1] if prefix else ""


def candidate_rewrites(entries: Sequence[Entry], tree: ModuleTree) -> list[Rewrite]:
    """Prefix rewrites ranked by how many entry paths they would land somewhere in the tree.

    An entry path and a tree path that share a tail vote for the rewrite of what precedes their longest
    common tail: ("model.layers.", "layers.") is voted as ("model.", ""). Tree prefixes are grouped by
    their last segment so that the longest tail is found without comparing strings again.
    """
    by_suffix: dict[str, dict[str, list[str]]] = {}
    for t in tree.modules:
        if not t:
            continue
        for prefix, rest in _prefixes(t):
            by_suffix.setdefault(rest, {}).setdefault(_last_segment(prefix), []).append(prefix)
    votes: Counter[tuple[str, str]] = Counter()
    for e in entries:
        seen: set[tuple[str, str]] = set()
        for src, rest in _prefixes(_tree_key(e)):
            last = _last_segment(src)
            for d_last, dsts in by_suffix.get(rest, {}).items():
                if last and d_last == last:
                    continue  # the tail goes on: the split one segment further left votes for this pair
                seen.update((src, d) for d in dsts)
        votes.update(seen)
    ranked = sorted(votes.items(), key=lambda kv: (-kv[1], len(kv[0][0]) + len(kv[0][1])))
    out = [Rewrite()]
    out += [Rewrite(s, d) for (s, d), _ in ranked[:_CANDIDATES_SCORED] if s != d]
    return out


def _extends(rewrite: Rewrite, simpler: Rewrite) -> bool:
    """True when `rewrite` is `simpler` followed by a rename of a further, non-empty part of the path."""
    if rewrite.regexes or simpler.regexes:
        return False
    return (len(rewrite.src) > len(simpler.src) and len(rewrite.dst) > len(simpler.dst)
            and rewrite.src.startswith(simpler.src) and rewrite.dst.startswith(simpler.dst))


def _found(m: Landing) -> int:
    """How many entries the rewrite sends to a path the tree has, whether or not the shapes agree."""
    return len(m.pairs) + len(m.tensor_pairs) + len(m.conflicts) + sum(len(p) for p in m.collisions.values())


def align(entries: Sequence[Entry], tree: ModuleTree, targeted: Targeting | None = None,
          key_mapping: Sequence[tuple[str, str]] = (), load_renames: Mapping[str, str] | None = None) -> Alignment:
    """Align adapter entries with a module tree.

    Args:
        entries: what the adapter holds (see `entries_of`).
        tree: the target's ModuleTree.
        targeted: the format's targeting rule; with it, targeted modules left without tensors are reported missing.
        key_mapping: user regex rewrites (pattern, replacement), tried in order, first match wins.
        load_renames: module paths the stock loader itself renames while loading (a runtime's load-time conversion).
    Returns:
        the Alignment: as_is (what the stock loader does), the chosen rewrite, ambiguities and rejected candidates.
    """
    as_is = apply_rewrite(entries, tree, Rewrite(table=tuple(sorted((load_renames or {}).items()))), targeted,
                          stock=True)
    if key_mapping:
        chosen = apply_rewrite(entries, tree, Rewrite(regexes=tuple(key_mapping)), targeted)
        return Alignment(as_is=as_is, chosen=chosen, total=len(entries))
    if as_is.score == len(entries):
        # Every entry lands as saved (one to one, shapes agreeing): no rewrite can land more, and as_is wins a tie.
        # The usual case, and the most common one in a fleet scan: skip ranking the candidates.
        return Alignment(as_is=as_is, chosen=as_is, total=len(entries))
    al = _best_rewrite(entries, tree, targeted, as_is)
    # A refactor may move several sub-trees at once (a VLM's language model and its vision tower), each
    # under its own prefix: search again among the entries no rule so far applies to, and keep a further
    # rule while it lands more and is itself unambiguous.
    while al.chosen.rewrite.src and not al.ambiguous:
        left = [e for e in entries if not any(_tree_key(e).startswith(s) for s, _ in al.chosen.rewrite.rules)]
        if not left:
            break
        # Modules the rules so far already land on are taken: a further rule may not land there again.
        taken = set(al.chosen.pairs.values()) | set(al.chosen.tensor_pairs.values())
        free = replace(tree, modules={p: i for p, i in tree.modules.items() if p not in taken})
        sub = _best_rewrite(left, free, None, apply_rewrite(left, free, Rewrite(), None))
        if sub.ambiguous or sub.chosen.rewrite.is_identity or sub.chosen.score <= sub.as_is.score:
            break
        r = al.chosen.rewrite
        combined = apply_rewrite(entries, tree, Rewrite(r.src, r.dst, more=(*r.more, sub.chosen.rewrite.rules[0])),
                                 targeted)
        if combined.score <= al.chosen.score:
            break
        al.chosen = combined
    return al


def _best_rewrite(entries: Sequence[Entry], tree: ModuleTree, targeted: Targeting | None,
                  as_is: Landing) -> Alignment:
    """The single prefix rule that lands the most entries (identity on a tie), with ambiguities and losers."""
    candidates = candidate_rewrites(entries, tree)
    if all(e.rooted for e in entries):
        candidates = candidates[1:]  # identity is as_is itself
    scored = [as_is] + [apply_rewrite(entries, tree, r, targeted) for r in candidates]
    # A rewrite that is a simpler one plus a further rename ('model.layers.0.' -> 'layers.1.' beside 'strip
    # model.') is out when the simpler one finds the paths of as many entries: the extra rename is unjustified,
    # and taking it to dodge a shape conflict would land the adapter on the wrong layer without a word.
    rejected: list[tuple[Rewrite, int, str]] = []
    kept = []
    for m in scored:
        if any(_extends(m.rewrite, w.rewrite) and _found(w) >= _found(m) for w in scored if w is not m):
            rejected.append((m.rewrite, m.score, "renames more of the path than a simpler rewrite"))
        else:
            kept.append(m)
    scored = kept
    best = max(m.score for m in scored)
    winners: list[Landing] = []
    for m in scored:
        if m.score == best and best > 0:
            if not any(w.pairs == m.pairs and w.tensor_pairs == m.tensor_pairs for w in winners):
                winners.append(m)
        elif not m.rewrite.is_identity:
            why = ("not one-to-one" if m.collisions else
                   "shapes disagree" if m.conflicts else f"lands {m.score} of {len(entries)}")
            rejected.append((m.rewrite, m.score, why))
    if not winners:
        return Alignment(as_is=as_is, chosen=as_is, rejected=rejected, total=len(entries))
    # What the stock loader does wins a tie: never rewrite what already lands.
    winners.sort(key=lambda m: (m is not as_is, len(m.rewrite.src) + len(m.rewrite.dst)))
    chosen, others = winners[0], winners[1:]
    ambiguous = [] if chosen is as_is else others
    return Alignment(as_is=as_is, chosen=chosen, ambiguous=ambiguous, rejected=rejected, total=len(entries))

"""Generate lorafit's blueprints from the installed transformers (maintainers run this when the pin moves).

    .venv/bin/python tools/make_blueprints.py            # the default model types
    .venv/bin/python tools/make_blueprints.py llama gpt2  # only these

For each model type it builds every Auto class's model on the meta device, from the default config and
from several probes whose integer fields are scaled by independent random factors, and finds for every
size an expression in the config's integer fields that explains all of them (a field, a multiple, a
product or a quotient of two, a product of two over a third, or the sum of two such terms). Repeated
layers become one repeat row. Booleans are flipped one at a time: one that changes the tree is pinned
to its default. Anything it cannot explain is not written, and lorafit builds those trees on the meta
device as before.
tests/test_blueprint.py checks the result against meta builds of independently chosen configs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

from lorafit.targets.transformers.blueprint import (
    FREE_IF_DEFINED,
    SCHEMA,
    data_file,
    flatten,
    installed_transformers,
    is_free_key,
)
from lorafit.targets.transformers.module_tree import _AUTO_NAME_TABLES, TASK_TO_AUTO, tree_from_module
from lorafit.targets.transformers.resolve import build_meta_model
from lorafit.tree import ModuleInfo, ModuleTree

DEFAULT_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "opt", "bert",
                 "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "gemma3_text", "olmo2", "granite", "phi",
                 "falcon", "gpt_neox", "starcoder2", "roberta", "deberta-v2", "t5", "bart", "whisper", "deepseek_v3",
                 "llava", "gemma3", "idefics3", "mllama"]
# Keys hub config.json files carry that transformers' configs do not define. One is free for a model type
# when neither its modeling and configuration code nor transformers' generic model code mention it.
HUB_EXTRA_KEYS = ["n_ctx", "task_specific_params", "position_embedding_type", "gradient_checkpointing",
                  "cache_implementation", "max_sequence_length", "is_llama_config", "rope_interleaved",
                  "unsloth_version", "unsloth_fixed", "_attn_implementation_autoset", "hidden_act",
                  "hidden_activation", "max_length", "temperature", "top_p", "top_k", "do_sample"]
# Sizes that some model code reads with getattr(config, name, default) and that its config class does not
# define, with that default. Real configs carry them (Qwen3-MoE's head_dim); for a model type whose code reads
# one, the generator checks the default against a build without the field, then treats it as a size.
OPTIONAL_SIZES = {"head_dim": "hidden_size/num_attention_heads"}
# Auto classes beyond those a PEFT task_type implies: a VLM is fine-tuned as AutoModelForImageTextToText.
EXTRA_AUTO = [("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")]
# Real config.json files (bench/configs/): the keys they carry beyond their config class's fields are tried.
HUB_CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "configs"
ACTIVATIONS = ["gelu", "silu", "gelu_pytorch_tanh", "relu"]
# Keys that from_pretrained acts on and a build from the config does not: never shown harmless by a probe.
LOAD_TIME_KEYS = {"quantization_config"}
PROBES = 6
MAX_RUNS = 64  # runs of unlike blocks under one container (Mllama's 40 layers with 8 cross-attention ones: 17)
MULTIPLIERS = range(1, 5)
# What a blueprint must reproduce of a ModuleTree besides its modules.
_TREE_ATTRS = ("class_name", "model_type", "base_model_prefix", "can_generate", "implied_task_type", "vocab_size",
               "tie_word_embeddings", "input_embeddings", "output_embeddings", "converts_keys", "tied")


class Unsupported(Exception):
    """The architecture does not fit the blueprint model; lorafit keeps building it on the meta device."""


def infer(points: list[dict[str, int]], targets: list[int | None]) -> int | str | None:
    """The simplest expression that gives targets[k] on points[k] for every k; Unsupported if none or two."""
    if all(t is None for t in targets):
        return None
    if any(t is None for t in targets):
        raise Unsupported(f"a size is sometimes absent: {targets}")
    ts = [int(t) for t in targets if t is not None]
    if len(set(ts)) == 1:
        return ts[0]
    fields = sorted(points[0])
    tiers: list[list[tuple[tuple[str, ...], tuple[str, ...]]]] = [
        [((f,), ()) for f in fields],
        [(tuple(sorted(p)), ()) for p in itertools.combinations_with_replacement(fields, 2)]
        + [((f,), (g,)) for f in fields for g in fields if f != g],
        [(tuple(sorted(p)), (h,)) for p in itertools.combinations_with_replacement(fields, 2) for h in fields
         if h not in p],
    ]
    for tier in tiers:
        found = set()
        for num, den in tier:
            c = _coefficient(points, ts, num, den)
            if c is not None:
                found.add(_render(c, num, den))
        if len(found) == 1:
            return found.pop()
        if found:
            raise Unsupported(f"sizes {ts} fit {sorted(found)}")
    # Sums of two terms are searched over every pair of monomials: with many fields (a VLM's two configs, DeepSeek)
    # the third tier's pairs run to hundreds of millions, so only the first two tiers take part there.
    monomials = [m for tier in (tiers if len(fields) <= 20 else tiers[:2]) for m in tier]
    found = (_sums(points, ts, monomials) or _patches(points, ts, fields)
             or _offsets(points, ts, fields) or _times_square(points, ts, fields))
    if len(found) > 1:
        # Sums with a field every probe keeps constant (num_labels) fit a field plus a constant many ways;
        # the field plus the constant itself (Mllama's vocab_size+8) is the one meant when it alone fits.
        offsets = _offsets(points, ts, fields)
        found = offsets if len(offsets) == 1 else found
    if not found:
        found = _patch_products(points, ts, fields, tiers[:2])
    if len(found) == 1:
        return found.pop()
    raise Unsupported(f"sizes {ts} fit {sorted(found)}" if found else f"no expression explains sizes {ts}")


def _sums(points: list[dict[str, int]], ts: list[int], monomials: list[tuple[tuple[str, ...], tuple[str, ...]]]
          ) -> set[str]:
    """Two terms, each a small multiple of a monomial, whose sum gives every target (Phi-3's fused qkv width,
    heads*head_dim + 2*kv*head_dim). Screened in floats on all points, then confirmed exactly."""
    values = []
    for num, den in monomials:
        row = []
        for p in points:
            v = 1.0
            for f in num:
                v *= p[f]
            for g in den:
                v = v / p[g] if p[g] else float("nan")
            row.append(v)
        values.append(row)
    found = set()
    pairs = list(itertools.combinations(range(len(ts)), 2))
    for i, j in itertools.combinations(range(len(monomials)), 2):
        x, y = values[i], values[j]
        # Two points on which the two terms are not proportional (the first two may scale them alike).
        a0, a1 = next(((a, b) for a, b in pairs if x[a] * y[b] - x[b] * y[a]), (0, 1))
        det = x[a0] * y[a1] - x[a1] * y[a0]
        if not det or det != det:
            continue
        c1 = (ts[a0] * y[a1] - ts[a1] * y[a0]) / det
        c2 = (x[a0] * ts[a1] - x[a1] * ts[a0]) / det
        if c1 <= 0 or c2 <= 0 or any(abs(c1 * x[k] + c2 * y[k] - ts[k]) > 1e-6 * ts[k] for k in range(len(ts))):
            continue
        terms = []
        for c, (num, den) in ((c1, monomials[i]), (c2, monomials[j])):
            frac = Fraction(c).limit_denominator(8)
            if frac.numerator > 64 or abs(float(frac) - c) > 1e-9:
                break
            terms.append((frac, num, den))
        else:
            if all(sum(_exact(p, *t) for t in terms) == t_k for p, t_k in zip(points, ts, strict=True)):
                found.add("+".join(sorted(_render(*t) for t in terms)))
    return found


def _patches(points: list[dict[str, int]], ts: list[int], fields: list[str]) -> set[str]:
    """A vision tower's positions: (image_size/patch_size)^2, plus 1 for a class token (CLIP)."""
    found = set()
    for f, g in itertools.permutations(fields, 2):
        if any(p[g] <= 0 or p[f] % p[g] for p in points):
            continue
        for extra in (0, 1):
            if all((p[f] // p[g]) ** 2 + extra == t for p, t in zip(points, ts, strict=True)):
                found.add(f"{f}*{f}/{g}/{g}" + ("+1" if extra else ""))
    return found


def _patch_products(points: list[dict[str, int]], ts: list[int], fields: list[str],
                    tiers: list[list[tuple[tuple[str, ...], tuple[str, ...]]]]) -> set[str]:
    """A vision tower's positions times a product (Mllama's tile position embedding: max_num_tiles *
    ((image_size/patch_size)^2 + 1) * hidden_size). Only the position counts that divide every target are tried."""
    found = set()
    for f, g in itertools.permutations(fields, 2):
        if any(p[g] <= 0 or p[f] % p[g] for p in points):
            continue
        for extra in (0, 1):
            counts = [(p[f] // p[g]) ** 2 + extra for p in points]
            if any(c <= 1 or t % c for c, t in zip(counts, ts, strict=True)):
                continue
            rest = [t // c for c, t in zip(counts, ts, strict=True)]
            for tier in tiers:
                here = {_render(c, num, den) for num, den in tier
                        if (c := _coefficient(points, rest, num, den)) is not None}
                if here:
                    found |= {f"{e}*{f}*{f}/{g}/{g}" + (f"+{e}" if extra else "") for e in here}
                    break
    return found


def _times_square(points: list[dict[str, int]], ts: list[int], fields: list[str]) -> set[str]:
    """A field times the square of another: Idefics3's connector takes vision_hidden * scale_factor^2 features."""
    return {f"{f}*{g}*{g}" for f, g in itertools.permutations(fields, 2)
            if all(p[f] * p[g] * p[g] == t for p, t in zip(points, ts, strict=True))}


def _offsets(points: list[dict[str, int]], ts: list[int], fields: list[str]) -> set[str]:
    """A field plus a small constant: BART's and OPT's learned positions keep 2 rows beyond max_position_embeddings."""
    return {f"{f}+{k}" for f in fields for k in range(1, 9)
            if all(p[f] + k == t for p, t in zip(points, ts, strict=True))}


def _exact(p: dict[str, int], c: Fraction, num: tuple[str, ...], den: tuple[str, ...]) -> Fraction:
    v = Fraction(c)
    for f in num:
        v *= p[f]
    for g in den:
        v /= p[g]
    return v


def _coefficient(points: list[dict[str, int]], ts: list[int], num: tuple[str, ...],
                 den: tuple[str, ...]) -> Fraction | None:
    c = None
    for p, t in zip(points, ts, strict=True):
        base = Fraction(1)
        for f in num:
            base *= p[f]
        for g in den:
            if p[g] == 0:
                return None
            base /= p[g]
        if base == 0:
            return None
        k = Fraction(t) / base
        if c is None:
            c = k
        elif k != c:
            return None
    if c is None or c.numerator > 64 or c.denominator > 8:
        return None
    return c


def _render(c: Fraction, num: tuple[str, ...], den: tuple[str, ...]) -> str:
    parts = ([str(c.numerator)] if c.numerator != 1 else []) + list(num)
    out = "*".join(parts)
    for d in ([str(c.denominator)] if c.denominator != 1 else []) + list(den):
        out += "/" + d
    return out


def _collapse(modules: dict[str, ModuleInfo]) -> list[Any]:
    """Rows for one built tree: ("one", path, info) or ("repeat", container, start, stop, [(template, info)]).

    Numbered blocks that are alike form one repeat row; runs of different blocks (DeepSeek's first dense
    layers, then MoE ones) form one row per run.
    """
    items = list(modules.items())
    rows: list[Any] = []
    i = 0
    while i < len(items):
        path, info = items[i]
        segs = path.split(".") if path else []
        pos = next((k for k, s in enumerate(segs) if s.isdigit()), None)
        if pos is None:
            rows.append(("one", path, info))
            i += 1
            continue
        container = ".".join(segs[:pos])
        by_index: dict[int, list[tuple[str, ModuleInfo]]] = {}
        while i < len(items):
            p, inf = items[i]
            ps = p.split(".")
            if len(ps) <= pos or ".".join(ps[:pos]) != container or not ps[pos].isdigit():
                break
            # Numbers further down (T5's block.{i}.layer.0 / layer.1) stay literal: a count that changes with the
            # config changes the rows, which the probes catch.
            by_index.setdefault(int(ps[pos]), []).append((".".join([*ps[:pos], "{i}", *ps[pos + 1:]]), inf))
            i += 1
        if sorted(by_index) != list(range(len(by_index))):
            raise Unsupported(f"the blocks under {container} are not numbered 0..n-1")
        start = 0
        for k in range(1, len(by_index) + 1):
            if k == len(by_index) or by_index[k] != by_index[start]:
                rows.append(("repeat", container, start, k, by_index[start]))
                start = k
        # Many runs are blocks of kinds set by a list field (Mllama's cross_attention_layers, pinned to its
        # default): each boundary must then be explained in every probe like any size, or the type is dropped.
        if sum(1 for r in rows if r[0] == "repeat" and r[1] == container) > MAX_RUNS:
            raise Unsupported(f"the blocks under {container} differ from each other")  # a pattern, not runs
    return rows


def _shape_of(rows: list[Any]) -> list[Any]:
    """What must agree between probes: the paths, module kinds and parameter names."""
    def info_shape(info: ModuleInfo) -> Any:
        return (info.kind, info.in_features is None, info.out_features is None,
                tuple((n, len(s)) for n, s in info.params.items()), info.transposed)
    out = []
    for r in rows:
        if r[0] == "one":
            out.append((r[1], info_shape(r[2])))
        else:
            out.append((r[1], tuple((t, info_shape(inf)) for t, inf in r[4])))
    return out


def _info_row(path: str, infos: list[ModuleInfo], points: list[dict[str, int]]) -> list[Any]:
    first = infos[0]
    params = {n: [infer(points, [i.params[n][d] for i in infos]) for d in range(len(s))]
              for n, s in first.params.items()}
    row = [path, first.kind, infer(points, [i.in_features for i in infos]),
           infer(points, [i.out_features for i in infos]), params]
    return row + [True] if first.transposed else row  # experts stored [in, out] (GPT-OSS)


def class_blueprint(trees: list[ModuleTree], points: list[dict[str, int]]) -> dict[str, Any]:
    per_probe = [_collapse(t.modules) for t in trees]
    if any(_shape_of(r) != _shape_of(per_probe[0]) for r in per_probe):
        raise Unsupported("the module structure changes with sizes")
    rows: list[Any] = []
    for k, row in enumerate(per_probe[0]):
        if row[0] == "one":
            rows.append(_info_row(row[1], [p[k][2] for p in per_probe], points))
        else:
            start = infer(points, [p[k][2] for p in per_probe]) if any(p[k][2] for p in per_probe) else 0
            stop = infer(points, [p[k][3] for p in per_probe])
            body = [_info_row(tpl, [p[k][4][j][1] for p in per_probe], points) for j, (tpl, _) in enumerate(row[4])]
            # ["repeat", stop, body] is range(stop); a run that does not start at block 0 adds its start.
            rows.append(["repeat", stop, body] + ([start] if start != 0 else []))
    t0 = trees[0]
    for attr in _TREE_ATTRS:
        if attr in ("vocab_size", "tie_word_embeddings"):
            continue  # a size expression and a config flag, not constants
        if len({json.dumps(getattr(t, attr), sort_keys=True) for t in trees}) != 1:
            raise Unsupported(f"{attr} changes with sizes")
    # model_type: a VLM's text-only class (MllamaForCausalLM) is built from its text config, of another type
    return {"rows": rows, "model_type": t0.model_type, "base_model_prefix": t0.base_model_prefix,
            "can_generate": t0.can_generate,
            "implied_task_type": t0.implied_task_type, "input_embeddings": t0.input_embeddings,
            "output_embeddings": t0.output_embeddings, "converts_keys": t0.converts_keys, "tied": t0.tied,
            "conversion_patterns": t0.conversion_patterns,
            "vocab_size": infer(points, [t.vocab_size for t in trees])}


def _same_tree(a: ModuleTree, b: ModuleTree, ignore: tuple[str, ...] = ()) -> bool:
    return list(a.modules.items()) == list(b.modules.items()) and all(
        getattr(a, f) == getattr(b, f) for f in _TREE_ATTRS if f not in ignore)


def model_type_blueprint(model_type: str, rng: random.Random,
                         base: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The spec of a model type; with `base`, of the variant whose structural fields take those values."""
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    # A composite config (a VLM's text_config, vision_config) is handled as one level of dotted keys.
    nested = [n for n in (getattr(config_cls, "sub_configs", None) or {})]
    build_any = _builder(config_cls, nested)

    def build(changes: dict[str, Any]) -> Any:
        return build_any({**(base or {}), **changes})

    default = flatten(build({}).to_dict(), nested)
    sizes = {k: v for k, v in default.items() if isinstance(v, int) and not isinstance(v, bool)
             and v != 0 and not is_free_key(k)}
    sizes["num_labels"] = 2
    floats = [k for k, v in default.items() if isinstance(v, float) and not is_free_key(k)]
    bools = {k: v for k, v in default.items() if isinstance(v, bool) and not is_free_key(k)}
    free = list(floats) + [k for k in default if k.rsplit(".", 1)[-1] in FREE_IF_DEFINED]
    free += [k for k in HUB_EXTRA_KEYS if k not in default and not _mentioned(k, config_cls)]
    pinned = {k: v for k, v in default.items()
              if k not in sizes and k not in bools and k not in free and not is_free_key(k)}

    classes, auto = _auto_classes(model_type)
    optional = _optional_sizes(config_cls, default, classes, build)
    sizes.update(optional)

    def make_config(changes: dict[str, Any]) -> Any:  # optional sizes are always given
        return build({**optional, **changes})

    equivalent: dict[str, list[Any]] = {}
    _prove_free(model_type, config_cls, default, pinned, free, equivalent, optional, classes, make_config)
    # A size that shapes the structure itself, not only the sizes (Qwen-MoE's decoder_sparse_step makes every
    # n-th block sparse), is pinned to its default: scaled alone, the blocks would stop repeating alike.
    for name in _structural_sizes(sizes, classes, make_config):
        pinned[name] = sizes.pop(name)

    # Probe 0 is the default config; the others scale every size by its own random factor.
    probes: list[dict[str, Any]] = [{}]
    for _ in range(50 * PROBES):
        changes: dict[str, Any] = {k: v * m for k, v, m in _multipliers(sizes, rng)}
        changes.update({k: default[k] * rng.choice([0.5, 0.75]) for k in floats})
        try:
            cfg = make_config(changes)
            for cls in classes.values():
                build_meta_model(cls, cfg)
        except Exception:
            continue
        probes.append(changes)
        if len(probes) > PROBES:
            break
    else:
        raise Unsupported(f"{model_type}: no scaled config builds")
    configs = [make_config(c) for c in probes]
    points = [{k: (c.num_labels if k == "num_labels" else _value(c, k)) for k in sizes} for c in configs]

    out_classes: dict[str, Any] = {}
    first_trees: dict[str, ModuleTree] = {}
    skipped: list[str] = []
    for name, cls in classes.items():
        try:
            trees = [tree_from_module(build_meta_model(cls, c)) for c in configs]
            bp = class_blueprint(trees, points)
            bp["pinned_bools"], bp["tie"] = _bool_roles(cls, bools, make_config, trees[0])
            out_classes[name] = bp
            first_trees[name] = trees[0]
        except Unsupported as e:
            skipped.append(f"{model_type}/{name}: {e}")
    # An optional integer that is null by default (sliding_window) is free when setting it changes no tree.
    for field_name in [k for k, v in pinned.items() if v is None]:
        try:
            cfg = make_config({field_name: 64})
            if all(_same_tree(tree_from_module(build_meta_model(classes[n], cfg)), t) for n, t in first_trees.items()):
                free.append(field_name)
                del pinned[field_name]
        except Exception:
            pass
    derived = _derived(build, nested, default, sizes, probes, points, [*pinned, *bools])
    derived.update({name: OPTIONAL_SIZES[name] for name in optional})  # left out: the code's own default
    # Integers no size depends on (max_position_embeddings, sliding_window...) took random values in every
    # probe without changing the tree: they are free, and config.json may give them any value, null too.
    used = set(re.findall(r"[A-Za-z_][\w.]*", json.dumps([out_classes, derived])))
    for name in [k for k in sizes if k not in used]:
        free.append(name)
        del sizes[name]
        derived.pop(name, None)
    nested_defaults = _nested_defaults(config_cls, nested)
    # A key of a sub-config that real configs carry and the class does not define (Mllama's pruned_heads: {}),
    # pinned to the value proven to change nothing: left out, it is as in the default build, which lacked it.
    nested_defaults.update({k: v for k, v in pinned.items()
                            if "." in k and k not in default and k not in nested_defaults})
    spec = {"sizes": sizes, "bools": bools, "pinned": pinned, "free": free, "derived": derived,
            "aliases": dict(getattr(config_cls, "attribute_map", {}) or {}), "nested": nested,
            "equivalent": equivalent, "base": dict(base or {}), "lift": _lifted_sub(config_cls, nested),
            "nested_defaults": nested_defaults,
            "divides": _with_defaults(_divides(out_classes, derived, points)
                                      + _enforced(default, classes, make_config), default),
            "layers_field": _layers_field(out_classes),
            "auto": {a: c for a, c in auto.items() if c in out_classes}, "classes": out_classes}
    return spec, skipped


def _expressions(node: Any) -> list[str]:
    """Every size expression in blueprint rows or a derived table (strings holding an operator)."""
    if isinstance(node, str):
        return [node] if any(op in node for op in "*/+") else []
    if isinstance(node, dict):
        return [e for v in node.values() for e in _expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in _expressions(v)]
    return []


def _divides(classes: dict[str, Any], derived: dict[str, Any], points: list[dict[str, int]]) -> list[list[str]]:
    """[f, g] when g divides an expression that f multiplies, and g divided f in every probe.

    The probes kept the default's divisibilities, so an expression is only known to hold where they hold:
    a config where hidden_size is no multiple of num_attention_heads may be split with floor division.
    """
    pairs = set()
    for expr in (term for e in _expressions([classes, derived]) for term in e.split("+")):
        num, _, den = expr.partition("/")
        for g in den.split("/") if den else []:
            for f in num.split("*"):
                if f in points[0] and g in points[0] and all(p[f] % p[g] == 0 for p in points):
                    pairs.add((f, g))
    return [list(p) for p in sorted(pairs)]


def _enforced(default: dict[str, Any], classes: dict[str, type], make_config: Any) -> list[list[str]]:
    """[f, g] when g divides f by default and transformers refuses a config where it does not.

    The generator breaks the divisibility by moving f, or g, and keeps the pair only when the error it
    gets names both values ("hidden size (4128) is not a multiple of ... heads (32)"), so an error about
    something else adds no constraint. A config that breaks one then gets no blueprint tree, and the meta
    build raises transformers' own error, which check reports.
    """
    ints = {k: v for k, v in default.items()
            if isinstance(v, int) and not isinstance(v, bool) and v > 1 and not is_free_key(k)}
    out = []
    for f, g in itertools.permutations(ints, 2):
        if not (ints[g] < ints[f] and ints[f] % ints[g] == 0):
            continue
        for fv, gv in ((ints[f] + 1, ints[g]), (ints[f], ints[g] + 1)):
            values = list({**ints, f: fv, g: gv}.values())
            if fv % gv == 0 or values.count(fv) > 1 or values.count(gv) > 1:
                continue  # an error naming these numbers could be about another field that has them
            try:
                cfg = make_config({f: fv, g: gv})
                for cls in classes.values():
                    build_meta_model(cls, cfg)
            except Exception as e:
                said = f"{e} {e.__cause__}"
                if re.search(rf"\b{fv}\b", said) and re.search(rf"\b{gv}\b", said):
                    out.append([f, g])
                    break
    return out


def _builder(config_cls: type, nested: list[str]) -> Any:
    """changes (dotted keys for nested fields) -> a config: each touched sub-config is given whole, its defaults
    with the changes applied, so that it keeps its own model_type."""
    composite = config_cls()
    # Of each default sub-config, only what differs from its class's own defaults (and its model_type): a field
    # the class derives (Gemma-3's layer_types from num_hidden_layers) must be derived again from the changes.
    bases: dict[str, dict[str, Any]] = {}
    for sub in nested:
        part = getattr(composite, sub, None)
        if part is not None:
            own = type(part)().to_dict()
            bases[sub] = {k: v for k, v in part.to_dict().items() if own.get(k) != v or k == "model_type"}

    def build(changes: dict[str, Any]) -> Any:
        kwargs: dict[str, Any] = {}
        for key, value in changes.items():
            sub, _, field = key.partition(".")
            if field and sub in nested:
                kwargs.setdefault(sub, dict(bases.get(sub) or {}))[field] = value
            else:
                kwargs[key] = value
        return config_cls(**kwargs)

    return build


def _nested_defaults(config_cls: type, nested: list[str]) -> dict[str, Any]:
    """Each sub-config class's own defaults, by dotted key: what a sub-config given in part is filled with."""
    composite = config_cls()
    out: dict[str, Any] = {}
    for sub in nested:
        part = getattr(composite, sub, None)
        if part is not None:
            out.update(flatten({sub: type(part)().to_dict()}, [sub]))
    return out


def _lifted_sub(config_cls: type, nested: list[str]) -> str | None:
    """The sub-config a flat config's fields move into when it gives none (Qwen2-VL's text_config), or None."""
    for sub in nested:
        part = getattr(config_cls(), sub, None)
        fields = [k for k, v in (part.to_dict() if part is not None else {}).items()
                  if isinstance(v, int) and not isinstance(v, bool) and v > 1]
        for field in fields[:1]:
            try:
                probe = config_cls(**{field: getattr(part, field) + 1})
            except Exception:
                continue
            if getattr(getattr(probe, sub, None), field, None) == getattr(part, field) + 1:
                return sub
    return None


def _value(config: Any, key: str) -> Any:
    """A field of a config by its dotted key (text_config.hidden_size)."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else getattr(config, part)
    return config


def _auto_classes(model_type: str) -> tuple[dict[str, type], dict[str, str]]:
    """The classes transformers' Auto classes map the model type to, and Auto class -> concrete name."""
    import transformers
    from transformers.models.auto import modeling_auto

    classes: dict[str, type] = {}
    auto: dict[str, str] = {}
    tables = [(TASK_TO_AUTO[task], table) for task, table in _AUTO_NAME_TABLES.items()] + EXTRA_AUTO
    for auto_name, table in tables:
        name = getattr(modeling_auto, table, {}).get(model_type)
        if isinstance(name, str) and hasattr(transformers, name):
            auto[auto_name] = name
            classes[name] = getattr(transformers, name)
    return classes, auto


def _prove_free(model_type: str, config_cls: type, default: dict[str, Any], pinned: dict[str, Any], free: list[str],
                equivalent: dict[str, list[Any]], optional: dict[str, int], classes: dict[str, type],
                make_config: Any) -> None:
    """Keys real configs of this type carry beyond the class's fields, and activation names, become free when no
    value tried changes any class's tree (they are then accepted with any value). Updates `free`, `pinned` and
    `equivalent` (other values a pinned field may take)."""
    aliases = getattr(config_cls, "attribute_map", {}) or {}
    hub = {k: v for k, v in _hub_extras(model_type).items() if k not in free and k not in optional
           and k not in LOAD_TIME_KEYS and k not in aliases}
    # A key the class does not define, tried at two values (booleans both, integers two): free if neither changes
    # a tree. Any other value is tried as the real config gives it, and only that value is accepted.
    scalar = {k: v for k, v in hub.items() if k not in default and len(v) > 1}
    for name in _unchanging(scalar, classes, make_config):
        free.append(name)
    for name, values in hub.items():
        if name in scalar or name in pinned and values[0] == pinned[name]:
            continue
        if (name not in default or name in pinned) and _unchanging({name: values}, classes, make_config):
            if name in pinned:
                equivalent.setdefault(name, []).append(values[0])  # Whisper's suppress_tokens of a real config
            else:
                pinned[name] = values[0]
    # An activation that builds the same tree as the pinned one is accepted too (Gemma reads "gelu" as its tanh
    # approximation); free only if every activation does.
    for name, value in [(k, v) for k, v in pinned.items() if isinstance(v, str) and "act" in k]:
        others = [a for a in ACTIVATIONS if a != value]
        same = [a for a in others if _unchanging({name: [a]}, classes, make_config)]
        if same == others:
            free.append(name)
            del pinned[name]
        elif same:
            equivalent[name] = same


def _optional_sizes(config_cls: type, default: dict[str, Any], classes: dict[str, type],
                    make_config: Any) -> dict[str, int]:
    """OPTIONAL_SIZES the model code reads that the config does not define, with their default values.

    Each is kept only when the tree built with its default equals the tree built without it (the default
    is right), and the tree built with another value differs (the code really reads it).
    """
    import importlib
    import inspect

    from lorafit.targets.transformers.blueprint import evaluate

    package = config_cls.__module__.rsplit(".", 1)[0]
    try:
        code = inspect.getsource(importlib.import_module(f"{package}.modeling_{config_cls.model_type}"))
    except (ImportError, OSError, AttributeError):
        return {}
    ints = {k: v for k, v in default.items() if isinstance(v, int) and not isinstance(v, bool)}
    out = {}
    for name, expr in OPTIONAL_SIZES.items():
        value = evaluate(expr, ints)
        if name in default or value is None or f'getattr(config, "{name}"' not in code:
            continue
        try:
            trees = [[tree_from_module(build_meta_model(c, make_config(ch))) for c in classes.values()]
                     for ch in ({}, {name: value}, {name: value * 2})]
        except Exception:
            continue
        if all(_same_tree(a, b) for a, b in zip(trees[0], trees[1], strict=True)) and trees[1] != trees[2]:
            out[name] = value
    return out


def _hub_extras(model_type: str) -> dict[str, list[Any]]:
    """Every key of a real config (or its nested text/vision config) of `model_type`, with values to try it at."""
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    sub = _lifted_sub(config_cls, list(getattr(config_cls, "sub_configs", None) or {}))
    sub_fields = set(getattr(config_cls(), sub).to_dict()) if sub else set()
    seen: dict[str, Any] = {}
    for path in sorted(HUB_CONFIGS.glob("*.json")):
        config = json.loads(path.read_text())
        if sub and sub not in config and config.get("model_type") == model_type:  # as the config class reads it
            config = {**{k: v for k, v in config.items() if k not in sub_fields},
                      sub: {k: v for k, v in config.items() if k in sub_fields}}
        nested = [k for k, v in config.items() if isinstance(v, dict) and ("model_type" in v or k == sub)]
        parts = [flatten(config, nested)] + [v for k, v in config.items() if k in nested]
        for part in parts:
            if part.get("model_type") == model_type:
                for key, value in part.items():
                    if not is_free_key(key):
                        seen.setdefault(key, value)
    out: dict[str, list[Any]] = {}
    for key, value in seen.items():
        if isinstance(value, bool):
            out[key] = [True, False]
        elif isinstance(value, int):
            out[key] = [value, 2 * value + 1]
        elif isinstance(value, float):
            out[key] = [value, value / 2]
        else:
            out[key] = [value]
    return out


def _unchanging(tries: dict[str, list[Any]], classes: dict[str, type], make_config: Any) -> list[str]:
    """The keys for which every value tried builds every class into the tree the defaults give."""
    base = {n: tree_from_module(build_meta_model(c, make_config({}))) for n, c in classes.items()}
    out = []
    for key, values in tries.items():
        try:
            same = all(_same_tree(tree_from_module(build_meta_model(c, make_config({key: v}))), base[n])
                       for v in values for n, c in classes.items())
        except Exception:
            continue  # a value transformers refuses: not shown harmless
        if same and values:
            out.append(key)
    return out


def _structural_sizes(sizes: dict[str, int], classes: dict[str, type], make_config: Any) -> list[str]:
    """Sizes that, doubled or tripled alone, change some class's rows beyond their sizes (or make them unsupported)."""
    def structure(cfg: Any) -> list[Any]:
        return [_shape_of(_collapse(tree_from_module(build_meta_model(c, cfg)).modules)) for c in classes.values()]

    try:
        base = structure(make_config({}))
    except Exception:
        return []
    out = []
    for name, value in sizes.items():
        if name == "num_labels":
            continue
        for m in (2, 3):
            try:
                changed = structure(make_config({name: value * m}))
            except Unsupported:
                changed = None
            except Exception:
                continue  # not a config transformers builds: the probes will not use it either
            if changed != base:
                out.append(name)
                break
    return out


def _with_defaults(pairs: list[list[str]], default: dict[str, Any]) -> list[list[Any]]:
    """Each [f, g] with the class defaults of both, for a config.json that leaves one out."""
    seen = sorted({(f, g) for f, g in pairs})
    return [[f, g, default.get(f, 2 if f == "num_labels" else None), default.get(g, 2 if g == "num_labels" else None)]
            for f, g in seen]


def _layers_field(classes: dict[str, Any]) -> str | None:
    """The config field that counts the repeated layers (what layer_types must match in length)."""
    for bp in classes.values():
        for row in bp["rows"]:
            if row[0] == "repeat" and isinstance(row[1], str) and row[1].isidentifier():
                return str(row[1])
    return None


def _mentioned(key: str, config_cls: type) -> bool:
    """Whether the model's own code or transformers' generic model code mentions `key` at all."""
    import importlib
    import inspect

    import transformers.configuration_utils
    import transformers.modeling_utils

    package = config_cls.__module__.rsplit(".", 1)[0]
    sources = [transformers.modeling_utils, transformers.configuration_utils,
               importlib.import_module(config_cls.__module__)]
    model_type = getattr(config_cls, "model_type", "")
    try:
        sources.append(importlib.import_module(f"{package}.modeling_{model_type}"))
    except ImportError:
        return True
    return any(key in inspect.getsource(m) for m in sources)


def _multipliers(sizes: dict[str, int], rng: random.Random) -> list[tuple[str, int, int]]:
    """A random factor per size that keeps the default's divisibilities (hidden by heads, heads by kv...).

    A size that divides a larger one by default still divides it, so a probe stays a config that
    transformers accepts and whose sizes its modules split evenly, as real configs do.
    """
    factors: dict[str, int] = {}
    for name, v in sorted(sizes.items(), key=lambda kv: kv[1]):
        base = 1
        for other, m in factors.items():
            w = sizes[other]
            if 1 < w < v and v % w == 0:
                base = math.lcm(base, m)
        factors[name] = base * rng.choice(MULTIPLIERS)
    return [(k, sizes[k], factors[k]) for k in sizes]


def _bool_roles(cls: type, bools: dict[str, bool], make_config: Any,
                base: ModuleTree) -> tuple[dict[str, bool], dict[str, Any]]:
    """Flip each boolean alone: free when the tree stays, the tie field when only tying follows it."""
    pinned: dict[str, bool] = {}
    tie: dict[str, Any] = {"value": base.tie_word_embeddings}
    for name, value in bools.items():
        try:
            flipped = tree_from_module(build_meta_model(cls, make_config({name: not value})))
        except Exception:
            pinned[name] = value
            continue
        if _same_tree(flipped, base):
            continue
        if _same_tree(flipped, base, ignore=("tie_word_embeddings",)) and flipped.tie_word_embeddings == (not value):
            tie = {"field": name}
            continue
        pinned[name] = value
    return pinned, tie


def _derived(build: Any, nested: list[str], default: dict[str, Any], sizes: dict[str, int],
             probes: list[dict[str, Any]], points: list[dict[str, int]],
             others: list[str]) -> dict[str, str | int | None]:
    """Fields whose value, when config.json omits them, depends on other fields: an expression, or None."""
    out: dict[str, str | int | None] = {}
    for name in [*sizes, *others]:
        if name == "num_labels":
            continue
        got = []
        for changes in probes[1:]:
            try:
                cfg = build({k: v for k, v in changes.items() if k != name})
            except Exception:
                continue  # this probe's other sizes do not fit the default (validation): no evidence either way
            got.append(flatten(cfg.to_dict(), nested).get(name))
        if got and all(g == default.get(name) for g in got):
            continue  # omitted, it is the class default
        try:
            # a pinned integer may derive too (OPT's word_embed_proj_dim is hidden_size when left out): given equal
            # to its derivation, the config is the one transformers makes without it
            if name not in sizes and (not isinstance(default.get(name), int) or isinstance(default.get(name), bool)):
                raise Unsupported(name)
            if len(got) != len(probes) - 1:
                raise Unsupported(name)
            pts = [{k: v for k, v in p.items() if k != name} for p in points[1:]]
            out[name] = infer(pts, got)
        except Unsupported:
            out[name] = None
    return out


def checked_on_real_configs(model_type: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` without the classes whose tree for a real config of the type (bench/configs/) is not its meta build.

    The probes vary sizes one config family at a time; a real config may combine values no probe did (OPT's
    projection as wide as its hidden size). Where the spec answers for one, its answer must be the meta build.
    """
    import tempfile

    from lorafit.targets.transformers.blueprint import _tree_from_spec
    from lorafit.targets.transformers.resolve import load_config, resolve_class

    for path in sorted(HUB_CONFIGS.glob("*.json")):
        config = json.loads(path.read_text())
        if config.get("model_type") != model_type:
            continue
        for name in list(spec["classes"]):
            drawn = _tree_from_spec(spec, config, model_type, name, None)
            if drawn is None:
                continue
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "config.json").write_text(json.dumps(config))
                cfg = load_config(Path(d))
                built = tree_from_module(build_meta_model(resolve_class(name, cfg), cfg))
            if not _same_tree(drawn, built, ignore=("source",)):
                print(f"dropped {model_type}/{name}: its tree for {path.name} is not the meta build", file=sys.stderr)
                del spec["classes"][name]
                spec["auto"] = {a: c for a, c in spec["auto"].items() if c != name}
    return spec


def structural_variants(model_type: str, spec: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """The structural settings of real configs (bench/configs/) that `spec` does not cover, one dict each.

    A pinned field or a pinned boolean with another value (flan-T5's gated-gelu FFN, Gemma-3's vision tower without
    its head, OPT's projection width), or a key the spec does not know (DeBERTa-v3's norm_rel_ebd).
    """
    from lorafit.targets.transformers.blueprint import canonical_keys, lift

    known = set(spec["sizes"]) | set(spec["pinned"]) | set(spec["free"]) | set(spec["bools"])
    same = spec.get("equivalent") or {}
    bools = {k: v for bp in spec["classes"].values() for k, v in bp["pinned_bools"].items()}
    out: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(HUB_CONFIGS.glob("*.json")):
        config = json.loads(path.read_text())
        if config.get("model_type") != model_type:
            continue
        flat = flatten(lift(spec, canonical_keys(spec, config) or {}), spec.get("nested") or [])
        base = {k: flat[k] for k, v in spec["pinned"].items() if k in flat and flat[k] != v
                and flat[k] not in same.get(k, [])}
        base.update({k: flat[k] for k, v in bools.items() if k in flat and flat[k] != v})
        base.update({k: v for k, v in flat.items() if k not in known and not is_free_key(k)
                     and k not in LOAD_TIME_KEYS})
        if base and base not in [b for _, b in out]:
            out.append((path, base))
    return out


def variant_for(model_type: str, spec: dict[str, Any], path: Path, base: dict[str, Any],
                seed: int) -> dict[str, Any] | None:
    """The spec whose base is the structural setting of the real config at `path`, or None.

    A setting can bring out more structure (DeBERTa's relative attention makes pos_att_type and position_buckets
    shape modules): what the variant still misses of that config joins the base, a few rounds at most.
    """
    for _ in range(3):
        variant, _ = model_type_blueprint(model_type, random.Random(f"{seed}:{model_type}:{sorted(base)}"), base)
        variant = checked_on_real_configs(model_type, variant)
        more = dict(next((b for p, b in structural_variants(model_type, variant) if p == path), {}))
        if not more:
            return variant if variant["classes"] else None
        base = {**base, **more}
    return None


def _main_specs(mt: str, spec: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """The spec of a model type and one per structural variant its real configs need."""
    specs = [spec]
    for path, base in structural_variants(mt, spec):
        try:
            variant = variant_for(mt, spec, path, base, seed)
        except Exception as e:
            print(f"skipped {mt} for {path.name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            continue
        if variant is not None:
            specs.append(variant)
            print(f"{mt} for {path.name}: {', '.join(variant['classes'])}", file=sys.stderr)
    return specs


def refresh_conversions(out: dict[str, Any]) -> None:
    """Every class's conversion_patterns from the installed transformers (cheap: no model is built)."""
    from lorafit.targets.transformers.conversion import source_patterns

    for model_type, entry in out["model_types"].items():
        for spec in entry if isinstance(entry, list) else [entry]:
            for bp in spec["classes"].values():
                bp["conversion_patterns"] = source_patterns(model_type)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_types", nargs="*")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write here instead of the shipped file (to run types in parallel)")
    ap.add_argument("--merge", type=Path, nargs="+", default=[],
                    help="take the model types of these --out files (then generate only the types named)")
    args = ap.parse_args()
    if not args.model_types and not args.merge:
        args.model_types = DEFAULT_TYPES
    tv = installed_transformers()
    if tv is None:
        sys.exit("transformers is not installed")
    path: Path = args.out or data_file(tv)

    out: dict[str, Any] = {"schema": SCHEMA, "transformers": tv, "model_types": {}}
    if path.exists():  # regenerating some model types keeps the others
        old = json.loads(path.read_text())
        if old.get("schema") == SCHEMA and old.get("transformers") == tv:
            out["model_types"] = {k: v for k, v in old["model_types"].items() if k not in args.model_types}
    for part in args.merge:
        data = json.loads(part.read_text())
        if data.get("schema") != SCHEMA or data.get("transformers") != tv:
            sys.exit(f"{part}: not blueprints of this schema and transformers {tv}")
        out["model_types"].update(data["model_types"])
    for mt in args.model_types:
        try:
            # One seed per model type: regenerating some types gives what a full run gives them.
            spec, skipped = model_type_blueprint(mt, random.Random(f"{args.seed}:{mt}"))
        except Exception as e:  # one architecture that does not fit must not stop the others
            print(f"skipped {mt}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            continue
        for s in skipped:
            print(f"skipped {s}", file=sys.stderr)
        spec = checked_on_real_configs(mt, spec)
        if not spec["classes"]:
            continue
        specs = _main_specs(mt, spec, args.seed)
        out["model_types"][mt] = specs if len(specs) > 1 else spec
        print(f"{mt}: {', '.join(spec['classes'])}", file=sys.stderr)
    refresh_conversions(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

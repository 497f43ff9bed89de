"""Blueprints: a model class's ModuleTree as data, with every size an expression of config.json fields.

A cold `lorafit check` spends ~8 s importing torch and transformers to build a tree that, for a dense
architecture, follows from a handful of config integers. A blueprint records that dependency once per
(model type, class, transformers version), as mergekit keeps architectures as data. It is generated
from transformers itself (tools/make_blueprints.py) and tested against meta-device builds.

Evaluating one is pure Python. It answers None (and the caller builds the tree on the meta device)
whenever the config is outside what the blueprint was verified for: another transformers version,
a config key it does not know, a structural field with another value, or a size it cannot derive.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

from ...tree import ModuleInfo, ModuleTree
from ...version import installed_version

SCHEMA = "lorafit.blueprints/1"
DATA_DIR = Path(__file__).parent / "blueprints"
# Config keys that never change a module tree: bookkeeping, token ids, rope settings (buffers, not
# parameters), labels (their count is the pseudo field num_labels), per-layer attention kinds.
FREE_KEYS = frozenset({
    "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "model_type",
    "rope_parameters", "rope_scaling", "rope_theta", "id2label", "label2id", "num_labels", "problem_type",
    "output_hidden_states", "output_attentions", "return_dict", "use_cache",
    # Custom code of a built-in model type: lorafit never runs it, so the tree is transformers' own class (the
    # check says so with the custom-code finding).
    "auto_map",
    # Acts in from_pretrained (a quantizer swaps in its layer classes), never in a build from the config: the meta
    # build ignores it as well, so both give the tree before quantizing (the check says so with quantized-base).
    "quantization_config",
})
# Free only for a model type whose config defines them (the generator lists them in its "free"): a
# mistral config.json with layer_types is read by transformers as ministral.
FREE_IF_DEFINED = frozenset({"layer_types"})
_TOKEN_ID = re.compile(r".*_token_ids?$")
# A factor: a config field (a nested one is dotted: text_config.hidden_size) or an integer.
_FACTOR = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*|\d+")


def data_file(transformers_version: str) -> Path:
    return DATA_DIR / f"transformers-{transformers_version}.json"


def installed_transformers() -> str | None:
    return installed_version("transformers")


@cache
def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def shipped_model_types() -> set[str]:
    """The model types the shipped blueprints of the installed transformers cover (none if it has none)."""
    tv = installed_transformers()
    data = _load(data_file(tv)) if tv else None
    return set(data["model_types"]) if data else set()


def evaluate(expr: str | int | None, values: dict[str, int]) -> int | None:
    """An expression like "num_key_value_heads*head_dim", "3*n_embd/2" or "a*b+2*c" on resolved config values.

    None when a field is missing or the division is not exact (the blueprint does not cover that config).
    """
    if expr is None or isinstance(expr, int):
        return expr
    if "+" in expr:  # a sum of terms, each exact (Phi-3's fused qkv: heads*head_dim + 2*kv*head_dim)
        terms = [evaluate(t, values) for t in expr.split("+")]
        return None if any(t is None for t in terms) else sum(t for t in terms if t is not None)
    num, den = 1, 1
    for part, sign in _terms(expr):
        v = int(part) if part.isdigit() else values.get(part)
        if v is None:
            return None
        if sign == "*":
            num *= v
        else:
            den *= v
    if den == 0 or num % den:
        return None
    return num // den


def _terms(expr: str) -> list[tuple[str, str]]:
    out, sign, pos = [], "*", 0
    for m in _FACTOR.finditer(expr):
        between = expr[pos:m.start()]
        if between in ("*", "/"):
            sign = between
        out.append((m.group(), sign))
        pos = m.end()
    return out


def is_free_key(key: str) -> bool:
    """A key that never changes a tree. In a nested config (text_config.rope_scaling) the same rules hold for its
    last part, except model_type: a VLM's text model of another type is another tree."""
    last = key.rsplit(".", 1)[-1]
    if last == "model_type" and "." in key:
        return False
    return last in FREE_KEYS or bool(_TOKEN_ID.match(last)) or last.startswith("output_")


def lift(spec: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A flat hub config of a composite type, as its config class reads it: Qwen2-VL's hub files keep the text
    model's fields at the top, and Qwen2VLConfig moves those into text_config when none is given."""
    sub = spec.get("lift")
    if not sub or sub in config:
        return config
    fields = {k.split(".", 1)[1] for group in ("sizes", "pinned", "free", "bools") for k in spec[group]
              if k.startswith(sub + ".")}
    moved = {k: v for k, v in config.items() if k in fields}
    return {**{k: v for k, v in config.items() if k not in moved}, sub: moved}


def flatten(config: dict[str, Any], nested: list[str]) -> dict[str, Any]:
    """A composite config (a VLM's text_config and vision_config) as one level of dotted keys."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in nested and isinstance(value, dict):
            out.update((f"{key}.{k}", v) for k, v in value.items())
        else:
            out[key] = value
    return out


def canonical_keys(spec: dict[str, Any], config: dict[str, Any]) -> dict[str, Any] | None:
    """config.json with the config class's aliases resolved (Qwen3-MoE's num_experts is num_local_experts), as
    transformers sets them; None when a field is given under both names with different values."""
    aliases = spec.get("aliases") or {}
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = aliases.get(key, key)
        if name in out and out[name] != value:
            return None
        out[name] = value
    return out


def resolve_sizes(spec: dict[str, Any], config: dict[str, Any]) -> dict[str, int] | None:
    """The config values the blueprint's expressions use, or None when the config is not covered."""
    known = set(spec["sizes"]) | set(spec["pinned"]) | set(spec["free"]) | set(spec["bools"])
    if any(k not in known and not is_free_key(k) for k in config):
        return None
    values: dict[str, int] = {}
    derived = spec["derived"]
    for name, default in spec["sizes"].items():
        if name == "num_labels":
            v = _num_labels(config, default)
        elif name in derived and config.get(name) is None:
            continue  # left out or null: derived below, as transformers does, once every given value is known
        elif name in config:
            v = config[name]
        else:
            v = _default(spec, config, name, default)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            return None  # transformers would reject it or build something else: let it say so
        values[name] = v
    for name, expr in derived.items():
        if name not in values and name in spec["sizes"]:
            v = evaluate(expr, values) if expr is not None else None
            if v is None or v <= 0:
                return None
            values[name] = v
    same = spec.get("equivalent") or {}  # other values the generator built into the same tree (Gemma: "gelu")
    for name, want in spec["pinned"].items():
        if name in derived:
            # The generator never gave it: every probe had what transformers derives (OPT's word_embed_proj_dim is
            # hidden_size, and other values add project_in/out). Null, or left out or given as its derivation when
            # that is known, the rows hold; otherwise they may not, and the meta build answers.
            given, expr = config.get(name, _UNKNOWN), derived[name]
            if given is None or (expr is not None and given in (_UNKNOWN, evaluate(expr, values))):
                continue
            return None
        given = _given_or_default(config, spec, name, want)
        if given != want and given not in same.get(name, []):
            return None
    if any(name in config and not isinstance(config[name], bool) for name in spec["bools"]):
        return None
    return values if _consistent(spec, config, values) else None


def _num_labels(config: dict[str, Any], default: int) -> int | None:
    """transformers' count: num_labels when given (it is applied last), else id2label's distinct int keys."""
    if "num_labels" in config:
        n = config["num_labels"]
        return n if isinstance(n, int) and not isinstance(n, bool) else None
    labels = config.get("id2label")
    if labels is None:
        return default
    try:
        return len({int(k) for k in labels}) if isinstance(labels, dict) else None
    except (TypeError, ValueError):
        return None


def _consistent(spec: dict[str, Any], config: dict[str, Any], values: dict[str, int]) -> bool:
    """Relations every probe of the generator kept, and checks transformers makes that a blueprint would skip.

    A size that divided another in every probe (hidden_size by num_attention_heads) must divide it here:
    modules may split it with floor division, which the expressions do not model. A pad token must be a
    row of the embedding, and layer_types must name every layer.
    """
    for f, g, f_default, g_default in spec.get("divides", []):
        a = values.get(f, config.get(f, f_default))
        b = values.get(g, config.get(g, g_default))
        if not (isinstance(a, int) and isinstance(b, int) and b > 0 and a % b == 0):
            return False
    pad, vocab = config.get("pad_token_id"), values.get("vocab_size")
    if isinstance(pad, int) and vocab is not None and not 0 <= pad < vocab:
        return False
    layers, kinds = spec.get("layers_field"), config.get("layer_types")
    if kinds is None or layers not in values:
        return True
    return isinstance(kinds, list) and len(kinds) == values[layers]


_UNKNOWN = object()  # equal to no pinned value


def _given_or_default(config: dict[str, Any], spec: dict[str, Any], name: str, default: Any) -> Any:
    """The config's value, else the class default; a missing derived field has no value lorafit knows."""
    if name in config:
        return config[name]
    return _UNKNOWN if name in spec["derived"] else _default(spec, config, name, default)


def _default(spec: dict[str, Any], config: dict[str, Any], name: str, default: Any) -> Any:
    """The value transformers gives a field config.json leaves out. A VLM's sub-config that config.json gives
    (even in part) fills the rest from its own class's defaults, not from the composite's default sub-config."""
    sub, dot, _ = name.partition(".")
    if dot and any(k.startswith(sub + ".") for k in config):
        return (spec.get("nested_defaults") or {}).get(name, _UNKNOWN)
    return default


def tree_from_blueprint(config: dict[str, Any], class_name: str, source: str | None = None) -> ModuleTree | None:
    """The ModuleTree of `class_name` (an Auto class or a concrete one) for this config.json, or None."""
    if os.environ.get("LORAFIT_NO_BLUEPRINTS"):
        return None
    tv = installed_transformers()
    data = _load(data_file(tv)) if tv else None
    model_type = config.get("model_type")
    if data is None or not isinstance(model_type, str) or model_type not in data["model_types"]:
        return None
    entry = data["model_types"][model_type]
    # One spec per structure real configs of the type have (T5's relu and gated FFNs): the first that answers.
    for spec in entry if isinstance(entry, list) else [entry]:
        tree = _tree_from_spec(spec, config, model_type, class_name, source)
        if tree is not None:
            return tree
    return None


def specs_of(data: dict[str, Any], model_type: str) -> list[dict[str, Any]]:
    """The specs of a model type: one, or one per structural variant."""
    entry = data["model_types"].get(model_type)
    return [] if entry is None else entry if isinstance(entry, list) else [entry]


def _tree_from_spec(spec: dict[str, Any], config: dict[str, Any], model_type: str, class_name: str,
                    source: str | None) -> ModuleTree | None:
    concrete = spec["auto"].get(class_name, class_name)
    bp = spec["classes"].get(concrete)
    if bp is None:
        return None
    canonical = canonical_keys(spec, config)
    if canonical is None:
        return None
    config = flatten(lift(spec, canonical), spec.get("nested") or [])
    # A structural variant answers only a config that says so: left out, a field takes the class default.
    if any(config.get(k, _UNKNOWN) != v for k, v in (spec.get("base") or {}).items()):
        return None
    values = resolve_sizes(spec, config)
    if values is None:
        return None
    for name, want in bp["pinned_bools"].items():
        if _given_or_default(config, spec, name, spec["bools"][name]) != want:
            return None
    modules = _expand(bp["rows"], values)
    if modules is None:
        return None
    tie = bp["tie"]
    return ModuleTree(
        class_name=concrete, modules=modules, model_type=bp.get("model_type", model_type),
        base_model_prefix=bp["base_model_prefix"],
        can_generate=bp["can_generate"], implied_task_type=bp["implied_task_type"],
        vocab_size=evaluate(bp["vocab_size"], values),
        tie_word_embeddings=bool(_given_or_default(config, spec, tie["field"], spec["bools"][tie["field"]])
                                 if "field" in tie
                                 else tie["value"]),
        input_embeddings=bp["input_embeddings"], output_embeddings=bp["output_embeddings"], source=source,
        converts_keys=bp["converts_keys"], tied=dict(bp["tied"]), origin="blueprint",
        conversion_patterns=bp.get("conversion_patterns"),
    )


def _info(row: list[Any], values: dict[str, int]) -> ModuleInfo | None:
    """One row's ModuleInfo for these values, or None when one of its sizes cannot be evaluated."""
    _, kind, fin, fout, params, *rest = row  # a sixth element: experts stored transposed
    fin_v, fout_v = evaluate(fin, values), evaluate(fout, values)
    shapes = {name: [evaluate(d, values) for d in shape] for name, shape in params.items()}
    if (fin_v is None) != (fin is None) or (fout_v is None) != (fout is None):
        return None
    dims = {name: tuple(d for d in shape if d is not None) for name, shape in shapes.items()}
    if any(len(dims[n]) != len(shapes[n]) for n in dims):
        return None
    return ModuleInfo(kind, fin_v, fout_v, dims, transposed=bool(rest and rest[0]))


def _expand(rows: list[Any], values: dict[str, int]) -> dict[str, ModuleInfo] | None:
    """Rows in named_modules order; a repeat row stands for its body once per index, in index order.

    Runs of different blocks (DeepSeek: dense layers up to first_k_dense_replace, MoE layers after) are
    consecutive repeat rows, each starting where the one before stopped.
    """
    out: dict[str, ModuleInfo] = {}
    last_stop: int | None = None  # where the previous run of blocks ended: the next run starts there
    for row in rows:
        if row[0] == "repeat":  # ["repeat", stop, body] or, for a run that starts later, [..., start]
            _, count_expr, body, *start_expr = row
            count = evaluate(count_expr, values)
            start = evaluate(start_expr[0], values) if start_expr else 0
            if count is None or start is None or start > count or (start_expr and start != last_stop):
                return None  # runs that overlap or leave a gap: not the structure the blueprint was made from
            last_stop = count
            infos = [(str(r[0]), _info(r, values)) for r in body]
            known = [(tpl, info) for tpl, info in infos if info is not None]
            if len(known) != len(infos):
                return None
            for i in range(start, count):
                out.update((tpl.replace("{i}", str(i)), info) for tpl, info in known)
        else:
            info = _info(row, values)
            if info is None:
                return None
            out[row[0]] = info
    return out

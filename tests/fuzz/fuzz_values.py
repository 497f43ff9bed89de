"""Hypothesis strategies for the values a hostile or broken file may hold, shared by every input kind.

Each list mixes plausible values (so a mutation gets past the first check) with the classic troublemakers:
regexes that backtrack forever or do not compile, rich markup, numbers beyond int/float limits, nesting
deeper than the recursion limit, wrong JSON types.
"""

from __future__ import annotations

import base64
from typing import Any

from hypothesis import strategies as st

# Regexes PEFT and lorafit may compile and match against every module path.
NASTY_REGEXES = [
    "(.|.)*Z", "(a+)+$", "(?i)q_proj", ".*(?i)q_proj", "(", ")", "[", "*", "+q_proj", "q_proj|", ".*", "", ".", "^$",
    "(?P<x>q)_proj", "\\", "q_proj\\", "(?<=q)_proj", "(x*)*y", "((((((.*)*)*)*)*)*)Z", "a{99999}{99999}",
    "(?#c)q_proj", ".*\\.(0|1)\\..*q_proj", "[/]", "[bold]q_proj", "q_proj\x00", "(?P<", "\\p{L}", "(?<!)", "\\1",
]
MODULE_NAMES = [
    "q_proj", "v_proj", "k_proj", "o_proj", "down_proj", "up_proj", "gate_proj", "lm_head", "embed_tokens", "norm",
    "model.layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj", "all-linear", "self_attn", "mlp", "model",
    "score", "classifier", "model.embed_tokens", "layers",
]
MARKUP = ["[/]", "[bold]", "[bold]x[/bold]", "[link=file:///etc/passwd]x[/link]", "[/bold]", "\x1b[31mred\x1b[0m",
          "a\nb", "\r", "%s%n", "{0}", "\u202e", "\ud800"]

names = st.sampled_from(MODULE_NAMES)
regexes = st.sampled_from(NASTY_REGEXES)
markup = st.sampled_from(MARKUP)
short_text = st.text(max_size=12)
names_or_regexes = st.one_of(names, regexes, markup, short_text)

# Scalars and small containers of any JSON type (NaN and Infinity too: Python's json reads them).
weird_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | short_text | markup,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(short_text | names, inner, max_size=4),
    max_leaves=8,
)
big_ints = st.sampled_from([0, -1, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**100])
int_like = st.one_of(st.integers(-3, 70), big_ints, st.floats(), st.sampled_from(["4", "", "four", "0x10"]),
                     st.booleans(), st.none())
bool_like = st.one_of(st.booleans(), st.sampled_from([0, 1, 2, "true", "false", "", None, [], {}]))


def repeat(open_: str, n: int, close: str, middle: str = "") -> dict[str, list[Any]]:
    return {"repeat": [open_, n, close, middle]}


# Raw JSON texts for values `json.dumps` cannot write: ints past the 4300-digit str limit, nesting past the
# recursion limit, floats beyond the double range.
raw_values = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0", "4.0", "4e0", "1E2"]),
    st.integers(4000, 6000).map(lambda n: repeat("9", n, "")),
    st.integers(500, 20000).map(lambda n: repeat("[", n, "]")),
    st.integers(500, 20000).map(lambda n: repeat('{"a":', n, "}", "0")),
)

# Whole documents that are no config at all.
WHOLE_TEXTS = ["", " \n", "[]", "null", "5", '"x"', "{", "}", "{}", "\ufeff{}", "[1, 2]", '{"a": 1}{"b": 2}',
               "NaN", "1" * 5000, "{'r': 4}", '{"r": 4,}', "\x00", '{"\\ud800": 1}']


@st.composite
def whole_document(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Ops that replace or damage a whole file (any format): text, nesting, bytes, truncation, flips."""
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return [{"content": {"text": draw(st.sampled_from(WHOLE_TEXTS))}}]
    if choice == 1:
        return [{"content": {"raw": draw(raw_values)}}]
    if choice == 2:  # not UTF-8, or random bytes
        data = draw(st.sampled_from([b'{"r": "\xff\xfe"}', b"\xff\xfe{\x00}", b'{"r": 4}\xc3', b"\x80"])
                    | st.binary(max_size=64))
        return [{"content": {"base64": base64.b64encode(data).decode()}}]
    if choice == 3:
        return [{"truncate": draw(st.integers(-200, 2000))}]
    if choice == 4:
        return [{"flip": draw(st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 255)).map(list),
                                       min_size=1, max_size=6))}]
    return [{"set": [[], draw(weird_json)]}]


@st.composite
def field_edits(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]], prefix: tuple[Any, ...] = ()
                ) -> list[dict[str, Any]]:
    """1 to 3 edits of top-level fields: set a drawn value, set raw JSON text, delete, write the key twice."""
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(fields)))
        path = [*prefix, name]
        how = draw(st.integers(0, 9))
        if how <= 5:
            ops.append({"set": [path, draw(fields[name])]})
        elif how == 6:
            ops.append({"set": [path, draw(weird_json)]})
        elif how == 7:
            ops.append({"set_raw": [path, draw(raw_values)]})
        elif how == 8:
            ops.append({"delete": path})
        else:
            ops.append({"duplicate": path})
    return ops

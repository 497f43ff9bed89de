"""lorafit.patterns restates PEFT's matching rules; PEFT's own functions are the oracle on generated paths.

Oracles: peft.utils.other.get_pattern_key (rank_pattern / alpha_pattern keys), the `.get(key, default)`
PEFT's LoraModel._create_and_replace does with it, and peft.tuners.tuners_utils.check_target_module_exists
on a real LoraConfig (target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save).
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from lorafit.formats.peft.targeting import is_targeted, pattern_key, resolve_rank_alpha, scaling

NAMES = ["model", "layers", "layer", "h", "blocks", "self_attn", "attn", "mlp", "q_proj", "k_proj", "v_proj",
         "down_proj", "c_attn", "lm_head", "embed_tokens", "encoder", "decoder", "language_model", "proj"]
DIGITS = ["0", "1", "2", "3", "10"]
# Regex keys and target patterns of the kinds people write; all valid regexes.
REGEXES = [r"q_proj|v_proj", r"layers\.\d+\.self_attn\.q_proj", r".*\.mlp\..*", r"model\.layers\.1\..*",
           r"(q|k)_proj", r"layers.0.mlp.down_proj", r".*_proj", r"h\.[01]\.attn\.c_attn", r".*layers\.(0|2)\..*",
           r"decoder\..*", r"model\..*\.(q_proj|down_proj)"]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A pattern key that matches every path, appended last: when PEFT returns it, no real key matched.
SENTINEL = "(?:.*)(?#lorafit-test-sentinel)"

segment = st.one_of(st.sampled_from(NAMES), st.sampled_from(DIGITS))
paths = st.lists(segment, min_size=1, max_size=6).map(".".join)


@st.composite
def path_and_keys(draw: Any) -> tuple[str, list[str]]:
    """A module path and pattern keys, some built from the path itself (suffixes, whole path) so they match."""
    path = draw(paths)
    parts = path.split(".")
    from_path = [".".join(parts[i:]) for i in range(len(parts))]
    key = st.one_of(st.sampled_from(NAMES), st.sampled_from(REGEXES), st.sampled_from(from_path), paths)
    return path, draw(st.lists(key, max_size=5, unique=True))


def peft_pattern_key(keys: list[str], path: str) -> str | None:
    """PEFT's answer, in lorafit's convention (None when no key matches)."""
    found = get_pattern_key([*keys, SENTINEL], path)
    return None if found == SENTINEL else found


@SETTINGS
@given(path_and_keys())
def test_pattern_key_matches_peft(case: tuple[str, list[str]]) -> None:
    path, keys = case
    assert pattern_key(keys, path) == peft_pattern_key(keys, path)


def test_pattern_key_none_vs_peft_returning_the_path() -> None:
    # PEFT's get_pattern_key returns the path itself when nothing matches; lorafit returns None.
    assert get_pattern_key(["v_proj"], "model.layers.0.q_proj") == "model.layers.0.q_proj"
    assert pattern_key(["v_proj"], "model.layers.0.q_proj") is None
    # First match in order wins, as in PEFT, even when a later key is more specific.
    keys = ["q_proj", r"model\.layers\.0\.q_proj"]
    assert pattern_key(keys, "model.layers.0.q_proj") == get_pattern_key(keys, "model.layers.0.q_proj") == "q_proj"
    # A key matches a dotted suffix, never a partial segment.
    assert pattern_key(["proj"], "model.q_proj") is None
    assert peft_pattern_key(["proj"], "model.q_proj") is None


@st.composite
def rank_alpha_case(draw: Any) -> tuple[dict[str, Any], str]:
    path, rank_keys = draw(path_and_keys())
    _, alpha_keys = draw(path_and_keys())
    config: dict[str, Any] = {
        "rank_pattern": {k: draw(st.integers(1, 64)) for k in rank_keys},
        "alpha_pattern": {k: draw(st.one_of(st.integers(1, 128), st.floats(0.5, 64.0))) for k in alpha_keys},
    }
    if draw(st.booleans()):
        config["r"] = draw(st.integers(1, 64))
    if draw(st.booleans()):
        config["lora_alpha"] = draw(st.integers(1, 128))
    if draw(st.booleans()):
        config[draw(st.sampled_from(["rank_pattern", "alpha_pattern"]))] = None
    return config, path


@SETTINGS
@given(rank_alpha_case())
def test_resolve_rank_alpha_matches_peft(case: tuple[dict[str, Any], str]) -> None:
    config, path = case
    lc = LoraConfig(**{k: v for k, v in config.items() if v is not None})
    # What LoraModel._create_and_replace does for the module at `path`.
    r = lc.rank_pattern.get(get_pattern_key(lc.rank_pattern.keys(), path), lc.r)
    alpha = lc.alpha_pattern.get(get_pattern_key(lc.alpha_pattern.keys(), path), lc.lora_alpha)
    assert resolve_rank_alpha(config, path) == (r, alpha)


def test_scaling_plain_and_rslora() -> None:
    assert scaling({}, 4, 8.0) == 2.0
    assert scaling({"use_rslora": True}, 4, 8.0) == 4.0
    assert scaling({"use_rslora": False}, 16, 8.0) == 0.5


@st.composite
def target_case(draw: Any) -> tuple[dict[str, Any], str]:
    """A LoraConfig's targeting fields (valid for PEFT) and a module path."""
    path = draw(paths)
    parts = path.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    name = st.one_of(st.sampled_from(NAMES), st.sampled_from(suffixes))
    cfg: dict[str, Any] = {}
    if draw(st.booleans()):
        cfg["target_modules"] = draw(st.lists(name, min_size=1, max_size=4, unique=True))
        if draw(st.booleans()):
            cfg["layers_to_transform"] = draw(st.one_of(
                st.integers(0, 3), st.lists(st.sampled_from([0, 1, 2, 3, 10]), max_size=3, unique=True)))
            if draw(st.booleans()):
                cfg["layers_pattern"] = draw(st.one_of(
                    st.sampled_from(["layers", "h", "blocks", "layer", ""]),
                    st.lists(st.sampled_from(["layers", "h", "blocks", "layer", ""]), max_size=2, unique=True)))
    else:
        cfg["target_modules"] = draw(st.one_of(st.sampled_from(REGEXES), st.just(re.escape(path))))
    exclude = draw(st.sampled_from(["none", "list", "regex"]))
    if exclude == "list":
        cfg["exclude_modules"] = draw(st.lists(name, min_size=1, max_size=3, unique=True))
    elif exclude == "regex":
        cfg["exclude_modules"] = draw(st.sampled_from(REGEXES))
    if draw(st.booleans()):
        cfg["modules_to_save"] = draw(st.lists(name, min_size=1, max_size=2, unique=True))
    return cfg, path


def saved_form(lc: LoraConfig) -> dict[str, Any]:
    """The config as adapter_config.json holds it: PEFT writes its sets as lists."""
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in lc.to_dict().items()}


@SETTINGS
@given(target_case())
def test_is_targeted_matches_peft(case: tuple[dict[str, Any], str]) -> None:
    cfg, path = case
    lc = LoraConfig(**cfg)
    expected = bool(check_target_module_exists(lc, path))
    assert is_targeted(cfg, path) == expected
    assert is_targeted(saved_form(lc), path) == expected


def test_is_targeted_examples() -> None:
    # Fixed cases that matter for diagnose, each also checked against PEFT.
    cases = [
        ({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj", True),
        ({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.qq_proj", False),
        ({"target_modules": ["q_proj"], "layers_to_transform": [1]}, "model.layers.0.self_attn.q_proj", False),
        ({"target_modules": ["q_proj"], "layers_to_transform": [0]}, "model.layers.0.self_attn.q_proj", True),
        ({"target_modules": ["c_attn"], "layers_to_transform": 1, "layers_pattern": "h"},
         "transformer.h.1.attn.c_attn", True),
        ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, "model.layers.0.q_proj", False),
        ({"target_modules": r".*\.q_proj"}, "model.layers.0.q_proj", True),
        ({"target_modules": r"q_proj"}, "model.layers.0.q_proj", False),  # a regex must match the whole path
        ({"target_modules": ["score", "q_proj"], "modules_to_save": ["score"]}, "score", False),
    ]
    for cfg, path, want in cases:
        assert bool(check_target_module_exists(LoraConfig(**cfg), path)) is want, (cfg, path)
        assert is_targeted(cfg, path) is want, (cfg, path)

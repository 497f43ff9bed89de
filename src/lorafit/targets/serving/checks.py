"""Judges that several serving runtimes share: each takes a Context and returns (message, keys) or None.

A runtime's package composes them into Rules with its own source and release range; the wording here says
what the runtime does, the runtime's title is put in front by ServingRuntime.judge.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ...diagnose import plural
from . import Context, Verdict
from .traits import is_vision, layer_of

Judge = Callable[[Context], Verdict]


def rank_over(setting: str, error: str) -> Judge:
    """A module's rank above the runtime's limit `setting` (None: no limit set)."""

    def judge(ctx: Context) -> Verdict:
        limit = ctx.settings.get(setting)
        ranks = [ctx.traits.max_rank, ctx.traits.r, *(int(v) for v in ctx.traits.rank_pattern.values())]
        if limit is None or max(ranks) <= int(limit):
            return None
        return (f"rank {max(ranks)} is above --{setting.replace('_', '-')} {limit} and the adapter is refused "
                f"({error})", [])

    return judge


def dora(error: str) -> Judge:
    return lambda ctx: (f"DoRA is not supported ({error})", []) if ctx.traits.dora else None


def lora_bias(error: str) -> Judge:
    def judge(ctx: Context) -> Verdict:
        t = ctx.traits
        if not t.lora_bias and t.bias == "none":
            return None
        what = "lora_bias (lora_B.bias tensors)" if t.lora_bias else f"bias={t.bias!r}"
        return f"{what} is not supported ({error})", []

    return judge


def full_weights(error: str) -> Judge:
    """Saved full tensors: modules_to_save copies, or the embeddings PEFT saves after a vocabulary resize."""

    def judge(ctx: Context) -> Verdict:
        keys = ctx.traits.full_weights
        if not keys:
            return None
        return f"{plural(len(keys), 'full tensor')} besides lora_A/lora_B ({error})", keys

    return judge


ScaleRule = Callable[[Context, str], float]


def _trained(ctx: Context) -> dict[str, tuple[float, int]]:
    """module path (as saved, without base_model.model.) -> (the scaling it was trained with, its rank)."""
    return {m.path.removeprefix("base_model.model."): (m.scaling, m.rank)
            for m in ctx.adapter.modules.values() if m.kind != "param"}


def wrong_scale(applied: ScaleRule, ignores: str) -> Judge:
    """Modules whose scale the runtime computes differently from PEFT: `applied(ctx, module)` is what it uses."""

    def judge(ctx: Context) -> Verdict:
        off = [p for p, (s, _) in _trained(ctx).items() if not math.isclose(applied(ctx, p), s, rel_tol=1e-6)]
        if not off:
            return None
        p = off[0]
        present = {"use_rslora": ctx.traits.rslora, "rank_pattern": bool(ctx.traits.rank_pattern),
                   "alpha_pattern": bool(ctx.traits.alpha_pattern)}
        causes = [c for c, on in present.items() if on and c in ignores]  # what this runtime does not read
        return (f"applies scale {applied(ctx, p):.6g} where PEFT applies {_trained(ctx)[p][0]:.6g} on "
                f"{plural(len(off), 'module')}: it ignores {' and '.join(causes) or ignores}, so the adapter acts "
                "with the wrong strength and no error", off)

    return judge


def global_alpha_over_r(ctx: Context, path: str) -> float:
    return ctx.traits.alpha / ctx.traits.r


def global_scale(ctx: Context, path: str) -> float:
    """alpha/r, or alpha/sqrt(r) with use_rslora, from the global r and alpha (patterns ignored)."""
    return ctx.traits.global_scale


def tensor_rank_scale(ctx: Context, path: str) -> float:
    """llama.cpp: the global alpha over each tensor's own rank."""
    return ctx.traits.alpha / _trained(ctx)[path][1]


def vision_keys(what: str) -> Judge:
    def judge(ctx: Context) -> Verdict:
        keys = [p for p in ctx.traits.modules if is_vision(p)]
        if not keys or ctx.settings.get("enable_tower_connector_lora"):
            return None
        return f"{plural(len(keys), 'module')} of the vision tower or projector {what}", keys

    return judge


def unused_in_base(what: str) -> Judge:
    """Adapted modules whose saved path names no module of the base (as the runtime loads its checkpoint)."""

    def judge(ctx: Context) -> Verdict:
        base = ctx.base
        if base is None or not base.unused:
            return None
        return (f"{plural(len(base.unused), 'module')} of the adapter name no module of {base.class_name} and "
                f"{what}", base.unused)

    return judge


def unused_hint(ctx: Context) -> str | None:
    base = ctx.base
    if base is None:
        return None
    import shlex

    spec = ["--base", base.spec] if base.spec else []
    return shlex.join(["lorafit", "fix", str(ctx.adapter.path), *spec, "--class", base.class_name, "-o",
                       f"{ctx.adapter.path.name}-{base.class_name.lower()}"])


def outside_layers(what: str, allowed: tuple[str, ...] = ("embed_tokens", "lm_head")) -> Judge:
    """Adapted modules with no `layers.N.` in their path (other than `allowed` names)."""

    def judge(ctx: Context) -> Verdict:
        keys = [p for p in ctx.traits.modules if layer_of(p) is None and p.rsplit(".", 1)[-1] not in allowed]
        return (f"{plural(len(keys), 'module')} outside the decoder layers {what}", keys) if keys else None

    return judge

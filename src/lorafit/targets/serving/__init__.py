"""Serving runtimes: what vLLM, SGLang, llama.cpp, Ollama, LoRAX and mlx-lm do with an adapter.

None of them can run here (their wheels need CUDA, or they are servers), so each is its rules, read from its
own source: a Rule names the finding code, whether the runtime refuses the adapter ("will-not-load") or loads
it and applies something else ("not-as-trained"), the releases it holds for, and the file and function it
comes from (docs/runtimes.md quotes each). A serving runtime is a package under targets/ that calls
`register_serving` on import, plus its name in _BUILTIN. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ...errors import LorafitError
from ...findings import Finding
from .traits import Traits, traits_of

if TYPE_CHECKING:
    from ...adapter import Adapter

Effect = Literal["will-not-load", "not-as-trained"]
VERDICTS = {None: "loads", "not-as-trained": "loads, not as trained", "will-not-load": "will not load"}


@dataclass
class BaseView:
    """What a serving runtime's rules may know of the base (from lorafit's check against its saved class)."""

    model_type: str | None
    class_name: str
    unused: list[str]  # adapted module paths (as saved) that name no module of the base: matched by no key
    num_layers: int | None = None  # decoder layers of the base
    spec: str | None = None  # the base as the user named it (repeated in hints)
    kinds: dict[str, str] = field(default_factory=dict)  # adapted module path -> LoRA kind of the module it names


@dataclass
class Context:
    """One judgement: the adapter's traits, the runtime's settings, and the base when one was given."""

    adapter: Adapter
    traits: Traits
    settings: dict[str, Any]
    base: BaseView | None
    version: str


# A rule's judge returns None when the rule does not apply, else (message, example keys[, count]).
Verdict = tuple[str, list[str]] | None


@dataclass(frozen=True)
class Rule:
    code: str
    effect: Effect
    source: str  # "<file in the runtime's repository>: <function>", quoted in docs/runtimes.md
    judge: Callable[[Context], Verdict]
    hint: Callable[[Context], str | None] | None = None
    since: str | None = None  # first release it holds for (None: every known release)
    until: str | None = None  # first release it no longer holds for
    needs_base: bool = False
    formats: tuple[str, ...] = ()  # the adapter formats it judges (empty: all the runtime reads)


@dataclass(frozen=True)
class Setting:
    """A runtime setting, named as the runtime names it (vLLM's --max-lora-rank)."""

    name: str
    default: Any
    help: str


@dataclass
class ServingRuntime:
    name: str  # as given to --runtime
    title: str  # as the runtime calls itself
    versions: tuple[str, ...]  # the releases lorafit's rules were read from, oldest first
    rules: tuple[Rule, ...]
    settings: tuple[Setting, ...] = ()
    format_source: str = ""  # where the runtime reads its adapter files (for runtime-format)
    reads: tuple[str, ...] = ("peft",)  # the adapter formats the runtime loads

    @property
    def latest(self) -> str:
        return self.versions[-1]

    def settings_with(self, given: dict[str, Any]) -> dict[str, Any]:
        known = {s.name: s.default for s in self.settings}
        return known | {k: v for k, v in given.items() if k in known and v is not None}

    def judge(self, adapter: Adapter, version: str, settings: dict[str, Any], base: BaseView | None) -> list[Finding]:
        """Every rule that holds for `version`, on `adapter` (and `base` when given), as findings."""
        label = f"{self.name}@{version}"
        if adapter.format not in self.reads:
            return [Finding("runtime-format", f"{self.title} loads {' or '.join(self.reads)} adapters; this one is "
                            f"{adapter.format}", hint=convert_command(adapter, self.reads[0]),
                            runtime=label, source=self.format_source, effect="will-not-load")]
        ctx = Context(adapter, traits_of(adapter), self.settings_with(settings), base, version)
        out = []
        for rule in self.rules:
            if (not _holds(rule, version) or (rule.needs_base and base is None)
                    or (rule.formats and adapter.format not in rule.formats)):
                continue
            said = rule.judge(ctx)
            if said is None:
                continue
            message, keys = said
            hint = rule.hint(ctx) if rule.hint else None
            out.append(Finding(rule.code, f"{self.title}: {message}", keys, hint=hint, runtime=label,
                               source=rule.source, effect=rule.effect))
        return out


def convert_command(adapter: Adapter, to: str) -> str:
    """`lorafit convert` to `to`, output in the current directory (a GGUF file, or a directory)."""
    import shlex

    out = f"{adapter.path.name}.gguf" if to == "gguf" else f"{adapter.path.name}-{to}"
    base = ["--base", "MODEL"] if to == "gguf" and not adapter.base_model else []
    return shlex.join(["lorafit", "convert", str(adapter.path), "--to", to, *base, "-o", out])


def version_key(version: str) -> tuple[int, ...]:
    """'0.8.3' -> (0, 8, 3); llama.cpp's build tags 'b4600' -> (4600,). Raises ValueError if neither."""
    parts = version.removeprefix("b").split(".")
    return tuple(int(p) for p in parts)


def _holds(rule: Rule, version: str) -> bool:
    v = version_key(version)
    return ((rule.since is None or v >= version_key(rule.since))
            and (rule.until is None or v < version_key(rule.until)))


def verdict_of(findings: list[Finding]) -> str:
    """The worst effect among a runtime's error findings, in words."""
    effects = {f.effect for f in findings if f.severity == "error"}
    worst = "will-not-load" if "will-not-load" in effects else "not-as-trained" if effects else None
    return VERDICTS[worst]


_REGISTRY: dict[str, ServingRuntime] = {}
# runtime name -> the module under targets/ that registers it; imported on first use.
_BUILTIN = {"vllm": "vllm", "sglang": "sglang", "llama.cpp": "llamacpp", "ollama": "ollama", "lorax": "lorax",
            "mlx": "mlx"}


def register_serving(runtime: ServingRuntime) -> ServingRuntime:
    _REGISTRY[runtime.name] = runtime
    return runtime


def serving_runtimes() -> dict[str, ServingRuntime]:
    for name, module in _BUILTIN.items():
        if name not in _REGISTRY:
            importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.{module}")
    return _REGISTRY


def parse_spec(spec: str, known: list[str]) -> tuple[str, str | None]:
    """'vllm@0.8.3' -> ('vllm', '0.8.3'); the runtime must be one of `known`. Raises LorafitError otherwise."""
    name, _, version = spec.strip().partition("@")
    name = name.lower()
    if name not in known:
        raise LorafitError(f"unknown runtime {name!r}; known: {', '.join(known)}")
    return name, version or None


def resolve_version(runtime: ServingRuntime, version: str | None) -> str:
    """The release to judge for: `version` when lorafit knows its rules, else a LorafitError listing the known."""
    if version is None:
        return runtime.latest
    known = ", ".join(runtime.versions)
    try:
        v = version_key(version)
    except ValueError:
        raise LorafitError(f"{runtime.name} version {version!r} is not a release number; known: {known}") from None
    newest = version_key(runtime.latest)
    if v < version_key(runtime.versions[0]) or v[: len(newest)] > newest:
        raise LorafitError(f"lorafit does not know the rules of {runtime.name} {version}; known: {known}")
    return version

"""Find the target: a local model dir or cached hub id, the class the user will load it with, and its tree.

Offline always: a hub id resolves only through the local HF cache.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import LorafitError, ModelNotFoundError, UnknownClassError
from ...fileio.hub import cached_snapshot, looks_like_repo_id
from ...fileio.inputs import parse_json, read_bytes
from ...findings import Finding
from ...tree import ModuleTree
from .. import TargetRefused
from .module_tree import TASK_TO_AUTO, tree_from_module

# No real model has more: the largest have ~130 layers. Beyond this a tree would cost minutes and gigabytes.
MAX_LAYERS = 4096
_LAYER_COUNT = re.compile(r"(num_|n_)?(hidden_|encoder_|decoder_|text_|vision_)?layers?")


class CustomCodeRequired(TargetRefused):
    """The base's model type exists only as custom code (auto_map); lorafit never runs it. `finding` says so."""


@dataclass(frozen=True)
class ModelDir:
    """A base model directory and its config.json, read once: raw bytes (the tree cache's key) and parsed."""

    path: Path
    raw: bytes
    config: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)  # from_pretrained(..., **overrides), e.g. num_labels

    def with_overrides(self, overrides: dict[str, Any] | None) -> ModelDir:
        """This base as `from_pretrained(path, **overrides)` loads it: the config the tree is built from, and a
        cache key that tells it from the plain config."""
        if not overrides:
            return self
        config = overridden_config(self.config, overrides)
        raw = self.raw + b"\n# from_pretrained overrides: " + json.dumps(overrides, sort_keys=True).encode()
        return ModelDir(self.path, raw, config, dict(overrides))


def overridden_config(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """config.json as `from_pretrained(..., **overrides)` leaves it: num_labels also resets id2label/label2id."""
    out = dict(config) | overrides
    if "num_labels" in overrides and "id2label" not in overrides:  # as PretrainedConfig.num_labels does
        n = int(overrides["num_labels"])
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(n)}
        out.pop("num_labels", None)  # transformers keeps the count in id2label only
    return out


def open_model_dir(model: str | Path) -> ModelDir:
    """Resolve `model` (see resolve_model_dir) and read its config.json once, under lorafit's budgets.

    Raises:
        ModelNotFoundError, LorafitError: as resolve_model_dir and read_model_config.
    """
    path = resolve_model_dir(model)
    raw = read_bytes(path / "config.json")
    return ModelDir(path, raw, _parse_model_config(raw, path / "config.json"))


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """config.json as JSON, under lorafit's budgets (regular file, size, depth, layer counts).

    Raises:
        LorafitError: not readable, not a JSON object, or a layer count no model has.
    """
    path = model_dir / "config.json"
    return _parse_model_config(read_bytes(path), path)


def _parse_model_config(raw: bytes, path: Path) -> dict[str, Any]:
    config = parse_json(raw, path, LorafitError)
    if not isinstance(config, dict):
        raise LorafitError("is not a JSON object", path)
    stack: list[dict[str, Any]] = [config]
    while stack:
        d = stack.pop()
        for k, v in d.items():
            if isinstance(v, dict):
                stack.append(v)
            elif _LAYER_COUNT.fullmatch(k) and isinstance(v, int) and v > MAX_LAYERS:
                raise LorafitError(f"{k}={v} is beyond any real model (lorafit handles up to {MAX_LAYERS} layers)",
                                   path)
    return config


def custom_code_finding(model_dir: Path, config: dict[str, Any]) -> Finding | None:
    """A finding when config.json names custom code (auto_map); None when it names none.

    Raises:
        CustomCodeRequired: the model type is not one transformers knows, so only that code defines the model.
    """
    auto_map = config.get("auto_map")
    if not auto_map:
        return None
    names = sorted({str(v).split(".")[0] + ".py" for v in (auto_map.values() if isinstance(auto_map, dict) else [])
                    for v in (v if isinstance(v, list) else [v]) if v})
    files = ", ".join(names) or "custom code"
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not _built_in(model_type):
        raise CustomCodeRequired(Finding(
            "custom-code-required", f"model type {model_type!r} is defined only by custom code ({files}, via "
            "auto_map); lorafit never runs code from a model directory (trust_remote_code=False), so it cannot "
            "build this model's module tree", hint="check against a model directory of a built-in transformers "
            "architecture, or load the model yourself and call lorafit.check(adapter, model)"), model_dir)
    return Finding("custom-code", f"config.json names custom code ({files}, via auto_map), which lorafit never runs; "
                   f"the module tree is transformers' built-in {model_type!r} class, which the custom code may change")


def quantized_base_finding(config: dict[str, Any]) -> Finding | None:
    """A note when config.json carries a quantization_config: lorafit's tree is the model before quantizing."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    named = f" ({method})" if isinstance(method, str) else ""
    return Finding("quantized-base", f"config.json has a quantization_config{named}: lorafit judges the module tree "
                   "transformers builds before quantizing, which is the model loaded dequantized; loaded quantized, "
                   "the quantizer swaps in its own layer classes at the same paths, and LoRA lands only on those "
                   "PEFT supports for that method (merge needs float weights)")


def unloaded_weights_finding(md: ModelDir, tree: ModuleTree) -> Finding | None:
    """For a class built from part of a composite config (a VLM's text-only class): a finding when
    from_pretrained would find none of its weights in this checkpoint and leave them at random init.

    MllamaForCausalLM finds an mllama checkpoint's `language_model.model.*` under its base_model_prefix;
    Gemma3ForCausalLM looks for `model.*` and finds nothing in a gemma3 one. None when the checkpoint holds
    every parameter, when it has no readable safetensors, or when the class is of the checkpoint's own type.
    """
    if tree.model_type == md.config.get("model_type"):
        return None
    from ...fileio.checkpoint import Checkpoint

    try:
        with Checkpoint.open(md.path) as ckpt:
            keys = set(ckpt.tensors)
    except LorafitError:
        return None  # no safetensors here: nothing to compare (merge and verify read the weights themselves)
    names = tree.parameter_names()
    absent = [n for n in names if not any(c in keys for c in tree.stored_names(n))]
    if not absent:
        return None
    archs = md.config.get("architectures")
    saved = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    tail = ".".join(absent[0].split(".")[-2:])
    stored = sorted(k for k in keys if k.endswith(tail))[:1]
    where = f" (it stores e.g. {stored[0]})" if stored else ""
    return Finding("weights-not-loaded", f"{tree.class_name}.from_pretrained finds {len(names) - len(absent)} of "
                   f"{len(names)} of its parameters in this {md.config.get('model_type')} checkpoint{where}: "
                   f"transformers leaves the other {len(absent)} at random init, with only a warning, so the "
                   "model is not the base the adapter was trained on", absent,
                   hint=f"load the base with {saved} (--class {saved})" if saved else None)


def _built_in(model_type: str) -> bool:
    """Whether transformers itself defines the model type: a shipped blueprint says so without importing it."""
    from . import tree_cache
    from .blueprint import installed_transformers, shipped_model_types

    if model_type in shipped_model_types():
        return True
    tv = installed_transformers()
    # Else transformers' own table (importing it costs ~2 s); a yes is kept in the tree cache for the next check.
    known = f"built-in.{tv}.{model_type}.json"
    if tree_cache.read_document(known) is True:
        return True
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type in CONFIG_MAPPING_NAMES:
        tree_cache.write_document(known, True)
        return True
    return False


# What each use of a base reads, and how to fetch just that into the HF cache.
NEEDS = {"config": ("config.json", "config.json"),
         "weights": ("its weights", '--include "*.json" "*.safetensors"')}


def resolve_model_dir(model: str | Path, revision: str | None = None, needs: str = "config") -> Path:
    """A local directory with config.json, or the cached snapshot of a hub id (at `revision`, if given).

    `needs` is what the caller reads ("config" or "weights"): the message for a base that is not here says exactly
    which files to fetch, and a snapshot without weights is refused when weights are needed.

    Raises:
        ModelNotFoundError: neither exists, or the snapshot lacks what is needed; the message says what to fetch.
    """
    p = Path(model).expanduser()
    try:
        is_dir, exists = p.is_dir(), p.exists()
    except OSError as e:  # a name too long for the OS, ...
        raise ModelNotFoundError(f"cannot be looked up ({e.strerror or e})", p) from None
    if (is_dir or exists) and revision is not None:
        raise ModelNotFoundError("--revision applies to a hub id in the HF cache, not to a local directory", p)
    if is_dir:
        if not (p / "config.json").exists():
            raise ModelNotFoundError("config.json is missing: this is not a transformers model directory", p)
        return _with_weights(p, needs, None)
    if exists:
        raise ModelNotFoundError("is a file; pass the model directory that holds config.json", p)
    at = f" --revision {revision}" if revision else ""
    what, files = NEEDS[needs]
    snap = cached_snapshot(str(model), revision)
    if snap is not None and (snap / "config.json").exists():
        return _with_weights(snap, needs, f"hf download {model} {files}{at}")
    where = f" at revision {revision}" if revision else ""
    fetch = (f"This command reads {what}: fetch it into the HF cache with `hf download {model} {files}{at}`, or pass "
             "a local directory" if looks_like_repo_id(str(model)) else "Pass a local directory")
    raise ModelNotFoundError(f"base model not found locally{where}, and lorafit never downloads. {fetch} (one "
                             "written by save_pretrained)", model)


def _with_weights(path: Path, needs: str, fetch: str | None) -> Path:
    """`path`, when it holds what `needs` asks for; a config-only snapshot cannot be loaded or merged."""
    if needs == "weights" and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        how = f": fetch them with `{fetch}`" if fetch else ""
        raise ModelNotFoundError(f"holds config.json but no weights (*.safetensors){how}", path)
    return path


def load_config(model_dir: Path, checked: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
                ) -> Any:
    """The model's transformers config, read offline. Raises LorafitError if transformers cannot read it.

    `checked` is config.json as read_model_config returned it, when the caller has it already; `overrides` are the
    config kwargs of from_pretrained (num_labels=3), applied as transformers applies them.
    """
    from transformers import AutoConfig

    # Budgets and custom code before transformers reads anything.
    custom_code_finding(model_dir, checked if checked is not None else read_model_config(model_dir))
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False,
                                          **(overrides or {}))
    except Exception as e:
        raise LorafitError(f"config.json cannot be read by transformers ({str(e).splitlines()[0][:200]})",
                           model_dir / "config.json") from None


def default_class_name(task_type: str | None) -> str:
    """The Auto class that an adapter's task_type implies (AutoModel when it names none)."""
    return TASK_TO_AUTO.get(task_type or "", "AutoModel")


def resolve_class(name: str, config: Any, model_dir: Path | None = None) -> type:
    """Turn a class name (an Auto class or a concrete one) into the concrete class for this config.

    Raises:
        UnknownClassError: not a transformers model class, or the Auto class has no entry for this model type.
    """
    import transformers

    obj = getattr(transformers, name, None) if name.isidentifier() else None
    if obj is None or not isinstance(obj, type):
        candidates = [n for n in dir(transformers) if n.startswith(("AutoModel", name[:4]))]
        close = difflib.get_close_matches(name, candidates, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; use an Auto class such as AutoModelForCausalLM"
        raise UnknownClassError(f"unknown model class {name!r}{hint}")
    if name.startswith("AutoModel"):
        mapping = getattr(obj, "_model_mapping", None)
        try:
            return mapping[type(config)] if mapping is not None else obj
        except KeyError:
            raise UnknownClassError(
                f"{name} has no class for model type {config.model_type!r}; pass a concrete class with --class",
                model_dir / "config.json" if model_dir else None) from None
    from transformers import PreTrainedModel

    if not issubclass(obj, PreTrainedModel):
        raise UnknownClassError(f"{name!r} is not a transformers model class")
    wants = getattr(obj, "config_class", None)
    if isinstance(wants, type) and not isinstance(config, wants) and sub_config(config, wants) is None:
        raise UnknownClassError(f"{name} is a {getattr(wants, 'model_type', wants.__name__)!r} class, but the base "
                                f"model is {config.model_type!r}; pass an Auto class or a {config.model_type} class",
                                model_dir / "config.json" if model_dir else None)
    return obj


def sub_config(config: Any, wants: type) -> Any:
    """The part of a composite config (a VLM's text_config) that is a `wants`, as from_pretrained extracts it; or None.

    A text-only class of a VLM checkpoint (MllamaForCausalLM on an mllama checkpoint) reads its own config
    from the composite one; transformers' from_pretrained does the same.
    """
    for name in getattr(config, "sub_configs", None) or {}:
        part = getattr(config, name, None)
        if isinstance(part, wants):
            return part
    return None


def class_config(cls: type, config: Any) -> Any:
    """The config `cls` is built with: `config`, or the sub-config of its kind (a VLM's text_config)."""
    wants = getattr(cls, "config_class", None)
    if isinstance(wants, type) and not isinstance(config, wants):
        return sub_config(config, wants) or config
    return config


def build_meta_model(cls: type, config: Any, model_dir: Path | None = None) -> Any:
    """Instantiate `cls` on the meta device: every parameter has a shape and no storage.

    Raises:
        LorafitError: transformers cannot build the class from this config (an unknown activation, a zero
            head count, ...); the message names config.json and transformers' own error.
    """
    import torch

    config = class_config(cls, config)
    try:
        with torch.device("meta"):
            if hasattr(cls, "_from_config"):
                return cls._from_config(config)
            return cls(config)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        where = model_dir / "config.json" if model_dir is not None else None
        raise LorafitError(f"transformers cannot build {cls.__name__} from this config ({type(e).__name__}: "
                           f"{first})", where) from None


def tree_from_pretrained(model: str | Path | ModelDir, class_name: str, source: str | None = None) -> ModuleTree:
    """Build the ModuleTree of `class_name` for a local or cached model (or a ModelDir already read).

    Tried in order: the tree cache, a blueprint (both need neither torch nor transformers), and the
    meta-device build. No weight is read. Raises ModelNotFoundError, UnknownClassError, LorafitError.
    """
    from . import tree_cache

    md = model if isinstance(model, ModelDir) else open_model_dir(model)
    source = source or (str(model) if not isinstance(model, ModelDir) else str(md.path))
    name = class_name
    custom_code_finding(md.path, md.config)  # raises before anything could run its code
    key = tree_cache.cache_key(md.raw, name)
    cached = tree_cache.load(key)
    if cached is not None:
        cached.source, cached.origin = source, "cache"
        return cached
    drawn = _from_blueprint(md.config, name, source)
    if drawn is not None:
        return drawn
    config = load_config(md.path, md.config, md.overrides)
    cls = resolve_class(name, config, md.path)
    tree = tree_from_module(build_meta_model(cls, config, md.path), source=source)
    tree.origin = "meta"
    tree_cache.store(key, tree)
    return tree


def _from_blueprint(config: dict[str, Any], class_name: str, source: str) -> ModuleTree | None:
    """The tree from a shipped blueprint, without importing torch or transformers; None if none covers it."""
    from .blueprint import tree_from_blueprint

    try:
        return tree_from_blueprint(config, class_name, source)
    except (KeyError, TypeError, ValueError, IndexError, ArithmeticError):
        return None  # a damaged blueprint file: the meta build is always right


def saved_class(model_dir: Path) -> str | None:
    """The class the checkpoint was saved with (config.architectures[0]): its module paths are the tensor names."""
    archs = read_model_config(model_dir).get("architectures")
    if archs is None:
        return None
    if not isinstance(archs, list) or not all(isinstance(a, str) and a.isidentifier() for a in archs):
        raise LorafitError(f"architectures must be a list of class names, got {str(archs)[:80]}",
                           model_dir / "config.json")
    return archs[0] if archs else None

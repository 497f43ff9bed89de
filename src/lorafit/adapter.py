"""Adapter, LoraModule and Entry: a LoRA adapter as format-neutral data, and what it wants to land.

A format's reader (formats/) groups a checkpoint's keys by module path into one LoraModule each (A, B and,
where present, bias and the DoRA magnitude); every other tensor (modules_to_save copies, saved embedding
layers) is kept as an ExtraTensor. Only headers are read up front; data is read on demand through
`Adapter.tensor`. Nothing here knows a format's key names or config fields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import AdapterFormatError
from .tensor_info import TensorInfo

if TYPE_CHECKING:
    import torch

# What a LoRA module adapts: Linear and Conv1D alike ("linear": the tensors cannot tell them apart), an
# Embedding, a convolution, or one parameter of a module ("param": fused MoE experts, PEFT's target_parameters).
LoraKind = Literal["linear", "embedding", "conv", "param"]
# What an alignment entry is: a LoRA module, or a saved tensor that replaces a parameter.
EntryKind = Literal["linear", "embedding", "conv", "param", "tensor"]
# Why a saved tensor that is not a LoRA factor is there.
ExtraKind = Literal["modules_to_save", "embedding_base", "trainable_tokens", "other"]


@dataclass
class LoraModule:
    """One adapted module: its path in the saved layout, tensor keys by role, and the resolved hyper-parameters.

    kind is "linear" (Linear and Conv1D alike: the adapter cannot tell them apart), "embedding" or "conv".
    in_features/out_features are those of the base layer as the LoRA tensors imply them.

    A "param" module adapts one parameter of the module at `path` minus `wrapper`; several on one module are
    nested wrappers, `depth` 0 the outermost. Which parameter it is follows from the target module (the
    `depth`-th targeted one from the last), so r, alpha and scaling are given per candidate in `per_param`,
    and `rank` is the rows of A: r times the number of experts.
    """

    path: str
    kind: LoraKind
    keys: dict[str, str]
    rank: int
    in_features: int
    out_features: int
    alpha: float = 0.0
    scaling: float = 0.0
    config_rank: int = 0
    rank_b: int | None = None  # the rank lora_B's shape implies, when the reader sees it (else taken as `rank`)
    depth: int = 0  # kind "param": how deep in the nest of parameter wrappers
    wrapper: str = ""  # kind "param": the end of `path` that names the format's nested wrappers
    per_param: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # param -> (r, alpha, scaling)

    @property
    def has_dora(self) -> bool:
        return "magnitude" in self.keys

    @property
    def has_bias(self) -> bool:
        return "bias" in self.keys


@dataclass
class ExtraTensor:
    """A saved tensor that is not a LoRA factor: a modules_to_save copy or a saved (resized) embedding layer.

    `module` is the module path it belongs to and `param` the parameter name (weight, bias).
    """

    key: str
    module: str
    param: str
    info: TensorInfo
    kind: ExtraKind
    wrapper: str = ""  # the end of `module` that names the format's wrapper, not a module of the model


@dataclass
class Adapter:
    """A LoRA adapter in any format: its config as saved, tensor headers, and LoraModules; data read on demand.

    `config` is the format's own config (PEFT's adapter_config.json); everything lorafit's core needs from it
    is resolved by the format's reader into the fields below, so the core never reads a format's fields.
    """

    path: Path
    weights_path: Path
    config: dict[str, Any]
    infos: dict[str, TensorInfo]
    format: str  # the registered name of the format that read it (and writes it back)
    task_type: str | None = None  # the kind of model it was trained as (PEFT's task_type names)
    base_model: str | None = None  # the base it names, if any
    init_b_zero: bool = True  # a module left without tensors keeps B = 0 (PEFT: unless init_lora_weights=false)
    metadata: dict[str, str] = field(default_factory=dict)
    modules: dict[str, LoraModule] = field(default_factory=dict)
    extras: list[ExtraTensor] = field(default_factory=list)
    # Keys outside the format's key root (PEFT: without `base_model.model.`): its stock loader never matches them.
    unrooted_keys: list[str] = field(default_factory=list)
    incomplete: dict[str, list[str]] = field(default_factory=dict)  # module path -> roles present without A or B
    # The format's tensor reader: key -> the tensors that one read yields (one, or the whole file).
    load: Callable[[str], Mapping[str, torch.Tensor]] | None = field(default=None, repr=False)
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # What is computed from all of the data, once per read adapter (formats/health.py: its tensor health).
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def tensor(self, key: str) -> torch.Tensor:
        """Read one tensor's data (cached). Raises AdapterFormatError if the file cannot be read."""
        if key not in self._cache:
            if self.load is None or key not in self.infos:
                raise AdapterFormatError(f"holds no tensor {key!r}", self.weights_path)
            self._cache.update(self.load(key))
        return self._cache[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors, keyed as in the file."""
        return {k: self.tensor(k) for k in self.infos}

    def module_keys(self) -> list[str]:
        """Every key that belongs to a LoraModule."""
        return [k for m in self.modules.values() for k in m.keys.values()]


@dataclass(frozen=True)
class Entry:
    """One thing the adapter wants to land: a LoRA module (kind linear/embedding/conv) or a saved tensor."""

    path: str  # module path in the adapter's layout
    kind: EntryKind
    in_features: int | None = None
    out_features: int | None = None
    param: str | None = None  # for kind "tensor": parameter name and shape
    shape: tuple[int, ...] | None = None
    key: str | None = None  # for kind "tensor": the checkpoint key
    rooted: bool = True  # under the format's key root: the stock loader matches nothing else
    wrapper: str = ""  # the end of `path` that names the format's wrapper of the module
    rank: int | None = None  # kind "param": the rows of A (r times the experts)
    depth: int = 0  # kind "param": see LoraModule
    params: tuple[str, ...] = ()  # kind "param": the parameter names it may adapt


def entries_of(adapter: Adapter) -> list[Entry]:
    """What the adapter wants to land, as plain alignment entries: LoRA modules, then saved tensors."""
    unrooted = set(adapter.unrooted_keys)
    out = [Entry(m.path, m.kind, m.in_features, m.out_features, rooted=not unrooted.intersection(m.keys.values()),
                 wrapper=m.wrapper, rank=m.rank, depth=m.depth, params=tuple(m.per_param))
           for m in adapter.modules.values()]
    out += [Entry(x.module, "tensor", param=x.param, shape=x.info.shape, key=x.key, rooted=x.key not in unrooted,
                  wrapper=x.wrapper) for x in adapter.extras]
    return out

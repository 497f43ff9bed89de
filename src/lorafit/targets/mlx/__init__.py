"""mlx-lm: `mlx_lm.generate --adapter-path` / mlx_lm.tuner.utils.load_adapters. Sources: docs/runtimes.md#mlx."""

from __future__ import annotations

from ..serving import Rule, ServingRuntime, checks, register_serving

_LOAD = "mlx_lm/tuner/utils.py: load_adapters"

RULES = (
    Rule("runtime-keys-unused", "not-as-trained", _LOAD,
         checks.unused_in_base("are silently ignored (load_weights with strict=False)"), needs_base=True,
         until="0.32.0"),
    Rule("runtime-keys-unused", "will-not-load", _LOAD,
         checks.unused_in_base("are refused: ValueError 'Adapter at … contains incompatible tensors'"),
         needs_base=True, since="0.32.0"),
)

register_serving(ServingRuntime("mlx", "mlx-lm", ("0.20.0", "0.32.2"), RULES, reads=("mlx",),
                                format_source=f"{_LOAD} (AttributeError: no attribute 'num_layers')"))

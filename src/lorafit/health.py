"""Tensor health of an adapter: all-zero lora_B, NaN and Inf. The only part of inspect that reads data."""

from __future__ import annotations

from dataclasses import dataclass, field

from .adapter import Adapter


@dataclass
class Health:
    zero_b: list[str] = field(default_factory=list)  # module paths whose lora_B is all zero
    non_finite: dict[str, str] = field(default_factory=dict)  # key -> "NaN" / "Inf" / "NaN+Inf"
    parameters: int = 0


def tensor_health(adapter: Adapter) -> Health:
    """Read every adapter tensor once and record zeros and non-finite values. A NaN is a finding, not a crash."""
    import torch

    h = Health()
    for key, info in adapter.infos.items():
        h.parameters += info.numel
        t = adapter.tensor(key)
        if t.is_floating_point():
            nan, inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
            if nan or inf:
                h.non_finite[key] = "+".join(n for n, bad in (("NaN", nan), ("Inf", inf)) if bad)
    for m in adapter.modules.values():
        if not adapter.tensor(m.keys["B"]).any():
            h.zero_b.append(m.path)
    return h

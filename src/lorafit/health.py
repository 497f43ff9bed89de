"""Tensor health of an adapter: all-zero lora_B, NaN and Inf. The only part of inspect that reads data.

Safetensors data is read as raw bits with numpy, so inspect and check never import torch for it (torch
costs ~2.5 s on the CLI). Floats are judged by their bit patterns: exponent all ones is Inf or NaN,
and a value is zero when every bit but the sign is zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .adapter import Adapter
from .errors import AdapterFormatError

# dtype code -> (unsigned view, exponent mask, mantissa mask)
_FLOAT_BITS = {
    "F16": ("<u2", 0x7C00, 0x03FF),
    "BF16": ("<u2", 0x7F80, 0x007F),
    "F32": ("<u4", 0x7F800000, 0x007FFFFF),
    "F64": ("<u8", 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
}


@dataclass
class Health:
    zero_b: list[str] = field(default_factory=list)  # module paths whose lora_B is all zero
    non_finite: dict[str, str] = field(default_factory=dict)  # key -> "NaN" / "Inf" / "NaN+Inf"
    parameters: int = 0


@dataclass
class _Bits:
    zero: bool
    nan: bool
    inf: bool


def _raw_bits(adapter: Adapter, key: str, want_zero: bool) -> _Bits | None:
    """Judge one safetensors tensor from its raw bytes; None for dtypes this does not cover.

    Few passes over the data (a 70B adapter is ~400 MB): one for "any exponent all ones", one for
    "any non-zero magnitude" (lora_B only); NaN is told from Inf only when a special value exists.
    """
    import numpy as np

    info = adapter.infos[key]
    if info.dtype not in _FLOAT_BITS or info.offset is None:
        return None
    view, exp, mant = _FLOAT_BITS[info.dtype]
    with open(adapter.weights_path, "rb") as f:
        f.seek(info.offset)
        raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise AdapterFormatError(f"truncated: tensor {key!r} is cut short", adapter.weights_path)
    bits = np.frombuffer(raw, dtype=view)
    kind = np.dtype(view).type
    e_mask, m_mask = kind(exp), kind(mant)
    special = np.bitwise_and(bits, e_mask) == e_mask
    nan = inf = False
    if special.any():
        has_mant = np.bitwise_and(bits[special], m_mask) != 0
        nan, inf = bool(has_mant.any()), bool((~has_mant).any())
    zero = want_zero and not np.bitwise_and(bits, kind(exp | mant)).any()
    return _Bits(zero=zero, nan=nan, inf=inf)


def _torch_bits(adapter: Adapter, key: str) -> _Bits:
    import torch

    t = adapter.tensor(key)
    if not t.is_floating_point():
        return _Bits(zero=not t.any(), nan=False, inf=False)
    return _Bits(zero=not t.any(), nan=bool(torch.isnan(t).any()), inf=bool(torch.isinf(t).any()))


def tensor_health(adapter: Adapter) -> Health:
    """Read every adapter tensor once and record zeros and non-finite values. A NaN is a finding, not a crash.

    Two threads share the scan (numpy releases the GIL): a 70B adapter holds ~0.5 GB of tensors.
    """
    from concurrent.futures import ThreadPoolExecutor

    h = Health(parameters=sum(info.numel for info in adapter.infos.values()))
    b_keys = {m.keys["B"] for m in adapter.modules.values()}

    def judge(key: str) -> _Bits:
        b = _raw_bits(adapter, key, key in b_keys) if adapter.weights_path.suffix == ".safetensors" else None
        return b if b is not None else _torch_bits(adapter, key)

    if adapter.weights_path.suffix == ".safetensors":
        with ThreadPoolExecutor(max_workers=2) as pool:
            bits = dict(zip(adapter.infos, pool.map(judge, adapter.infos), strict=True))
    else:
        bits = {key: judge(key) for key in adapter.infos}
    for key in adapter.infos:
        if bits[key].nan or bits[key].inf:
            h.non_finite[key] = "+".join(n for n, bad in (("NaN", bits[key].nan), ("Inf", bits[key].inf)) if bad)
    h.zero_b = [m.path for m in adapter.modules.values() if bits[m.keys["B"]].zero]
    return h

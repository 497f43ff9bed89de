"""Tensor health of an adapter: all-zero lora_B, NaN and Inf. The only part of inspect that reads data.

Safetensors data is read as raw bits with numpy, so inspect and check never import torch for it (torch
costs ~2.5 s on the CLI). Floats are judged by their bit patterns: exponent all ones is Inf or NaN,
and a value is zero when every bit but the sign is zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..adapter import Adapter
from ..diagnose import Health
from ..errors import AdapterFormatError
from ..fileio.inputs import open_regular, read_into

# dtype code -> (unsigned view, exponent mask, mantissa mask)
_FLOAT_BITS = {
    "F16": ("<u2", 0x7C00, 0x03FF),
    "BF16": ("<u2", 0x7F80, 0x007F),
    "F32": ("<u4", 0x7F800000, 0x007FFFFF),
    "F64": ("<u8", 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
}


@dataclass
class _Bits:
    zero: bool
    nan: bool
    inf: bool


def _raw_bits(adapter: Adapter, key: str, fd: int, buf: bytearray) -> _Bits | None:
    """Judge one safetensors tensor from its raw bytes; None for dtypes this does not cover.

    One read and one pass over the data (a 70B adapter is ~400 MB): the largest magnitude bit pattern
    (sign cleared) is 0 exactly when every value is zero, and reaches the exponent mask exactly when
    some value is Inf or NaN. Only then is NaN told from Inf, on the special values alone.
    """
    import numpy as np

    info = adapter.infos[key]
    if info.dtype not in _FLOAT_BITS or info.offset is None:
        return None
    view, exp, mant = _FLOAT_BITS[info.dtype]
    n = info.nbytes
    if n == 0:
        return _Bits(zero=True, nan=False, inf=False)
    read_into(fd, memoryview(buf)[:n], info.offset, adapter.weights_path, AdapterFormatError)
    bits = np.frombuffer(buf, dtype=view, count=n // np.dtype(view).itemsize)
    kind = np.dtype(view).type
    e_mask = kind(exp)
    np.bitwise_and(bits, kind(exp | mant), out=bits)  # in place: buf is this thread's scratch
    top = bits.max()
    nan = inf = False
    if top >= e_mask:
        special = bits[bits >= e_mask]
        nan, inf = bool((special > e_mask).any()), bool((special == e_mask).any())
    return _Bits(zero=bool(top == 0), nan=nan, inf=inf)


def _torch_bits(adapter: Adapter, key: str) -> _Bits:
    import torch

    t = adapter.tensor(key)
    if not t.is_floating_point():
        return _Bits(zero=not t.any(), nan=False, inf=False)
    return _Bits(zero=not t.any(), nan=bool(torch.isnan(t).any()), inf=bool(torch.isinf(t).any()))


def tensor_health(adapter: Adapter) -> Health:
    """Read every adapter tensor once and record zeros and non-finite values. A NaN is a finding, not a crash."""
    h = Health(parameters=sum(info.numel for info in adapter.infos.values()))
    if adapter.weights_path.suffix == ".safetensors":
        bits = _scan_safetensors(adapter)
    else:
        bits = {key: _torch_bits(adapter, key) for key in adapter.infos}
    for key in adapter.infos:
        if bits[key].nan or bits[key].inf:
            h.non_finite[key] = "+".join(n for n, bad in (("NaN", bits[key].nan), ("Inf", bits[key].inf)) if bad)
    h.zero_b = [m.path for m in adapter.modules.values() if bits[m.keys["B"]].zero]
    return h


def _scan_safetensors(adapter: Adapter) -> dict[str, _Bits]:
    """Judge every tensor; two threads each take every other tensor (numpy and preadv release the GIL).

    Each thread reads into one scratch buffer sized for its largest tensor, so the scan touches no fresh
    pages per tensor and its memory stays at two tensors, not the adapter.
    """
    from concurrent.futures import ThreadPoolExecutor

    keys = list(adapter.infos)
    shares = [keys[i::2] for i in range(2)]

    def scan(share: list[str]) -> dict[str, _Bits]:
        buf = bytearray(max((adapter.infos[k].nbytes for k in share), default=0))
        fd = open_regular(adapter.weights_path, AdapterFormatError)
        try:
            out = {}
            for key in share:
                b = _raw_bits(adapter, key, fd, buf)
                out[key] = b if b is not None else _torch_bits(adapter, key)
            return out
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(scan, shares))
    return {k: v for part in results for k, v in part.items()}

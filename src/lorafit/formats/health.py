"""Tensor health of an adapter: all-zero lora_B, NaN and Inf. The only part of inspect that reads data.

Safetensors data is read as raw bits with numpy, so inspect and check never import torch for it (torch
costs ~2.5 s on the CLI). Floats are judged by their bit patterns: exponent all ones is Inf or NaN,
and a value is zero when every bit but the sign is zero.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

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
    """Judge one safetensors tensor from its raw bytes; None for dtypes this does not cover."""
    info = adapter.infos[key]
    if info.dtype not in _FLOAT_BITS or info.offset is None:
        return None
    read_into(fd, memoryview(buf)[:info.nbytes], info.offset, adapter.weights_path, AdapterFormatError)
    return _judge_bits(buf, info.nbytes, info.dtype)


def _judge_bits(buf: bytearray, n: int, dtype: str) -> _Bits:
    """Judge the first `n` bytes of `buf` as floats of `dtype` (one of _FLOAT_BITS); `buf` is overwritten.

    One pass over the data (a 70B adapter is ~400 MB): the largest magnitude bit pattern (sign cleared) is 0
    exactly when every value is zero, and reaches the exponent mask exactly when some value is Inf or NaN. Only
    then is NaN told from Inf, on the special values alone.
    """
    import numpy as np

    view, exp, mant = _FLOAT_BITS[dtype]
    if n == 0:
        return _Bits(zero=True, nan=False, inf=False)
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
    """Read every adapter tensor once and record zeros and non-finite values. A NaN is a finding, not a crash.

    Computed once per read adapter (kept in adapter.memo), whichever command asks first."""
    if "health" not in adapter.memo:
        bits = _scan_safetensors(adapter) if adapter.weights_path.suffix == ".safetensors" else None
        adapter.memo["health"] = _health(adapter, bits or {k: _torch_bits(adapter, k) for k in adapter.infos})
    health: Health = adapter.memo["health"]
    return health


def health_and_digest(adapter: Adapter) -> tuple[Health, str]:
    """Tensor health and the SHA-256 of the weights file, from one sequential read of it (a fleet scan keys its
    cache on content: reading each byte once for both is most of its speed). The health is memoized as
    tensor_health's is."""
    bits: dict[str, _Bits] | None = None
    if adapter.weights_path.suffix == ".safetensors":
        bits, digest = _digest_safetensors(adapter)
    if bits is None:  # not safetensors, or a layout a sequential pass does not cover: two reads
        with open(adapter.weights_path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        return tensor_health(adapter), digest
    adapter.memo.setdefault("health", _health(adapter, bits))
    return adapter.memo["health"], digest


def _health(adapter: Adapter, bits: dict[str, _Bits]) -> Health:
    h = Health(parameters=sum(info.numel for info in adapter.infos.values()))
    for key in adapter.infos:
        if bits[key].nan or bits[key].inf:
            h.non_finite[key] = "+".join(n for n, bad in (("NaN", bits[key].nan), ("Inf", bits[key].inf)) if bad)
    h.zero_b = [m.path for m in adapter.modules.values() if bits[m.keys["B"]].zero]
    return h


_CHUNK = 1 << 20  # bytes between tensors (the header, padding) are hashed in reads of at most this


def _digest_safetensors(adapter: Adapter) -> tuple[dict[str, _Bits] | None, str]:
    """Every byte of the file in order, hashed; each tensor judged from the same read. (None, "") when tensors
    overlap or lack offsets (the header reader refuses neither for every format): then the caller reads twice."""
    spans = sorted((info.offset, info.nbytes, key) for key, info in adapter.infos.items() if info.offset is not None)
    if len(spans) < len(adapter.infos) or any(a[0] + a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        return None, ""
    h = hashlib.sha256()
    buf = bytearray(max([_CHUNK] + [n for _, n, _ in spans]))
    out: dict[str, _Bits] = {}
    fd = open_regular(adapter.weights_path, AdapterFormatError)
    try:
        pos = 0
        for offset, n, key in spans:
            _hash_span(fd, h, buf, pos, offset, adapter.weights_path)
            read_into(fd, memoryview(buf)[:n], offset, adapter.weights_path, AdapterFormatError)
            h.update(memoryview(buf)[:n])  # before judging: _judge_bits overwrites buf
            dtype = adapter.infos[key].dtype
            out[key] = (_judge_bits(buf, n, dtype) if dtype in _FLOAT_BITS else None) or _torch_bits(adapter, key)
            pos = offset + n
        _hash_span(fd, h, buf, pos, os.fstat(fd).st_size, adapter.weights_path)
    finally:
        os.close(fd)
    return out, h.hexdigest()


def _hash_span(fd: int, h: Any, buf: bytearray, start: int, end: int, path: Any) -> None:
    """Hash bytes [start, end) of the file in chunks."""
    while start < end:
        n = min(end - start, _CHUNK)
        read_into(fd, memoryview(buf)[:n], start, path, AdapterFormatError)
        h.update(memoryview(buf)[:n])
        start += n


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

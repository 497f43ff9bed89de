"""safetensors headers without torch: shapes, dtypes and data offsets, checked against the file."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ..errors import AdapterFormatError, LorafitError
from ..tensor_info import DTYPE_SIZES, TensorInfo
from .inputs import no_duplicates, open_regular, parse_json, read_into


def _check_unicode(header: dict, metadata: dict, path: Path, error: type[LorafitError]) -> None:
    """Refuse a name that JSON's escapes allow but Unicode does not (a lone surrogate such as \\ud800).

    Python's json reads it; the safetensors library refuses the file, so a checkpoint written with that
    name could never be loaded again.
    """
    for text in [*header, *metadata, *(v for v in metadata.values() if isinstance(v, str))]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise error(f"corrupt safetensors file (the name {text!r} is not valid Unicode: it holds a lone "
                        "surrogate escape, which the safetensors library refuses)", path) from None


def read_safetensors_header(path: Path, error: type[LorafitError] = AdapterFormatError
                            ) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header (8-byte length + JSON) without importing torch.

    Held to what the safetensors library itself accepts: known dtypes, one entry per key, and data
    offsets that tile the data section exactly (no overlap, no gap), so no tensor can alias another.
    Returns:
        (tensor infos by key, the `__metadata__` dict).
    Raises:
        error (AdapterFormatError unless the caller reads a model checkpoint): the file is not a regular
            file, is truncated, or its header is not valid.
    """
    fd = open_regular(path, error)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise error("truncated or corrupt safetensors file (shorter than its 8-byte header)", path)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise error(
                f"truncated or corrupt safetensors file (header says {n} bytes, file has {size})", path
            )
        raw = bytearray(n)
        read_into(fd, memoryview(raw), 8, path, error)
    finally:
        os.close(fd)
    header = parse_json(bytes(raw), path, error, "corrupt safetensors file: its header", pairs=no_duplicates)
    if not isinstance(header, dict):
        raise error("corrupt safetensors file (its header is not a JSON object)", path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise error("corrupt safetensors file (its __metadata__ is not a JSON object)", path)
    _check_unicode(header, metadata, path, error)
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    data_len = size - 8 - n
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not (type(start) is int and type(end) is int and 0 <= start <= end) or not isinstance(shape, list) \
                    or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(key)
        except (KeyError, TypeError, ValueError):
            raise error(f"corrupt safetensors file (bad header entry for {key!r})", path) from None
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise error(f"tensor {key!r} has dtype {dtype!r}, which lorafit does not handle (one of "
                        f"{', '.join(DTYPE_SIZES)})", path)
        info = TensorInfo(tuple(shape), dtype, 8 + n + start)
        if end > data_len:
            raise error(
                f"truncated or corrupt safetensors file (tensor {key!r} ends at byte {end}, "
                f"only {data_len} data bytes present)",
                path,
            )
        if end - start != info.nbytes:
            raise error(
                f"corrupt safetensors file (tensor {key!r} holds {end - start} bytes; shape {list(shape)} "
                f"of {dtype} needs {info.nbytes})",
                path,
            )
        infos[key] = info
        spans.append((start, end, key))
    expected = 0
    for start, end, key in sorted(spans):
        if start != expected:
            what = "overlaps the tensor before it" if start < expected else f"leaves a gap at byte {expected}"
            raise error(f"corrupt safetensors file (tensor {key!r} {what}; the safetensors library refuses this)",
                        path)
        expected = end
    return infos, metadata

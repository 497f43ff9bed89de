"""safetensors headers without torch, and the HF cache location; shared by the reader, fix and merge."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterFormatError, LorafitError
from .inputs import no_duplicates, open_regular, parse_json, read_into

# Bytes per element for each safetensors dtype code; used to check that a header fits its file.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says of one tensor: enough to check shapes with no data read."""

    shape: tuple[int, ...]
    dtype: str
    offset: int | None = None  # absolute file offset of the data (safetensors only), for raw reads

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES.get(self.dtype, 4)


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


def hf_hub_cache_dir() -> str:
    """The HF hub cache directory that the environment names now.

    huggingface_hub reads HF_HUB_CACHE / HF_HOME once, when it is imported; this reads them at call time,
    with the same precedence: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub.
    Returns the directory (it need not exist).
    """
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return os.path.expandvars(os.path.expanduser(env[name]))
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = env.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")


def write_json(path: Path, data: object) -> None:
    """Write JSON the way PEFT and transformers do (indent 2, sorted keys, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

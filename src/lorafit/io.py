"""File helpers shared by the reader, fix and merge: safetensors headers without torch, atomic outputs."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterFormatError, LorafitError, OutputExistsError

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

    Returns:
        (tensor infos by key, the `__metadata__` dict).
    Raises:
        error (AdapterFormatError unless the caller reads a model checkpoint): the file is truncated or
            its header is not valid.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error("truncated or corrupt safetensors file (shorter than its 8-byte header)", path)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise error(
                f"truncated or corrupt safetensors file (header says {n} bytes, file has {size})", path
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise error("corrupt safetensors file (its header is not valid JSON)", path) from None
    if not isinstance(header, dict):
        raise error("corrupt safetensors file (its header is not a JSON object)", path)
    metadata = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            if not (type(start) is int and type(end) is int and 0 <= start <= end) or min(shape, default=0) < 0:
                raise ValueError(key)
        except (KeyError, TypeError, ValueError):
            raise error(f"corrupt safetensors file (bad header entry for {key!r})", path) from None
        info = TensorInfo(shape, dtype, 8 + n + start)
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


@contextmanager
def atomic_output_dir(out: Path, force: bool = False, protect: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temp dir next to `out`; on success it replaces `out` in one rename, on failure it vanishes.

    `protect` names the inputs: `out` may be none of them and contain none of them, even with force,
    because replacing `out` would delete them.

    Raises:
        OutputExistsError: `out` exists and force is False.
        LorafitError: `out` is or contains an input, or the parent of `out` cannot be written.
    """
    out = Path(out)
    target = out.resolve()
    for p in protect:
        p = Path(p).resolve()
        if p == target or target in p.parents:
            raise LorafitError(f"output would replace the input {p}; write somewhere else", out)
    if out.exists() and not force:
        raise OutputExistsError("output already exists; pass --force to overwrite it", out)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as e:
        raise LorafitError(f"cannot write the output here ({e.strerror})", out) from None
    try:
        yield tmp
        if out.exists():
            # Move the old one aside first so that no moment exists with neither in place.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: object) -> None:
    """Write JSON the way PEFT and transformers do (indent 2, sorted keys, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

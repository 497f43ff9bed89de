"""Stream safetensors checkpoints tensor by tensor: read with pread, write with pwrite, copy in the kernel.

Nothing here maps a file into memory. A tensor is read with `os.preadv` into a buffer of its own size,
so resident memory is that buffer and never the page cache of the shard; an untouched tensor goes
from input shard to output shard with `os.copy_file_range` and never enters the process at all.
Every output offset is known before a byte is written (a safetensors header lists them), so worker
threads write their tensors into place concurrently with `os.pwrite`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointFormatError, LorafitError
from ..tensor_info import DTYPE_SIZES, TensorInfo
from .inputs import confined, load_json, open_regular, read_into
from .safetensors_header import read_safetensors_header

if TYPE_CHECKING:
    import torch

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# safetensors dtype code -> torch dtype name.
TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
CODES = {v: k for k, v in TORCH_NAMES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
_CHUNK = 16 << 20  # bytes per copy or compare step: bounds memory for tensors of any size
_MAX_IO = 1 << 30  # Linux moves at most ~2 GiB per read/write call
_SHARD_NAME = re.compile(r"[^/\\\x00]+")  # a bare file name: no directory part, absolute or relative


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code. Raises LorafitError for a code torch cannot hold."""
    import torch

    dt = getattr(torch, TORCH_NAMES.get(code, ""), None)
    if dt is None:
        raise LorafitError(f"safetensors dtype {code} is not supported by this torch")
    return dt


@dataclass(frozen=True)
class Stored:
    """Where one tensor lives: file, absolute byte offset of its data, size, dtype code and shape."""

    key: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class Checkpoint:
    """A safetensors checkpoint (one file or an index with shards), read one tensor at a time.

    File descriptors are opened on first use and shared by threads: pread/pwrite take explicit
    offsets, so no seek position is shared. Use as a context manager, or call close().
    """

    def __init__(self, root: Path, tensors: dict[str, Stored], index: Path | None) -> None:
        self.root = root
        self.tensors = tensors
        self.index = index
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: Path, follow_symlinks: bool | None = None) -> Checkpoint:
        """Read the index (if any) and every shard header; nothing else.

        With `follow_symlinks` False (merge copies shard data into its output), a shard that is a symlink
        out of `root` is refused; None reads wherever the files point (verification only reads).

        Raises:
            LorafitError: no safetensors weights, an index naming a missing shard or a key its shard lacks,
                a truncated or corrupt shard. The message names the file.
        """
        root = Path(root)
        if not root.is_dir():
            raise LorafitError("is not a directory holding a safetensors checkpoint", root)
        index: Path | None = root / INDEX_NAME
        files: dict[str, list[str]] = {}
        if index is not None and index.exists():
            data = load_json(index, CheckpointFormatError)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointFormatError("is not a valid safetensors index (no weight_map object)", index)
            for key, fname in weight_map.items():
                if not isinstance(fname, str) or not _SHARD_NAME.fullmatch(fname) or fname in (".", ".."):
                    raise CheckpointFormatError(f"names the shard {fname!r} for {key!r}; a shard must be a plain "
                                                "file name in the checkpoint's own directory", index)
                files.setdefault(fname, []).append(key)
        elif (root / SINGLE_NAME).exists():
            index, files[SINGLE_NAME] = None, []
        else:
            found = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
            what = f" (found {', '.join(found[:3])})" if found else ""
            raise LorafitError(f"no {SINGLE_NAME} or {INDEX_NAME}{what}: lorafit streams safetensors checkpoints "
                               "only; re-save the model with save_pretrained(safe_serialization=True)", root)
        tensors: dict[str, Stored] = {}
        for fname in sorted(files):
            path = root / fname
            if not os.path.lexists(path):
                raise CheckpointFormatError(f"shard named by {INDEX_NAME} is missing", path)
            if follow_symlinks is not None:
                confined(path, root, follow_symlinks, CheckpointFormatError)
            # Validated, with each tensor's absolute data offset.
            infos, _ = read_safetensors_header(path, CheckpointFormatError)
            wanted = files[fname] or sorted(infos)
            missing = [k for k in wanted if k not in infos]
            if missing:
                raise LorafitError(f"{INDEX_NAME} places {missing[0]!r} in this shard, which does not hold it", path)
            for key in sorted(wanted, key=lambda k: infos[k].offset or 0):
                info = infos[key]
                tensors[key] = Stored(key, path, info.dtype, info.shape, info.offset or 0, info.nbytes)
        return cls(root, tensors, index)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = open_regular(path, CheckpointFormatError)
            return self._fds[path]

    def read(self, key: str, into: bytearray | None = None) -> torch.Tensor:
        """The tensor's data in a writable buffer not shared with the file: a new one, or the start of `into`.

        Reusing `into` (at least the tensor's size) spares a fresh allocation, and its page faults, per tensor.
        Raises:
            LorafitError: the shard changed or shrank since its header was read.
        """
        import torch

        st = self.tensors[key]
        dtype = torch_dtype(st.dtype)
        if st.nbytes == 0:
            return torch.empty(st.shape, dtype=dtype)
        buf = into if into is not None and len(into) >= st.nbytes else bytearray(st.nbytes)
        read_into(self.fd(st.path), memoryview(buf)[:st.nbytes], st.offset, st.path, CheckpointFormatError)
        numel = st.nbytes // DTYPE_SIZES[st.dtype]
        return torch.frombuffer(buf, dtype=dtype, count=numel).reshape(st.shape)

    def read_range(self, key: str, start: int, nbytes: int, into: bytearray | None = None) -> memoryview:
        """`nbytes` bytes of the tensor's data from byte `start` on (clipped to its end), in `into` if big enough."""
        st = self.tensors[key]
        n = max(0, min(nbytes, st.nbytes - start))
        buf = into if into is not None and len(into) >= n else bytearray(n)
        view = memoryview(buf)[:n]
        read_into(self.fd(st.path), view, st.offset + start, st.path, CheckpointFormatError)
        return view

    def chunks(self, key: str, size: int = _CHUNK) -> Iterator[memoryview]:
        """The tensor's raw bytes in pieces of at most `size` bytes (copies and comparisons of any size)."""
        for start in range(0, self.tensors[key].nbytes, size):
            yield self.read_range(key, start, size)


def write_from(fd: int, view: memoryview, offset: int) -> None:
    """Write all of `view` to `fd` at `offset` (pwrite may write less than asked)."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + _MAX_IO], offset + done)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in row-major order, without a copy when it is contiguous (bf16 included)."""
    import torch

    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    data: Any = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(data)


def parse_size(size: str | int) -> int:
    """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30, '500MB', '100KB'; an int is bytes. A string needs its unit.

    Raises:
        LorafitError: not a size.
    """
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise LorafitError(f"--max-shard-size {size!r} is not a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise LorafitError(f"--max-shard-size {size!r} must be positive")
    if m.group(2) is None:  # '5' would be 5 bytes a shard, one file per tensor: surely not what was meant
        raise LorafitError(f"--max-shard-size {size!r} needs a unit, such as {m.group(1)}GB or {m.group(1)}MB")
    return value


@dataclass
class OutShard:
    """One output file: its name, header bytes, and each tensor's absolute offset."""

    name: str
    entries: list[tuple[str, str, tuple[int, ...]]]  # (key, dtype code, shape) in file order
    offsets: dict[str, int] = field(default_factory=dict)
    header: bytes = b""
    size: int = 0


def layout_shards(entries: Sequence[tuple[str, str, tuple[int, ...]]], max_bytes: int,
                  metadata: dict[str, str]) -> list[OutShard]:
    """Split (key, dtype, shape) entries into files of at most `max_bytes` of data, like save_pretrained.

    A tensor larger than max_bytes gets a file of its own. One file is named model.safetensors,
    several model-0000i-of-0000n.safetensors.
    """
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for e in entries:
        n = TensorInfo(tuple(e[2]), e[1]).nbytes
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += n
    total = len(groups)
    shards = []
    for i, group in enumerate(groups, 1):
        name = SINGLE_NAME if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
        shard = OutShard(name, group)
        header: dict[str, Any] = {"__metadata__": metadata}
        pos = 0
        for key, code, shape in group:
            n = TensorInfo(tuple(shape), code).nbytes
            header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
            shard.offsets[key] = pos
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        shard.header = struct.pack("<Q", len(raw)) + raw
        shard.offsets = {k: v + len(shard.header) for k, v in shard.offsets.items()}
        shard.size = len(shard.header) + pos
        shards.append(shard)
    return shards


def write_index(out_dir: Path, shards: Sequence[OutShard]) -> None:
    """Write model.safetensors.index.json when there is more than one shard."""
    if len(shards) < 2:
        return
    total = sum(s.size - len(s.header) for s in shards)
    weight_map = {key: s.name for s in shards for key, _, _ in s.entries}
    (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True) + "\n")


class ShardWriter:
    """Output files with their headers written and their full size reserved; tensors are then written into place."""

    def __init__(self, out_dir: Path, shards: Sequence[OutShard]) -> None:
        self.where: dict[str, tuple[int, int, Path]] = {}  # key -> (fd, offset, path)
        self.sizes: dict[str, int] = {}  # key -> bytes its slot holds: a write may never spill into the next
        self._fds: list[int] = []
        try:
            for s in shards:
                path = out_dir / s.name
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                write_from(fd, memoryview(s.header), 0)
                os.ftruncate(fd, s.size)
                for key in s.offsets:
                    self.where[key] = (fd, s.offsets[key], path)
                for key, code, shape in s.entries:
                    self.sizes[key] = TensorInfo(tuple(shape), code).nbytes
        except OSError as e:
            self.close()
            raise LorafitError(f"cannot write the output ({e.strerror})", out_dir) from None

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def write(self, key: str, data: memoryview, at: int = 0) -> None:
        """Write bytes of tensor `key`, starting `at` bytes into its slot.

        Raises:
            LorafitError: the bytes do not fit the slot the header declares (the file would be corrupt).
        """
        fd, offset, path = self.where[key]
        if at + data.nbytes > self.sizes[key]:
            raise LorafitError(f"tensor {key!r} is {at + data.nbytes} bytes where its header declares "
                               f"{self.sizes[key]}: nothing is written", path)
        try:
            write_from(fd, data, offset + at)
        except OSError as e:
            raise LorafitError(f"cannot write {key!r} ({e.strerror})", path) from None

    def copy(self, key: str, src: Checkpoint, src_key: str) -> None:
        """Copy a stored tensor's bytes unchanged, inside the kernel when the filesystem allows it."""
        st = src.tensors[src_key]
        fd, offset, path = self.where[key]
        done = 0
        try:
            while done < st.nbytes:
                n = os.copy_file_range(src.fd(st.path), fd, min(_MAX_IO, st.nbytes - done),
                                       st.offset + done, offset + done)
                if n == 0:
                    raise LorafitError("ends before the tensor data its header promises", st.path)
                done += n
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise LorafitError(f"cannot write {key!r} ({e.strerror})", path) from None
        for start in range(done, st.nbytes, _CHUNK):  # from where the kernel copy stopped
            self.write(key, src.read_range(src_key, start, _CHUNK), start)

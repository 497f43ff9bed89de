"""TensorInfo: what a checkpoint header says of one tensor (shape, dtype, offset), as plain data."""

from __future__ import annotations

from dataclasses import dataclass

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

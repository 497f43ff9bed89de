"""Run a MergePlan: every tensor of the base read, merged with PEFT's arithmetic and written, by a few threads.

Threads rather than processes: torch and the file calls release the GIL, and threads share the imported
libraries and the adapter instead of holding a copy each. Untouched tensors are copied inside the kernel;
a large adapted tensor is merged in row blocks straight into its place in the output (stream_merge).
Peak memory is the process plus, per worker, one tensor and its fp32 delta, plus the adapter.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from ..adapter import Adapter
from ..errors import LorafitError
from ..fileio.checkpoint import CODES, FLOAT_CODES, Checkpoint, ShardWriter, tensor_bytes, torch_dtype
from ..tensor_info import DTYPE_SIZES
from .math import Scratch, adds_rounded_delta, apply_delta, lora_dtype, merge_block, product, row_blocks, torch_threads
from .plan import MergePlan, TensorPlan

if TYPE_CHECKING:
    import torch


def out_code(stored_code: str, out_dtype: str | None) -> str:
    """The output dtype code of a tensor: --dtype applies to floating tensors only, as in from_pretrained(dtype=)."""
    return CODES[out_dtype] if out_dtype and stored_code in FLOAT_CODES else stored_code


def lora_tensors(plan: MergePlan, adapter: Adapter, ckpt: Checkpoint,
                 out_dtype: str | None) -> dict[str, torch.Tensor]:
    """Every adapter tensor the plan reads, read once and cast to the dtype PEFT would hold it in."""
    cache: dict[str, torch.Tensor] = {}
    for tp in plan.changes.values():
        dtype = torch_dtype(out_code(ckpt.tensors[tp.source].dtype, out_dtype))
        for d in tp.deltas:
            for key in d.keys.values():
                if key not in cache:
                    cache[key] = adapter.tensor(key).to(lora_dtype(dtype))
    return cache


def compute(tp: TensorPlan, ckpt: Checkpoint, adapter: Adapter, lora: dict[str, torch.Tensor],
            out_dtype: str | None, safe: bool, space: Workspace | None = None) -> torch.Tensor:
    """The merged value of one planned tensor.

    Raises:
        LorafitError: the weight is not a float (quantized), or a safe merge produced NaN or Inf.
    """
    import torch

    st = ckpt.tensors[tp.source]
    code = out_code(st.dtype, out_dtype)
    if code not in FLOAT_CODES:
        raise LorafitError(f"cannot merge into {tp.name}: it is stored as {st.dtype} (quantized?); merge needs "
                           "a float checkpoint", st.path)
    dtype = torch_dtype(code)
    if tp.replace is not None:
        w = adapter.tensor(tp.replace).to(dtype, copy=True)  # PEFT copies the saved values into a param of this dtype
    else:
        w = ckpt.read(tp.source, into=space.read_buffer(st.nbytes) if space else None).to(dtype)
    for d in tp.deltas:
        w = apply_delta(w, d, lora.__getitem__, safe, space.scratch if space else None, tp.window)
    if safe and not bool(torch.isfinite(w).all()):
        raise LorafitError(f"NaN or Inf in the merged {tp.name}; the adapter is broken (safe merge refuses it)",
                           adapter.path)
    return w


def streamable(tp: TensorPlan, ckpt: Checkpoint, code: str) -> bool:
    """One plain LoRA delta on a 2-D float weight: merged block by block, never held whole."""
    d = tp.deltas[0] if len(tp.deltas) == 1 else None
    st = ckpt.tensors[tp.source]
    return (d is not None and d.role == "weight" and not d.dora and tp.replace is None and len(st.shape) == 2
            and st.dtype in FLOAT_CODES and code in FLOAT_CODES and d.kind in ("linear", "conv1d", "embedding"))


def stream_merge(tp: TensorPlan, ckpt: Checkpoint, writer: ShardWriter, lora: dict[str, torch.Tensor], code: str,
                 safe: bool, space: Workspace) -> int:
    """Merge a streamable tensor: ΔW whole in the worker's buffer, the weight read, merged, written per row block.

    Only ΔW stays resident (the weight passes through a block at a time); the arithmetic is merge_block's,
    the same as apply_delta's. Returns the bytes written.
    Raises:
        LorafitError: a safe merge produced NaN or Inf.
    """
    import torch

    st, d = ckpt.tensors[tp.source], tp.deltas[0]
    in_dt, out_dt = torch_dtype(st.dtype), torch_dtype(code)
    n_rows, n_cols = st.shape
    in_row, out_row = n_cols * DTYPE_SIZES[st.dtype], n_cols * DTYPE_SIZES[code]
    full = product(lora[d.keys["A"]], lora[d.keys["B"]], d.kind, space.scratch)
    round_first = adds_rounded_delta(d, safe)
    for rows in row_blocks(n_rows, n_cols):
        count = rows.stop - rows.start
        raw = ckpt.read_range(tp.source, rows.start * in_row, count * in_row, space.read_buffer(count * in_row))
        w = torch.frombuffer(raw, dtype=in_dt).view(count, n_cols).to(out_dt)
        merge_block(w, full[rows], d.scaling, round_first)
        if safe and not bool(torch.isfinite(w).all()):
            raise LorafitError(f"NaN or Inf in the merged {tp.name}; the adapter is broken (safe merge refuses it)")
        writer.write(tp.name, tensor_bytes(w), rows.start * out_row)
    return n_rows * out_row


class Workspace:
    """One worker's reusable buffers: the tensor read from the base, and ΔW."""

    def __init__(self) -> None:
        self._read = bytearray()
        self.scratch = Scratch()

    def read_buffer(self, nbytes: int) -> bytearray:
        if len(self._read) < nbytes:
            self._read = bytearray()  # free the old buffer before allocating the larger one
            self._read = bytearray(nbytes)
        return self._read


def _cast_copy(writer: ShardWriter, name: str, ckpt: Checkpoint, src: str, code: str) -> None:
    """Copy a tensor the adapter does not touch, cast piece by piece (an elementwise cast is exact to split)."""
    import torch

    st = ckpt.tensors[src]
    in_dt, out_dt = torch_dtype(st.dtype), torch_dtype(code)
    pos = 0
    for raw in ckpt.chunks(src):
        piece = torch.frombuffer(raw, dtype=in_dt).to(out_dt)
        data = tensor_bytes(piece)
        writer.write(name, data, pos)
        pos += len(data)


def execute(plan: MergePlan, ckpt: Checkpoint, adapter: Adapter, writer: ShardWriter, codes: dict[str, str],
            out_dtype: str | None, safe: bool, workers: int, on_bytes: Callable[[int], None]) -> None:
    """Write every tensor of the plan with `workers` threads; the first error stops the rest and is raised."""
    lora = lora_tensors(plan, adapter, ckpt, out_dtype)
    local = threading.local()

    def job(name: str) -> None:
        src = plan.sources[name]
        st = ckpt.tensors[src]
        if name in plan.changes:
            if not hasattr(local, "space"):
                local.space = Workspace()
            tp = plan.changes[name]
            if streamable(tp, ckpt, codes[name]):
                on_bytes(stream_merge(tp, ckpt, writer, lora, codes[name], safe, local.space))
                return
            data = tensor_bytes(compute(tp, ckpt, adapter, lora, out_dtype, safe, local.space))
            writer.write(name, data)
            on_bytes(len(data))
        elif codes[name] == st.dtype:
            writer.copy(name, ckpt, src)
            on_bytes(st.nbytes)
        else:
            _cast_copy(writer, name, ckpt, src, codes[name])
            on_bytes(st.nbytes)

    with torch_threads(workers):
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lorafit-merge") as pool:
            futures = [pool.submit(job, name) for name in plan.order]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # a signal: stop queued work now, not after the whole model is written
                for g in futures:
                    g.cancel()
                raise
            for f in done:
                if f.exception() is not None:
                    for g in futures:
                        g.cancel()
                    raise f.exception()  # type: ignore[misc]

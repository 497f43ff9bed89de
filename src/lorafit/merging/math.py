"""How one LoRA module changes one base tensor, in the exact arithmetic of PEFT's merge_and_unload().

Bit-exactness comes from doing the same torch operations, in the same order, on the same dtypes and
memory layouts as PEFT's LoRA layers do (peft/tuners/lora/layer.py and variants.py):

- PeftModel.from_pretrained upcasts fp16/bf16 adapter weights to fp32 (autocast_adapter_dtype=True),
  so A, B, the DoRA magnitude and the lora_B bias are used in fp32 (or the base dtype if wider).
- ΔW = transpose(B @ A, fan_in_fan_out) * scaling; an embedding's ΔW = (B @ A).T * scaling.
- The default ("unsafe") merge of a Linear/Conv1D adds the fp32 ΔW into the low-precision weight in
  place (one rounding); safe_merge and every Embedding merge cast ΔW to the weight's dtype first.
- DoRA: W' = m / ||W + ΔW||_c * (W + ΔW), the norm taken along the same axis PEFT takes it.
- A LoRA on a parameter (ParamWrapper, fused MoE experts): A holds r rows per expert and B r columns per
  expert, interleaved; ΔW = einsum over the experts * scaling, cast to the weight's dtype, then added.

tests/test_merge.py compares every case against PEFT itself: if a PEFT release changes its arithmetic,
a test fails rather than a merge silently drifting.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..errors import LorafitError

if TYPE_CHECKING:
    import torch

    from .plan import Delta


def lora_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype PEFT holds adapter weights in on a base of `weight_dtype` (half precisions are upcast)."""
    import torch

    if weight_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight_dtype


class Scratch:
    """A reusable buffer for ΔW, one per worker: a fresh 4-bytes-per-element tensor per weight costs page faults."""

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def take(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous [rows, cols] tensor of `dtype` (contents undefined), valid until the next take."""
        import torch

        n = rows * cols
        if self._flat is None or self._flat.dtype != dtype or self._flat.numel() < n:
            self._flat = None  # free the old buffer before allocating the larger one
            self._flat = torch.empty(n, dtype=dtype)
        return self._flat[:n].view(rows, cols)


# Elements per block of the elementwise passes: 512 KiB of fp32 stays in cache between scale, add and round.
_BLOCK = 1 << 17


def product(a: torch.Tensor, b: torch.Tensor, kind: str, scratch: Scratch | None = None) -> torch.Tensor:
    """B @ A, as a view laid out like the base weight. With `scratch`, written into its buffer (the same matmul).

    The matmul always runs whole: splitting it could change its rounding.
    """
    import torch

    product = b @ a if scratch is None else torch.mm(b, a, out=scratch.take(b.shape[0], a.shape[1], b.dtype))
    return product.T if kind in ("embedding", "conv1d") else product


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float, kind: str,
                 scratch: Scratch | None = None) -> torch.Tensor:
    """ΔW of one module, laid out like the base weight: [out, in]; [in, out] for Conv1D; [vocab, dim] for Embedding."""
    # PEFT multiplies into a new tensor; scaling in place is the same elementwise product, one fp32 copy fewer.
    return product(a, b, kind, scratch).mul_(scaling)


def row_blocks(n_rows: int, n_cols: int) -> list[slice]:
    """Row ranges of a [n_rows, n_cols] weight, each about 512 KiB of fp32: a block stays in cache."""
    step = max(1, _BLOCK // max(1, n_cols))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def adds_rounded_delta(d: Delta, safe: bool) -> bool:
    """True where PEFT rounds ΔW to the weight dtype before adding: safe merges, and every Embedding."""
    return safe or d.kind == "embedding"


def merge_block(w: torch.Tensor, delta: torch.Tensor, scaling: float, round_delta_first: bool) -> None:
    """PEFT's elementwise merge on one block: w += scaling * delta, in place on both (`delta` is B @ A's rows).

    Elementwise, so exact to split into blocks: the same bits as PEFT's whole-tensor operations.
    """
    delta.mul_(scaling)
    if round_delta_first:
        w += delta.to(w.dtype)
    else:
        # PEFT's `weight += delta` rounds fp(weight) + delta once to the weight dtype. Adding the weight into
        # the fp32 delta (IEEE addition commutes) and copying back rounds the same sum the same way, with
        # same-dtype kernels instead of a slow mixed-dtype in-place add.
        delta.add_(w)
        w.copy_(delta)


def _dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, kind: str) -> torch.Tensor:
    """W' = m / ||W + ΔW|| * (W + ΔW), with the norm per output feature (per embedding dimension)."""
    import torch

    base = weight.clone()  # PEFT takes the norm of a copy of the unmerged weight
    if kind in ("embedding", "conv1d"):
        w = base.T + 1 * delta.T  # stored [vocab, dim] / [in, out]: the norm runs along the stored rows
    else:
        w = base + 1 * delta
    norm = torch.linalg.norm(w, dim=1).to(w.dtype)
    factor = magnitude / norm
    if kind == "embedding":
        factor = factor.view(1, -1)
    elif kind == "conv1d":
        factor = factor.view(-1, 1).T
    else:
        factor = factor.view(-1, 1)
    return (factor * (weight + delta)).to(weight.dtype)


def apply_delta(weight: torch.Tensor, d: Delta, lora: Callable[[str], torch.Tensor], safe: bool,
                scratch: Scratch | None = None, window: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Merge one module's change into `weight` (modified in place where PEFT does so); returns the result.

    Args:
        weight: the base tensor, already in the output dtype; owned by the caller, so it may be changed.
        d: which module, its kind, scaling and tensor keys.
        lora: key -> adapter tensor in `lora_dtype(weight.dtype)`.
        safe: follow merge_and_unload(safe_merge=True).
        scratch: a reusable buffer for ΔW (optional).
        window: for a parameter stored per expert, which expert and rows `weight` is (TensorPlan.window).
    Raises:
        LorafitError: the module's kind cannot be merged.
    """
    if d.role == "bias":
        extra = lora(d.keys["bias"]) * d.scaling
        if safe:
            return (weight + extra).to(weight.dtype)
        weight += extra
        return weight
    if d.kind == "param":
        return _apply_parameter_delta(weight, d, lora, window)
    if d.kind not in ("linear", "conv1d", "embedding"):
        raise LorafitError(f"cannot merge {d.module}: LoRA on {d.kind} layers is not supported by lorafit merge")
    if d.dora:
        delta = delta_weight(lora(d.keys["A"]), lora(d.keys["B"]), d.scaling, d.kind)
        return _dora(weight, delta, lora(d.keys["magnitude"]), d.kind)
    full = product(lora(d.keys["A"]), lora(d.keys["B"]), d.kind, scratch)
    for rows in row_blocks(weight.shape[0], weight[0].numel()):
        merge_block(weight[rows], full[rows], d.scaling, adds_rounded_delta(d, safe))
    return weight


def parameter_product(a: torch.Tensor, b: torch.Tensor, d: Delta, experts: slice | None = None) -> torch.Tensor:
    """B·A of a LoRA on a parameter, laid out like it: [out, in] for a 2-D one; for experts [E, out, in], or
    [E, in, out] when they are stored transposed. With `experts`, only those experts.

    The same einsum as PEFT's ParamWrapper.get_delta_weight; an expert's slice computes the same bits.
    """
    import torch

    if d.experts == 1:
        return b @ a
    a3 = a.reshape(d.experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, d.experts)
    if experts is not None:
        a3, b3 = a3[experts], b3[:, :, experts]
    return torch.einsum("o r e, e r i -> e i o" if d.transposed else "o r e, e r i -> e o i", b3, a3)


def _apply_parameter_delta(weight: torch.Tensor, d: Delta, lora: Callable[[str], torch.Tensor],
                           window: tuple[int, int, int] | None) -> torch.Tensor:
    """ParamWrapper.merge: ΔW cast to the weight dtype first, then added (safe or not, the same sum).

    With `window` (expert, start, stop), `weight` is that expert's rows [start, stop) as the checkpoint stores them.
    """
    one = None if window is None else slice(window[0], window[0] + 1)
    delta = parameter_product(lora(d.keys["A"]), lora(d.keys["B"]), d, one)
    if window is not None:
        delta = delta[0, window[1]:window[2]]
    weight += (delta * d.scaling).to(weight.dtype)
    return weight


@contextmanager
def torch_threads(workers: int) -> Iterator[None]:
    """Give each of `workers` threads its share of torch's intra-op threads for the block, then restore.

    Two OpenMP teams on two cores spin against each other; torch's setting is process-wide, hence the restore.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)

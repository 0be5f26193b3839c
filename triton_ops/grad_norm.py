"""Multi-tensor L2 norm in Triton: per-program fp32 sums of squares, reduced deterministically.

Each program writes the sum of squares of its chunk to its own slot (no atomics, so the result
does not depend on scheduling); torch then adds the partials in fp64 on the device, so no
host sync is needed before the norm is used for clipping.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from badam_kernels.triton_ops.adam_math import to_fp32
from badam_kernels.triton_ops.utils import (
    BLOCK,
    NUM_WARPS,
    TRITON_DTYPES,
    VECTOR_BYTES,
    build_launch_tables,
    device_context,
    group_by,
)

_VECTOR_BYTES = tl.constexpr(VECTOR_BYTES)


@triton.jit
def _sum_of_squares_kernel(
    tensor_table, num_tensors, program_table, num_programs, chunk, partials,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    column = tl.load(program_table + pid)
    start = tl.multiple_of(tl.load(program_table + num_programs + pid), BLOCK)
    numel = tl.load(tensor_table + num_tensors + column)  # row 1: numel
    ptr = tl.load(tensor_table + column).to(tl.pointer_type(DTYPE))  # row 0: data pointer
    if ALIGNED:
        ptr = tl.multiple_of(ptr, _VECTOR_BYTES)

    end = tl.minimum(start + chunk, numel)
    lanes = tl.arange(0, BLOCK)
    num_full = (end - start) // BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    for b in range(num_full):  # whole blocks: unmasked, vectorised loads
        x = to_fp32(tl.load(ptr + start + b * BLOCK + lanes))
        acc += x * x
    tail_offs = start + num_full * BLOCK + lanes
    x = to_fp32(tl.load(ptr + tail_offs, mask=tail_offs < end, other=0.0))
    acc += x * x
    tl.store(partials + pid, tl.sum(acc, axis=0))


def grad_norm_triton(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all elements of `tensors` (contiguous bf16/fp16/fp32, one device, at least one
    tensor) as a 0-dim fp32 tensor on that device."""
    device = tensors[0].device
    partials = []
    for dtype, indices in group_by([t.dtype for t in tensors]).items():
        numels = [tensors[i].numel() for i in indices]
        pointers = [tensors[i].data_ptr() for i in indices]
        tables = build_launch_tables([pointers], [numels], numels, device)
        if tables is None:  # only empty tensors
            continue
        group_partials = torch.empty(tables.num_programs, dtype=torch.float32, device=device)
        with device_context(device):
            _sum_of_squares_kernel[(tables.num_programs,)](
                tables.tensor_table, tables.num_tensors, tables.program_table, tables.num_programs,
                tables.chunk, group_partials, DTYPE=TRITON_DTYPES[dtype], ALIGNED=tables.aligned,
                BLOCK=BLOCK, num_warps=NUM_WARPS,
                # acc + x * x as one fma rounds once: slightly more accurate, still deterministic.
                enable_fp_fusion=True,
            )  # fmt: skip
        partials.append(group_partials)
    if not partials:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.cat(partials).to(torch.float64).sum().sqrt().to(torch.float32)

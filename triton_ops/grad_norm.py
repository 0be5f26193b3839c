"""Multi-tensor L2 norm in Triton: per-program fp32 sums of squares, reduced deterministically.

Each program writes the sum of squares of its chunk to its own slot (no atomics, so the result
does not depend on scheduling); torch then adds the partials in fp64 on the device, so no
host sync is needed before the norm is used for clipping.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from badam_kernels.triton_ops import utils
from badam_kernels.triton_ops.adam_math import to_fp32
from badam_kernels.triton_ops.utils import (
    TRITON_DTYPES,
    VECTOR_BYTES,
    device_context,
    group_by,
    launch_tables,
    locate_chunk,
    table_entry,
    vector_ok,
)

_VECTOR_BYTES = tl.constexpr(VECTOR_BYTES)
# Rows of the launch table (utils.py): the data pointer, then numel.
NUM_POINTERS = 1
_NUM_POINTERS = tl.constexpr(NUM_POINTERS)
_ROW_DATA = tl.constexpr(0)
_ROW_NUMEL = tl.constexpr(1)


@triton.jit
def _chunk_sum_of_squares(ptr, start, end, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    full_end = start + (end - start) // BLOCK * BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    block_start = start
    while block_start < full_end:  # whole blocks: unmasked, vectorised loads (see fused_adamw.py)
        x = to_fp32(tl.load(ptr + tl.multiple_of(block_start, BLOCK) + lanes))
        acc += x * x
        block_start += BLOCK
    tail_offs = full_end + lanes
    x = to_fp32(tl.load(ptr + tail_offs, mask=tail_offs < end, other=0.0))
    acc += x * x
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["chunk"])
def _sum_of_squares_kernel(table, chunk, partials, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    column, chunk_index = locate_chunk(table, _NUM_POINTERS)
    start = tl.multiple_of(chunk_index.to(tl.int64) * chunk, BLOCK)
    end = tl.minimum(start + chunk, table_entry(table, _ROW_NUMEL, column))
    ptr = table_entry(table, _ROW_DATA, column).to(tl.pointer_type(DTYPE))
    if vector_ok(table, column, _NUM_POINTERS):
        total = _chunk_sum_of_squares(tl.multiple_of(ptr, _VECTOR_BYTES), start, end, BLOCK)
    else:
        total = _chunk_sum_of_squares(ptr, start, end, BLOCK // 4)
    tl.store(partials + tl.program_id(0), total)


def grad_norm_triton(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all elements of `tensors` (contiguous bf16/fp16/fp32, one device, at least one
    tensor) as a 0-dim fp32 tensor on that device."""
    device = tensors[0].device
    partials = []
    for dtype, indices in group_by([t.dtype for t in tensors]).items():
        columns = [(tensors[i].data_ptr(), tensors[i].numel()) for i in indices]
        for launch in launch_tables(columns, NUM_POINTERS, device):
            launch_partials = torch.empty(launch.num_programs, dtype=torch.float32, device=device)
            with device_context(device):
                _sum_of_squares_kernel[(launch.num_programs,)](
                    launch.table, launch.chunk, launch_partials, DTYPE=TRITON_DTYPES[dtype],
                    BLOCK=utils.BLOCK, num_warps=utils.NUM_WARPS,
                    # acc + x * x as one fma rounds once: slightly more accurate, still deterministic.
                    enable_fp_fusion=True,
                )  # fmt: skip
            partials.append(launch_partials)
    if not partials:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.cat(partials).to(torch.float64).sum().sqrt().to(torch.float32)

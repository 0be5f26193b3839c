"""SparseAdam on selected entries in Triton (badam's ratio mode): one launch per (param dtype,
grad dtype, index dtype) group.

The math is csrc/adam_math.h's sparse_adam_update (see adam_math.py); the master modes and the
table pointer loads are fused_adamw.py's; the launch tables are utils.py's, with an index
pointer row (0 for a contiguous run) and the parameter's numel. Not autotuned: the kernel
updates its inputs in place, so every tuning run would apply the step again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from badam_kernels.triton_ops import utils
from badam_kernels.triton_ops.adam_math import (
    from_fp32_rne,
    remainder_decode,
    remainder_encode,
    sparse_adam_update,
    to_fp32,
)
from badam_kernels.triton_ops.fused_adamw import (
    _MASTER_DTYPES,
    _MASTER_FP32,
    _MASTER_MODE_IDS,
    _MASTER_REMAINDER,
    _table_pointer,
)
from badam_kernels.triton_ops.utils import (
    TRITON_DTYPES,
    device_context,
    group_by,
    launch_tables,
    locate_chunk,
    table_entry,
    vector_ok,
)

from badam_kernels.reference import SparseAdamScalars

# Rows of the launch table (utils.py): six pointer rows (the index pointer is 0 for a contiguous
# run), the compact numel, the two rows utils.py adds, then the parameter's numel.
NUM_POINTERS = 6
_NUM_POINTERS = tl.constexpr(NUM_POINTERS)
_ROW_PARAM = tl.constexpr(0)
_ROW_GRAD = tl.constexpr(1)
_ROW_EXP_AVG = tl.constexpr(2)
_ROW_EXP_AVG_SQ = tl.constexpr(3)
_ROW_MASTER = tl.constexpr(4)
_ROW_INDEX = tl.constexpr(5)
_ROW_NUMEL = tl.constexpr(6)
_ROW_PARAM_NUMEL = tl.constexpr(9)

_INDEX_DTYPES = {None: tl.int32, torch.int32: tl.int32, torch.int64: tl.int64}


@triton.jit
def _sparse_adam_block(
    offs, mask, param_ptr, index_ptr, param_numel, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr,
    grad_mul, one_minus_beta1, one_minus_beta2, eps, step_size,
    PARAM_DTYPE: tl.constexpr, MASTER_MODE: tl.constexpr, INDEXED: tl.constexpr, HAS_GRAD_MUL: tl.constexpr,
):  # fmt: skip
    if INDEXED:
        # Entries whose index is out of range are left out entirely (nothing read or written).
        if mask is None:
            param_offs = tl.load(index_ptr + offs).to(tl.int64)
            mask = (param_offs >= 0) & (param_offs < param_numel)
        else:
            param_offs = tl.load(index_ptr + offs, mask=mask).to(tl.int64)
            mask = mask & (param_offs >= 0) & (param_offs < param_numel)
    else:
        param_offs = offs
    g = to_fp32(tl.load(grad_ptr + offs, mask=mask))
    if HAS_GRAD_MUL:
        g = g * grad_mul
    m = tl.load(exp_avg_ptr + offs, mask=mask)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask)
    if MASTER_MODE == _MASTER_FP32:
        w = tl.load(master_ptr + offs, mask=mask)
    elif MASTER_MODE == _MASTER_REMAINDER:
        w = remainder_decode(
            tl.load(param_ptr + param_offs, mask=mask), tl.load(master_ptr + offs, mask=mask)
        )
    else:
        w = to_fp32(tl.load(param_ptr + param_offs, mask=mask))

    w, m, v = sparse_adam_update(g, w, m, v, one_minus_beta1, one_minus_beta2, eps, step_size)

    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    if MASTER_MODE == _MASTER_REMAINDER:
        param, remainder = remainder_encode(w)
        tl.store(param_ptr + param_offs, param, mask=mask)
        tl.store(master_ptr + offs, remainder, mask=mask)
    else:
        if MASTER_MODE == _MASTER_FP32:
            tl.store(master_ptr + offs, w, mask=mask)
        tl.store(param_ptr + param_offs, from_fp32_rne(w, PARAM_DTYPE), mask=mask)


@triton.jit
def _sparse_adam_chunk(
    table, column, start, end, param_numel, grad_mul, one_minus_beta1, one_minus_beta2, eps, step_size,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MASTER_DTYPE: tl.constexpr,
    INDEX_DTYPE: tl.constexpr, MASTER_MODE: tl.constexpr, INDEXED: tl.constexpr, HAS_GRAD_MUL: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Entries [start, end) of the selection in `column`, one BLOCK at a time; as in fused_adamw.py
    whole blocks need no bounds mask and only the last block is masked."""
    param_ptr = _table_pointer(table, _ROW_PARAM, column, PARAM_DTYPE, ALIGNED)
    grad_ptr = _table_pointer(table, _ROW_GRAD, column, GRAD_DTYPE, ALIGNED)
    exp_avg_ptr = _table_pointer(table, _ROW_EXP_AVG, column, tl.float32, ALIGNED)
    exp_avg_sq_ptr = _table_pointer(table, _ROW_EXP_AVG_SQ, column, tl.float32, ALIGNED)
    master_ptr = _table_pointer(table, _ROW_MASTER, column, MASTER_DTYPE, ALIGNED)
    index_ptr = _table_pointer(table, _ROW_INDEX, column, INDEX_DTYPE, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    full_end = start + (end - start) // BLOCK * BLOCK
    block_start = start
    # A while loop, not range() of a run-time value: Triton 3.6's interpreter (see fused_adamw.py).
    while block_start < full_end:
        _sparse_adam_block(
            tl.multiple_of(block_start, BLOCK) + lanes, None, param_ptr, index_ptr, param_numel, grad_ptr,
            exp_avg_ptr, exp_avg_sq_ptr, master_ptr, grad_mul, one_minus_beta1, one_minus_beta2, eps,
            step_size, PARAM_DTYPE, MASTER_MODE, INDEXED, HAS_GRAD_MUL,
        )  # fmt: skip
        block_start += BLOCK
    if full_end < end:
        tail_offs = full_end + lanes
        _sparse_adam_block(
            tail_offs, tail_offs < end, param_ptr, index_ptr, param_numel, grad_ptr, exp_avg_ptr,
            exp_avg_sq_ptr, master_ptr, grad_mul, one_minus_beta1, one_minus_beta2, eps, step_size,
            PARAM_DTYPE, MASTER_MODE, INDEXED, HAS_GRAD_MUL,
        )  # fmt: skip


# Values that change between calls are not specialised on (no recompile per period or step).
@triton.jit(do_not_specialize=["chunk", "grad_mul_ptr"])
def _sparse_adam_kernel(
    table, chunk, grad_mul_ptr, one_minus_beta1, one_minus_beta2, eps, step_size,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MASTER_DTYPE: tl.constexpr,
    INDEX_DTYPE: tl.constexpr, MASTER_MODE: tl.constexpr, INDEXED: tl.constexpr, HAS_GRAD_MUL: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    column, chunk_index = locate_chunk(table, _NUM_POINTERS)
    start = tl.multiple_of(chunk_index.to(tl.int64) * chunk, BLOCK)
    end = tl.minimum(start + chunk, table_entry(table, _ROW_NUMEL, column))
    param_numel = table_entry(table, _ROW_PARAM_NUMEL, column)
    grad_mul = 1.0
    if HAS_GRAD_MUL:
        grad_mul = tl.load(grad_mul_ptr)
    # Alignment per selection, as in fused_adamw.py: vector accesses only where every pointer allows.
    if vector_ok(table, column, _NUM_POINTERS):
        _sparse_adam_chunk(
            table, column, start, end, param_numel, grad_mul, one_minus_beta1, one_minus_beta2, eps,
            step_size, PARAM_DTYPE, GRAD_DTYPE, MASTER_DTYPE, INDEX_DTYPE, MASTER_MODE, INDEXED,
            HAS_GRAD_MUL, True, BLOCK,
        )  # fmt: skip
    else:
        _sparse_adam_chunk(
            table, column, start, end, param_numel, grad_mul, one_minus_beta1, one_minus_beta2, eps,
            step_size, PARAM_DTYPE, GRAD_DTYPE, MASTER_DTYPE, INDEX_DTYPE, MASTER_MODE, INDEXED,
            HAS_GRAD_MUL, False, BLOCK // 4,
        )  # fmt: skip


def sparse_adam_triton(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    masters: list[torch.Tensor],
    indices: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    master_weights: str,
    grad_mul: torch.Tensor | None,
) -> None:
    """SparseAdam on selected entries, in place (arguments already validated; see
    badam_kernels.sparse_adam_ for their meaning). Tensors on CUDA, or on the CPU under
    TRITON_INTERPRET=1."""
    if not params:
        return
    scalars = SparseAdamScalars.make(lr, beta1, beta2, eps, step).as_fp32()
    device = params[0].device
    index_dtypes = [indices[i].dtype if indices else None for i in range(len(params))]
    groups = group_by([(p.dtype, g.dtype, d) for p, g, d in zip(params, grads, index_dtypes)])
    for (param_dtype, grad_dtype, index_dtype), members in groups.items():
        columns = [
            (
                params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                masters[i].data_ptr() if masters else 0, indices[i].data_ptr() if indices else 0,
                grads[i].numel(), params[i].numel(),
            )
            for i in members
        ]  # fmt: skip
        for launch in launch_tables(columns, NUM_POINTERS, device):
            with device_context(device):
                _sparse_adam_kernel[(launch.num_programs,)](
                    launch.table, launch.chunk, grad_mul, scalars.one_minus_beta1, scalars.one_minus_beta2,
                    scalars.eps, scalars.step_size,
                    PARAM_DTYPE=TRITON_DTYPES[param_dtype], GRAD_DTYPE=TRITON_DTYPES[grad_dtype],
                    MASTER_DTYPE=_MASTER_DTYPES[master_weights], INDEX_DTYPE=_INDEX_DTYPES[index_dtype],
                    MASTER_MODE=_MASTER_MODE_IDS[master_weights], INDEXED=index_dtype is not None,
                    HAS_GRAD_MUL=grad_mul is not None, BLOCK=utils.BLOCK, num_warps=utils.NUM_WARPS,
                    # No mul+add -> fma contraction: every backend rounds each op as adam_math.h does.
                    enable_fp_fusion=False,
                )  # fmt: skip

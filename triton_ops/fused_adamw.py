"""Fused multi-tensor AdamW in Triton: one launch per (param dtype, grad dtype) group.

The math and the bit-level rounding are those of csrc/adam_math.h (see adam_math.py); the
launch layout is described in utils.py. Not autotuned: the kernel updates its inputs in place,
so every tuning run would apply the step again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from badam_kernels.triton_ops import utils
from badam_kernels.triton_ops.adam_math import (
    adamw_update,
    fp32_to_bf16_stochastic,
    from_fp32_rne,
    mix32,
    remainder_decode,
    remainder_encode,
    sr_bits,
    to_fp32,
)
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

from badam_kernels.reference import AdamScalars, fold_seed

# Rows of the launch table (utils.py): five pointer rows, numel, the two rows utils.py adds, then
# the tensor's index in the caller's list (the stochastic-rounding stream is keyed by it).
NUM_POINTERS = 5
_NUM_POINTERS = tl.constexpr(NUM_POINTERS)
_ROW_PARAM = tl.constexpr(0)
_ROW_GRAD = tl.constexpr(1)
_ROW_EXP_AVG = tl.constexpr(2)
_ROW_EXP_AVG_SQ = tl.constexpr(3)
_ROW_MASTER = tl.constexpr(4)
_ROW_NUMEL = tl.constexpr(5)
_ROW_INDEX = tl.constexpr(8)

_VECTOR_BYTES = tl.constexpr(VECTOR_BYTES)
_MASTER_FP32 = tl.constexpr(1)
_MASTER_REMAINDER = tl.constexpr(2)
_MASTER_MODE_IDS = {"none": 0, "fp32": 1, "remainder": 2}
_MASTER_DTYPES = {"none": tl.float32, "fp32": tl.float32, "remainder": tl.int16}


@triton.jit
def _table_pointer(table, row, column, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = table_entry(table, row, column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # multiple_of marks the loaded value itself, so each branch of the kernel loads its own.
        ptr = tl.multiple_of(ptr, _VECTOR_BYTES)
    return ptr


@triton.jit
def _sr_key(seed32, step32, tensor_index):
    """sr_key of adam_math.h: the stochastic-rounding key of one tensor for this step."""
    index_hash = mix32(tensor_index.to(tl.uint32) ^ 0x9E3779B9)
    return mix32(seed32.to(tl.uint32, bitcast=True) ^ mix32(step32.to(tl.uint32, bitcast=True) ^ index_hash))


@triton.jit
def _adamw_block(
    offs, mask, param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, grad_mul, key,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt,
    PARAM_DTYPE: tl.constexpr, MASTER_MODE: tl.constexpr, STOCHASTIC: tl.constexpr,
    HAS_GRAD_MUL: tl.constexpr,
):  # fmt: skip
    g = to_fp32(tl.load(grad_ptr + offs, mask=mask))
    if HAS_GRAD_MUL:
        g = g * grad_mul
    m = tl.load(exp_avg_ptr + offs, mask=mask)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask)
    if MASTER_MODE == _MASTER_FP32:
        w = tl.load(master_ptr + offs, mask=mask)
    elif MASTER_MODE == _MASTER_REMAINDER:
        w = remainder_decode(tl.load(param_ptr + offs, mask=mask), tl.load(master_ptr + offs, mask=mask))
    else:
        w = to_fp32(tl.load(param_ptr + offs, mask=mask))

    w, m, v = adamw_update(
        g, w, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt
    )

    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    if MASTER_MODE == _MASTER_FP32:
        tl.store(master_ptr + offs, w, mask=mask)
        tl.store(param_ptr + offs, from_fp32_rne(w, PARAM_DTYPE), mask=mask)
    elif MASTER_MODE == _MASTER_REMAINDER:
        param, remainder = remainder_encode(w)
        tl.store(param_ptr + offs, param, mask=mask)
        tl.store(master_ptr + offs, remainder, mask=mask)
    elif STOCHASTIC:
        tl.store(param_ptr + offs, fp32_to_bf16_stochastic(w, sr_bits(key, offs)), mask=mask)
    else:
        tl.store(param_ptr + offs, from_fp32_rne(w, PARAM_DTYPE), mask=mask)


@triton.jit
def _adamw_chunk(
    table, column, start, end, grad_mul, key,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MASTER_DTYPE: tl.constexpr,
    MASTER_MODE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_GRAD_MUL: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Elements [start, end) of the tensor in `column`, one BLOCK at a time. Whole blocks need no
    bounds mask, which keeps their loads and stores vectorised (a mask against a bound loaded at run
    time has unknown alignment); only the last block is masked."""
    param_ptr = _table_pointer(table, _ROW_PARAM, column, PARAM_DTYPE, ALIGNED)
    grad_ptr = _table_pointer(table, _ROW_GRAD, column, GRAD_DTYPE, ALIGNED)
    exp_avg_ptr = _table_pointer(table, _ROW_EXP_AVG, column, tl.float32, ALIGNED)
    exp_avg_sq_ptr = _table_pointer(table, _ROW_EXP_AVG_SQ, column, tl.float32, ALIGNED)
    master_ptr = _table_pointer(table, _ROW_MASTER, column, MASTER_DTYPE, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    full_end = start + (end - start) // BLOCK * BLOCK
    block_start = start
    # A while loop: Triton 3.6's interpreter cannot take `range()` of a run-time value under
    # numpy >= 2.4. The loop-carried start needs its multiple_of hint again in every iteration.
    while block_start < full_end:
        _adamw_block(
            tl.multiple_of(block_start, BLOCK) + lanes, None, param_ptr, grad_ptr, exp_avg_ptr,
            exp_avg_sq_ptr, master_ptr, grad_mul, key, beta1, one_minus_beta1, beta2, one_minus_beta2,
            eps, decay, step_size, bc2_sqrt, PARAM_DTYPE, MASTER_MODE, STOCHASTIC, HAS_GRAD_MUL,
        )  # fmt: skip
        block_start += BLOCK
    if full_end < end:
        tail_offs = full_end + lanes
        _adamw_block(
            tail_offs, tail_offs < end, param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr,
            grad_mul, key, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size,
            bc2_sqrt, PARAM_DTYPE, MASTER_MODE, STOCHASTIC, HAS_GRAD_MUL,
        )  # fmt: skip


# Values that change between calls or blocks are not specialised on (no recompile per block).
@triton.jit(do_not_specialize=["chunk", "grad_mul_ptr", "found_inf_ptr", "seed32", "step32"])
def _fused_adamw_kernel(
    table, chunk, grad_mul_ptr, found_inf_ptr, seed32, step32,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MASTER_DTYPE: tl.constexpr,
    MASTER_MODE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_GRAD_MUL: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # A skipped step (found_inf != 0) loads and writes nothing; the host never waits for the flag.
    keep = True
    if HAS_FOUND_INF:
        keep = tl.load(found_inf_ptr) == 0
    if keep:
        column, chunk_index = locate_chunk(table, _NUM_POINTERS)
        start = tl.multiple_of(chunk_index.to(tl.int64) * chunk, BLOCK)
        end = tl.minimum(start + chunk, table_entry(table, _ROW_NUMEL, column))
        grad_mul = 1.0
        if HAS_GRAD_MUL:
            grad_mul = tl.load(grad_mul_ptr)
        key = tl.zeros([], tl.uint32)
        if STOCHASTIC:
            key = _sr_key(seed32, step32, table_entry(table, _ROW_INDEX, column))
        # Alignment is decided per tensor, as in the CUDA kernel: the aligned branch is compiled
        # with vector accesses, the other with scalar ones in smaller blocks (utils.py says why).
        if vector_ok(table, column, _NUM_POINTERS):
            _adamw_chunk(
                table, column, start, end, grad_mul, key, beta1, one_minus_beta1, beta2, one_minus_beta2,
                eps, decay, step_size, bc2_sqrt, PARAM_DTYPE, GRAD_DTYPE, MASTER_DTYPE, MASTER_MODE,
                STOCHASTIC, HAS_GRAD_MUL, True, BLOCK,
            )  # fmt: skip
        else:
            _adamw_chunk(
                table, column, start, end, grad_mul, key, beta1, one_minus_beta1, beta2, one_minus_beta2,
                eps, decay, step_size, bc2_sqrt, PARAM_DTYPE, GRAD_DTYPE, MASTER_DTYPE, MASTER_MODE,
                STOCHASTIC, HAS_GRAD_MUL, False, BLOCK // 4,
            )  # fmt: skip


def _as_int32(value: int) -> int:
    """A uint32 as the int32 with the same bits: Triton types an int argument by its value, and an
    argument that is sometimes i32 and sometimes i64 would compile the kernel twice."""
    return value - (1 << 32) if value >= 1 << 31 else value


def fused_adamw_triton(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    masters: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    master_weights: str,
    stochastic_rounding: bool,
    seed: int,
    grad_mul: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """One AdamW step over lists of contiguous tensors, in place (arguments already validated).

    params: bf16/fp16/fp32 tensors; grads: bf16/fp16/fp32 with the same numels; exp_avgs,
    exp_avg_sqs: fp32; masters: fp32 ("fp32"), int16 ("remainder") or empty ("none").
    grad_mul / found_inf: optional 0-dim fp32 tensors on the params' device, read by the kernel.
    Tensors on CUDA, or on the CPU under TRITON_INTERPRET=1.
    """
    if not params:
        return
    # Python floats reach the kernel as fp32 arguments, rounded to nearest, the values
    # AdamScalars.as_fp32() gives (whose torch.tensor calls would cost 30 us per call here).
    scalars = AdamScalars.make(lr, beta1, beta2, eps, weight_decay, step)
    device = params[0].device
    groups = group_by([(p.dtype, g.dtype) for p, g in zip(params, grads)])
    for (param_dtype, grad_dtype), indices in groups.items():
        columns = [
            (
                params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                masters[i].data_ptr() if masters else 0, params[i].numel(), i,
            )
            for i in indices
        ]  # fmt: skip
        for launch in launch_tables(columns, NUM_POINTERS, device):
            with device_context(device):
                _fused_adamw_kernel[(launch.num_programs,)](
                    launch.table, launch.chunk, grad_mul, found_inf,
                    _as_int32(fold_seed(seed)), _as_int32(step & 0xFFFFFFFF),
                    scalars.beta1, scalars.one_minus_beta1, scalars.beta2, scalars.one_minus_beta2,
                    scalars.eps, scalars.decay, scalars.step_size, scalars.bc2_sqrt,
                    PARAM_DTYPE=TRITON_DTYPES[param_dtype], GRAD_DTYPE=TRITON_DTYPES[grad_dtype],
                    MASTER_DTYPE=_MASTER_DTYPES[master_weights],
                    MASTER_MODE=_MASTER_MODE_IDS[master_weights], STOCHASTIC=stochastic_rounding,
                    HAS_GRAD_MUL=grad_mul is not None, HAS_FOUND_INF=found_inf is not None,
                    BLOCK=utils.BLOCK, num_warps=utils.NUM_WARPS,
                    # No mul+add -> fma contraction: every backend rounds each op as adam_math.h does.
                    enable_fp_fusion=False,
                )  # fmt: skip

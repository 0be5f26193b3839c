"""Fused multi-tensor AdamW in Triton: one launch per (param dtype, grad dtype) group.

The math and the bit-level rounding are those of csrc/adam_math.h (see adam_math.py); the
launch layout is described in utils.py. Not autotuned: the kernel updates its inputs in place,
so every tuning run would apply the step again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from badam_kernels.triton_ops.adam_math import (
    adamw_update,
    fp32_to_bf16_stochastic,
    from_fp32_rne,
    remainder_decode,
    remainder_encode,
    sr_bits,
    to_fp32,
)
from badam_kernels.triton_ops.utils import (
    BLOCK,
    NUM_WARPS,
    TRITON_DTYPES,
    VECTOR_BYTES,
    build_launch_tables,
    device_context,
    group_by,
)

from badam_kernels.reference import AdamScalars, sr_key

# Rows of the tensor table (utils.py): five pointer rows, then numel and the stochastic-rounding key.
_ROW_PARAM = tl.constexpr(0)
_ROW_GRAD = tl.constexpr(1)
_ROW_EXP_AVG = tl.constexpr(2)
_ROW_EXP_AVG_SQ = tl.constexpr(3)
_ROW_MASTER = tl.constexpr(4)
_ROW_NUMEL = tl.constexpr(5)
_ROW_SR_KEY = tl.constexpr(6)

_VECTOR_BYTES = tl.constexpr(VECTOR_BYTES)
_MASTER_FP32 = tl.constexpr(1)
_MASTER_REMAINDER = tl.constexpr(2)
_MASTER_MODE_IDS = {"none": 0, "fp32": 1, "remainder": 2}
_MASTER_DTYPES = {"none": tl.float32, "fp32": tl.float32, "remainder": tl.int16}


@triton.jit
def _table_pointer(tensor_table, row, num_tensors, column, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(tensor_table + row * num_tensors + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, _VECTOR_BYTES)
    return ptr


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
def _fused_adamw_kernel(
    tensor_table, num_tensors, program_table, num_programs, chunk, grad_mul_ptr, found_inf_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MASTER_DTYPE: tl.constexpr,
    MASTER_MODE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_GRAD_MUL: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    column = tl.load(program_table + pid)
    start = tl.multiple_of(tl.load(program_table + num_programs + pid), BLOCK)
    numel = tl.load(tensor_table + _ROW_NUMEL * num_tensors + column)
    key = tl.load(tensor_table + _ROW_SR_KEY * num_tensors + column).to(tl.uint32)
    param_ptr = _table_pointer(tensor_table, _ROW_PARAM, num_tensors, column, PARAM_DTYPE, ALIGNED)
    grad_ptr = _table_pointer(tensor_table, _ROW_GRAD, num_tensors, column, GRAD_DTYPE, ALIGNED)
    exp_avg_ptr = _table_pointer(tensor_table, _ROW_EXP_AVG, num_tensors, column, tl.float32, ALIGNED)
    exp_avg_sq_ptr = _table_pointer(tensor_table, _ROW_EXP_AVG_SQ, num_tensors, column, tl.float32, ALIGNED)
    master_ptr = _table_pointer(tensor_table, _ROW_MASTER, num_tensors, column, MASTER_DTYPE, ALIGNED)
    grad_mul = 1.0
    if HAS_GRAD_MUL:
        grad_mul = tl.load(grad_mul_ptr)
    # A skipped step (found_inf != 0) loads and writes nothing; the host never waits for the flag.
    keep = True
    if HAS_FOUND_INF:
        keep = tl.load(found_inf_ptr) == 0
    if keep:
        # Whole blocks need no bounds mask, which keeps their loads and stores vectorised (a mask
        # against a numel loaded at run time has unknown alignment); only the last block is masked.
        end = tl.minimum(start + chunk, numel)
        lanes = tl.arange(0, BLOCK)
        num_full = (end - start) // BLOCK
        for b in range(num_full):
            _adamw_block(
                start + b * BLOCK + lanes, None, param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                master_ptr, grad_mul, key, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
                step_size, bc2_sqrt, PARAM_DTYPE, MASTER_MODE, STOCHASTIC, HAS_GRAD_MUL,
            )  # fmt: skip
        tail_offs = start + num_full * BLOCK + lanes
        if start + num_full * BLOCK < end:
            _adamw_block(
                tail_offs, tail_offs < end, param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                master_ptr, grad_mul, key, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
                step_size, bc2_sqrt, PARAM_DTYPE, MASTER_MODE, STOCHASTIC, HAS_GRAD_MUL,
            )  # fmt: skip


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
    scalars = AdamScalars.make(lr, beta1, beta2, eps, weight_decay, step).as_fp32()
    device = params[0].device
    groups = group_by([(p.dtype, g.dtype) for p, g in zip(params, grads)])
    for (param_dtype, grad_dtype), indices in groups.items():
        pointer_rows = [
            [params[i].data_ptr() for i in indices],
            [grads[i].data_ptr() for i in indices],
            [exp_avgs[i].data_ptr() for i in indices],
            [exp_avg_sqs[i].data_ptr() for i in indices],
            [masters[i].data_ptr() if masters else 0 for i in indices],
        ]
        numels = [params[i].numel() for i in indices]
        # The key depends on the tensor's index in the whole call, not in its dtype group.
        keys = [sr_key(seed, step, i) if stochastic_rounding else 0 for i in indices]
        tables = build_launch_tables(pointer_rows, [numels, keys], numels, device)
        if tables is None:  # only empty tensors
            continue
        with device_context(device):
            _fused_adamw_kernel[(tables.num_programs,)](
                tables.tensor_table, tables.num_tensors, tables.program_table, tables.num_programs,
                tables.chunk, grad_mul, found_inf,
                scalars.beta1, scalars.one_minus_beta1, scalars.beta2, scalars.one_minus_beta2,
                scalars.eps, scalars.decay, scalars.step_size, scalars.bc2_sqrt,
                PARAM_DTYPE=TRITON_DTYPES[param_dtype], GRAD_DTYPE=TRITON_DTYPES[grad_dtype],
                MASTER_DTYPE=_MASTER_DTYPES[master_weights],
                MASTER_MODE=_MASTER_MODE_IDS[master_weights], STOCHASTIC=stochastic_rounding,
                HAS_GRAD_MUL=grad_mul is not None, HAS_FOUND_INF=found_inf is not None,
                ALIGNED=tables.aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
                # No mul+add -> fma contraction: every backend rounds each op as adam_math.h does.
                enable_fp_fusion=False,
            )  # fmt: skip

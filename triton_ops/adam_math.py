"""Per-element AdamW math in Triton, mirroring csrc/adam_math.h operation for operation.

bf16 <-> fp32 conversions are done on raw bits (uint32 arithmetic) rather than with `.to()`:
that is the exact contract of adam_math.h, it costs a few integer ops in a memory-bound kernel,
and Triton's CPU interpreter does not round fp32 -> bf16 to nearest even (it rounds half up
and can drop the carry into the exponent), so `.to(tl.bfloat16)` would not be testable here.
Division and square root use the IEEE-rounded `div_rn` / `sqrt_rn`: Triton's plain `/` and
`sqrt` are approximate on GPUs and would not match the C++ and torch backends.
"""

import triton
import triton.language as tl


@triton.jit
def adamw_update(g, w, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt):
    """One AdamW step on fp32 blocks; returns the new (w, m, v). Order as in adam_math.h."""
    w = w * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    w = w - tl.div_rn(step_size * m, denom)
    return w, m, v


@triton.jit
def mix32(x):
    """lowbias32 hash on uint32 values (multiplications wrap modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def bf16_to_fp32(x):
    """Exact widening: the bf16 bits become the high half of the fp32 bits."""
    bits = x.to(tl.uint16, bitcast=True).to(tl.uint32)
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def _is_nan_bits(u):
    return (u & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def _quiet_nan_bf16_bits(u):
    # Keep sign and payload and set the quiet bit, so a NaN never rounds into infinity.
    return (u >> 16) | 0x0040


@triton.jit
def fp32_to_bf16_rne(w):
    """Round to nearest even (float_to_bf16_bits_rne)."""
    u = w.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    bits = tl.where(_is_nan_bits(u), _quiet_nan_bf16_bits(u), rounded)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def fp32_to_bf16_stochastic(w, random16):
    """One of the two bf16 neighbours, unbiased (float_to_bf16_bits_stochastic)."""
    u = w.to(tl.uint32, bitcast=True)
    rounded = (u + random16) >> 16
    bits = tl.where(_is_nan_bits(u), _quiet_nan_bf16_bits(u), rounded)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def sr_bits(key, index):
    """16 random bits for element `index` (int64; its low 32 bits are used) of a tensor."""
    return mix32(index.to(tl.uint32) ^ key) & 0xFFFF


@triton.jit
def remainder_decode(param, remainder):
    """bf16 param + int16 remainder -> the exact fp32 master (wrapping uint32 add)."""
    high = param.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    low = remainder.to(tl.int32).to(tl.uint32, bitcast=True)  # sign-extended, as in C++
    return (high + low).to(tl.float32, bitcast=True)


@triton.jit
def remainder_encode(w):
    """fp32 master -> (nearest bf16 param, ties away from zero; int16 remainder = low bits).
    A NaN master gives the quiet NaN param of fp32_to_bf16_rne: rounding up would carry the
    payload of 0x7FFFFFFF into the sign bit and make the weight -0.0."""
    u = w.to(tl.uint32, bitcast=True)
    low = u & 0xFFFF
    param_bits = tl.where(_is_nan_bits(u), _quiet_nan_bf16_bits(u), (u >> 16) + (low >> 15))
    param = param_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    remainder = low.to(tl.uint16).to(tl.int16, bitcast=True)
    return param, remainder


@triton.jit
def to_fp32(x):
    """Widen a loaded bf16/fp16/fp32 block to fp32 exactly."""
    if x.dtype == tl.bfloat16:
        return bf16_to_fp32(x)
    else:
        return x.to(tl.float32)


@triton.jit
def from_fp32_rne(w, DTYPE: tl.constexpr):
    """Round an fp32 block to DTYPE (bf16/fp16/fp32) to nearest even."""
    if DTYPE == tl.bfloat16:
        return fp32_to_bf16_rne(w)
    else:
        return w.to(DTYPE)


@triton.jit
def sparse_adam_update(g, w, m, v, one_minus_beta1, one_minus_beta2, eps, step_size):
    """One SparseAdam step (badam's ratio mode) on fp32 blocks; returns the new (w, m, v). Order
    as in adam_math.h's sparse_adam_update."""
    m = m + (g - m) * one_minus_beta1
    v = v + (g * g - v) * one_minus_beta2
    w = w - step_size * tl.div_rn(m, tl.sqrt_rn(v) + eps)
    return w, m, v

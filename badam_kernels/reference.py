"""Pure-torch AdamW math: the oracle for every kernel, and the "torch" backend.

Everything here mirrors csrc/adam_math.h operation for operation. `fused_adamw_reference`
computes in a chosen dtype (fp32 for the backend, fp64 for tests); in fp32 it gives the kernels'
bits exactly (NaN included), on any machine. The bit-level helpers (bf16 rounding, remainder
encoding, stochastic rounding, the hash) use integer tensor ops so they give the exact bits the
kernels must give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class AdamScalars:
    """Per-call constants, computed in double on the host; kernels receive them as fp32."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    decay: float
    step_size: float
    bc2_sqrt: float

    @staticmethod
    def make(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int):
        return AdamScalars(
            beta1=beta1,
            one_minus_beta1=1.0 - beta1,
            beta2=beta2,
            one_minus_beta2=1.0 - beta2,
            eps=eps,
            decay=1.0 - lr * weight_decay,
            step_size=lr / (1.0 - beta1**step),
            bc2_sqrt=math.sqrt(1.0 - beta2**step),
        )

    def as_fp32(self) -> AdamScalars:
        """The same constants rounded to fp32, as the kernels see them."""
        f = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
        return AdamScalars(*(f(getattr(self, k)) for k in self.__dataclass_fields__))


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """IEEE (correctly rounded) square root, as sqrtf in adam_math.h. torch's own fp32 sqrt on x86
    CPUs is not: it is one ulp off for about 17% of inputs (measured with torch 2.13 on AMD EPYC,
    also with ATEN_CPU_CAPABILITY=default). The fp64 root of an fp32 number rounded to fp32 is the
    correctly rounded fp32 root (53 >= 2 * 24 + 2 bits)."""
    if x.dtype == torch.float32:
        return x.double().sqrt().to(torch.float32)
    return x.sqrt()


def adamw_math(g, w, m, v, s: AdamScalars):
    """One AdamW update on whole tensors (any float dtype); returns new (w, m, v)."""
    w = w * s.decay
    m = s.beta1 * m + s.one_minus_beta1 * g
    v = s.beta2 * v + s.one_minus_beta2 * g * g
    # Divided by a 0-dim tensor on the device, not a Python number: torch's CUDA division by a
    # CPU scalar multiplies by its reciprocal, which is not the IEEE quotient.
    denom = sqrt_rn(v) / v.new_full((), s.bc2_sqrt) + s.eps
    w = w - (s.step_size * m) / denom
    return w, m, v


# ---- bit-level helpers (int64 tensor arithmetic, masked to 32 bits) ----


def float_to_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 tensor -> its bit pattern as non-negative int64."""
    return x.to(torch.float32).view(torch.int32).to(torch.int64) & MASK32


def bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns (low 32 bits) -> fp32 tensor."""
    bits = bits & MASK32
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    return signed.to(torch.int32).view(torch.float32)


def bf16_to_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16).to(torch.int64) & 0xFFFF


def bits_to_bf16(bits: torch.Tensor) -> torch.Tensor:
    bits = bits & 0xFFFF
    return torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16).view(torch.bfloat16)


def _is_nan_bits(u: torch.Tensor) -> torch.Tensor:
    return (u & 0x7FFFFFFF) > 0x7F800000


def _quiet_nan_bf16_bits(u: torch.Tensor) -> torch.Tensor:
    """The bf16 a NaN becomes: its sign and high payload bits with the quiet bit set, so no
    rounding carry can turn it into an infinity or (through the sign bit) into a zero."""
    return (u >> 16) | 0x0040


def round_bf16_rne(w: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 to nearest even (float_to_bf16_bits_rne). torch's cast gives the same bits
    except for NaN, which it makes 0x7FC0 or 0xFFFF depending on the CPU code path."""
    return torch.where(w.isnan(), bits_to_bf16(_quiet_nan_bf16_bits(float_to_bits(w))), w.to(torch.bfloat16))


def remainder_decode(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """bf16 param + int16 remainder -> the exact fp32 master."""
    return bits_to_float((bf16_to_bits(param) << 16) + remainder.to(torch.int64))


def remainder_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 master -> (nearest bf16 param, ties away from zero; int16 remainder = low bits).
    A NaN master gives a NaN param (see remainder_encode in adam_math.h)."""
    u = float_to_bits(w)
    lo = u & 0xFFFF
    param = bits_to_bf16(torch.where(_is_nan_bits(u), _quiet_nan_bf16_bits(u), (u >> 16) + (lo >> 15)))
    remainder = torch.where(lo >= 2**15, lo - 2**16, lo).to(torch.int16)
    return param, remainder


def mix32(x):
    """lowbias32 hash; works on Python ints and on int64 tensors."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    x = x ^ (x >> 16)
    return x


def fold_seed(seed: int) -> int:
    return (seed ^ (seed >> 32)) & MASK32


def sr_key(seed: int, step: int, tensor_index: int) -> int:
    return mix32(fold_seed(seed) ^ mix32((step & MASK32) ^ mix32(tensor_index ^ 0x9E3779B9)))


def sr_bits(key: int, numel: int, device) -> torch.Tensor:
    """16 random bits per element index 0..numel-1 (index taken modulo 2**32)."""
    index = torch.arange(numel, dtype=torch.int64, device=device) & MASK32
    return mix32(index ^ key) & 0xFFFF


def round_bf16_stochastic(w: torch.Tensor, random16: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, one of the two neighbours, unbiased; NaN stays NaN (the quiet NaN of
    round_bf16_rne)."""
    u = float_to_bits(w)
    return bits_to_bf16(
        torch.where(_is_nan_bits(u), _quiet_nan_bf16_bits(u), (u + random16.view(w.shape)) >> 16)
    )


def _round_to(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The param written back: bf16 by round_bf16_rne, fp16/fp32/fp64 by torch's IEEE cast."""
    return round_bf16_rne(w.to(torch.float32)) if dtype == torch.bfloat16 else w.to(dtype)


# ---- the whole op ----


def fused_adamw_reference(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    masters,
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
    compute_dtype: torch.dtype = torch.float32,
):
    """Compute one step out of place; returns (new_params, new_exp_avgs, new_exp_avg_sqs,
    new_masters), each a list with the input dtypes. Inputs are not modified.

    `compute_dtype=torch.float64` gives the oracle the tests compare kernels with; fp32 gives
    the "torch" backend. found_inf is applied with torch.where so no host sync happens.
    """
    scalars = AdamScalars.make(lr, beta1, beta2, eps, weight_decay, step)
    if compute_dtype == torch.float32:
        scalars = scalars.as_fp32()
    new_p, new_m, new_v, new_master = [], [], [], []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        g = g.to(compute_dtype)
        if grad_mul is not None:
            g = g * grad_mul.to(compute_dtype)
        if master_weights == "fp32":
            w = masters[i]
        elif master_weights == "remainder":
            w = remainder_decode(p, masters[i])
        else:
            w = p
        w, m2, v2 = adamw_math(g, w.to(compute_dtype), m.to(compute_dtype), v.to(compute_dtype), scalars)
        w32 = w.to(torch.float32)
        if master_weights == "fp32":
            p2, master2 = _round_to(w32, p.dtype), w32
        elif master_weights == "remainder":
            p2, master2 = remainder_encode(w32)
        elif p.dtype == torch.bfloat16 and stochastic_rounding:
            random16 = sr_bits(sr_key(seed, step, i), p.numel(), p.device)
            p2, master2 = round_bf16_stochastic(w32, random16), None
        else:
            p2, master2 = _round_to(w, p.dtype), None
        outs = [p2, m2.to(torch.float32), v2.to(torch.float32)] + ([master2] if master2 is not None else [])
        olds = [p, m, v] + ([masters[i]] if master2 is not None else [])
        if found_inf is not None:
            skip = found_inf.reshape(()) != 0
            outs = [torch.where(skip, old, new.to(old.dtype)) for old, new in zip(olds, outs)]
        new_p.append(outs[0].to(p.dtype))
        new_m.append(outs[1])
        new_v.append(outs[2])
        if master2 is not None:
            new_master.append(outs[3].to(masters[i].dtype))
    return new_p, new_m, new_v, new_master


def grad_norm_reference(tensors, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L2 norm over all elements of all tensors, as a 0-dim fp32 tensor."""
    total = torch.zeros((), dtype=compute_dtype, device=tensors[0].device)
    for t in tensors:
        total = total + t.to(compute_dtype).square().sum()
    return total.sqrt().to(torch.float32)


# ---- SparseAdam (badam's ratio mode): csrc/adam_math.h sparse_adam_update ----


@dataclass(frozen=True)
class SparseAdamScalars:
    """Per-call constants of SparseAdam, computed in double on the host as badam does."""

    one_minus_beta1: float
    one_minus_beta2: float
    eps: float
    step_size: float

    @staticmethod
    def make(lr: float, beta1: float, beta2: float, eps: float, step: int) -> SparseAdamScalars:
        step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        return SparseAdamScalars(1.0 - beta1, 1.0 - beta2, eps, step_size)

    def as_fp32(self) -> SparseAdamScalars:
        """The same constants rounded to fp32, as the kernels (and torch's scalar ops) see them."""
        return SparseAdamScalars(*(_round_to_fp32(getattr(self, k)) for k in self.__dataclass_fields__))


def _round_to_fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def sparse_adam_math(g, w, m, v, s: SparseAdamScalars):
    """One SparseAdam update on fp32 tensors (torch.optim.SparseAdam's operation order: eps
    outside the bias correction, no weight decay); returns new (w, m, v)."""
    m = m + (g - m) * s.one_minus_beta1
    v = v + (g * g - v) * s.one_minus_beta2
    w = w - s.step_size * (m / (sqrt_rn(v) + s.eps))
    return w, m, v


def _read_weight(selected: torch.Tensor, master: torch.Tensor | None, master_weights: str) -> torch.Tensor:
    """The fp32 weight of the selected param entries under a master mode (DESIGN.md)."""
    if master_weights == "fp32":
        return master
    if master_weights == "remainder":
        return remainder_decode(selected, master)
    return selected


def _write_weight(w32: torch.Tensor, param_dtype: torch.dtype, master_weights: str):
    """(new param entries, new master or None) for the fp32 weight `w32`."""
    if master_weights == "fp32":
        return _round_to(w32, param_dtype), w32
    if master_weights == "remainder":
        return remainder_encode(w32)
    return _round_to(w32, param_dtype), None


def sparse_adam_reference(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    masters,
    indices,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    master_weights: str,
    grad_mul: torch.Tensor | None,
):
    """SparseAdam on selected entries in fp32, out of place; returns (new_params, new_exp_avgs,
    new_exp_avg_sqs, new_masters) with the input dtypes. Inputs are not modified.

    `indices` is empty (grads[i] and the state cover params[i] element for element) or holds one
    int32/int64 tensor per param: grads[i][k] and the state's element k belong to
    params[i].view(-1)[indices[i][k]]. Indices must be unique. For fp32 params this is
    torch.optim.SparseAdam's result wherever torch's own sqrt is correctly rounded (see sqrt_rn).
    """
    scalars = SparseAdamScalars.make(lr, beta1, beta2, eps, step).as_fp32()
    new_p, new_m, new_v, new_master = [], [], [], []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        flat = p.reshape(-1)
        index = indices[i].reshape(-1).long() if indices else None
        selected = flat if index is None else flat[index]
        g = g.reshape(-1).float()
        if grad_mul is not None:
            g = g * grad_mul
        master = masters[i].reshape(-1) if master_weights != "none" else None
        w = _read_weight(selected, master, master_weights).float()
        w, m2, v2 = sparse_adam_math(g, w, m.reshape(-1), v.reshape(-1), scalars)
        selected2, master2 = _write_weight(w, p.dtype, master_weights)
        flat2 = selected2 if index is None else flat.clone().index_copy_(0, index, selected2)
        new_p.append(flat2.view(p.shape))
        new_m.append(m2.view(m.shape))
        new_v.append(v2.view(v.shape))
        if master2 is not None:
            new_master.append(master2.to(masters[i].dtype).view(masters[i].shape))
    return new_p, new_m, new_v, new_master

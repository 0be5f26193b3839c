"""Every CPU kernel set (AVX-512, AVX2, scalar) on every machine, and the Triton kernel under its
interpreter, bit for bit against the contract.

The CPU extension picks its kernel set when an op runs (csrc/cpu/isa_select.cpp): the best the CPU
supports, or the one BADAM_KERNELS_CPU_ISA names. These tests force each set in turn through that
variable and check with `badam_kernels::cpu_kernel_isa` (the op reporting the set the CPU ops run)
that the override took effect. A set is skipped only when this CPU cannot execute it, which is
decided from /proc/cpuinfo, independently of the extension's own detection.

Oracle: reference.py in fp32, which gives the bits of csrc/adam_math.h (IEEE add, mul, div and
sqrt in its order, the integer bf16 rounding, remainder encoding and stochastic-rounding hash).
Every step is compared from the state the kernel produced in the previous step.
"""

from __future__ import annotations

import math

import pytest
import torch
from backend_targets import CPU_ISAS, cpu_can_execute, cpu_kernel_isa, force_cpu_isa, skip_unless_available

from badam_kernels import fused_adamw_, grad_norm, reference
from badam_kernels.verification import ALL_WEIGHT_MODE_IDS, ALL_WEIGHT_MODES, bits

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MODES, MODE_IDS = ALL_WEIGHT_MODES, ALL_WEIGHT_MODE_IDS
# Sizes around the vector widths (8, 16) and the 32-byte alignment of the streaming stores, and
# one spanning three 32K-element chunks of the parallel loop.
SIZES = [1, 7, 8, 9, 15, 16, 17, 31, 33, 1023, 70001]


@pytest.fixture(params=CPU_ISAS)
def isa(request, monkeypatch) -> str:
    """Each CPU kernel set, forced with BADAM_KERNELS_CPU_ISA and checked to be the one running."""
    force_cpu_isa(monkeypatch, request.param)
    yield request.param
    assert cpu_kernel_isa() == request.param


# ---- the override itself -------------------------------------------------------------------------


@pytest.mark.parametrize("name", CPU_ISAS)
def test_override_takes_effect_or_fails_loudly(monkeypatch, name):
    """A forced kernel set runs, or the op says why it cannot: never silently another one."""
    skip_unless_available("cpu", "cpu")
    monkeypatch.setenv("BADAM_KERNELS_CPU_ISA", name)
    if cpu_can_execute(name):
        assert cpu_kernel_isa() == name
    else:
        with pytest.raises(RuntimeError, match=f"BADAM_KERNELS_CPU_ISA={name} but this CPU lacks"):
            cpu_kernel_isa()
        with pytest.raises(RuntimeError, match=f"BADAM_KERNELS_CPU_ISA={name} but this CPU lacks"):
            grad_norm([torch.ones(3)], backend="cpu")


@pytest.mark.parametrize("setting", [None, "auto"])
def test_default_is_the_widest_set_the_cpu_executes(monkeypatch, setting):
    skip_unless_available("cpu", "cpu")
    if setting is None:
        monkeypatch.delenv("BADAM_KERNELS_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("BADAM_KERNELS_CPU_ISA", setting)
    widest = next(name for name in CPU_ISAS if cpu_can_execute(name))
    assert cpu_kernel_isa() == widest


def test_unknown_override_is_an_error(monkeypatch):
    skip_unless_available("cpu", "cpu")
    monkeypatch.setenv("BADAM_KERNELS_CPU_ISA", "AVX512")
    with pytest.raises(ValueError, match="must be avx512, avx2, scalar or auto, got 'AVX512'"):
        cpu_kernel_isa()
    with pytest.raises(ValueError, match="must be avx512, avx2, scalar or auto"):
        fused_adamw_([torch.ones(3)], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)], lr=1e-3, step=1,
                     backend="cpu")  # fmt: skip


# ---- fused_adamw_ bit for bit ----------------------------------------------------------------------


def _misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of `t` starting `offset` elements into a fresh buffer, so the kernels see
    data pointers at every alignment (their scalar head and tail, and the streaming-store peel)."""
    buffer = torch.empty(t.numel() + offset, dtype=t.dtype)
    out = buffer[offset:]
    out.copy_(t)
    return out


def _random_state(sizes, param_dtype, mode, grad_dtype, gen):
    """Params, grads and non-trivial Adam state and masters (masters off the param by up to a few
    bf16 ulps, random remainders), each tensor at its own alignment."""
    params, grads, exp_avgs, exp_avg_sqs, masters = [], [], [], [], []
    for i, n in enumerate(sizes):
        offset = i % 5
        p32 = torch.randn(n, generator=gen) * (0.02 if i % 2 else 1.0)
        params.append(_misaligned(p32.to(param_dtype), offset))
        magnitude = 10.0 ** (-3.0 * torch.rand(n, generator=gen))
        grads.append(_misaligned((torch.randn(n, generator=gen) * magnitude).to(grad_dtype), offset + 1))
        exp_avgs.append(_misaligned(torch.randn(n, generator=gen) * 1e-2, offset + 2))
        exp_avg_sqs.append(_misaligned(torch.rand(n, generator=gen) * 1e-4, offset + 3))
        if mode == "fp32":
            masters.append(_misaligned(p32 * (1 + torch.randn(n, generator=gen) * 2**-9), offset))
        elif mode == "remainder":
            remainders = torch.randint(-(2**15), 2**15, (n,), generator=gen, dtype=torch.int16)
            masters.append(_misaligned(remainders, offset + 4))
    return params, grads, exp_avgs, exp_avg_sqs, masters


def _assert_bits_equal(name: str, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype, f"{name}[{i}]: dtype {g.dtype}, expected {w.dtype}"
        differ = bits(g) != bits(w)
        if differ.any():
            j = int(differ.nonzero()[0])
            raise AssertionError(
                f"{name}[{i}]: {int(differ.sum())} of {g.numel()} elements differ from the contract; "
                f"first at {j}: got {g[j].item()!r} ({int(bits(g)[j]):#x}), expected {w[j].item()!r} "
                f"({int(bits(w)[j]):#x})"
            )


def check_bits_against_reference(backend: str, param_dtype, mode, stochastic, grad_dtype, sizes, seed=0):
    """Two steps (the second with a grad_mul) of `backend` on CPU tensors, each compared bit for
    bit with reference.py in fp32 on the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    params, grads, exp_avgs, exp_avg_sqs, masters = _random_state(sizes, param_dtype, mode, grad_dtype, gen)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, master_weights=mode,
                 stochastic_rounding=stochastic, seed=1234)  # fmt: skip
    for step in (1, 2):
        args = dict(step=step, grad_mul=torch.tensor(0.37) if step == 2 else None, found_inf=None, **hyper)
        expected = reference.fused_adamw_reference(params, grads, exp_avgs, exp_avg_sqs, masters, **args)
        fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, masters=masters or None, backend=backend, **args)
        for name, got, want in zip(("params", "exp_avgs", "exp_avg_sqs", "masters"),
                                   (params, exp_avgs, exp_avg_sqs, masters), expected):  # fmt: skip
            _assert_bits_equal(f"step {step} {name}", got, want)
        grads = [g.roll(1) for g in grads]


@pytest.mark.parametrize("grad_dtype", [BF16, FP16, FP32], ids=["grad_bf16", "grad_fp16", "grad_fp32"])
@pytest.mark.parametrize(("param_dtype", "mode", "stochastic"), MODES, ids=MODE_IDS)
def test_fused_adamw_bits_equal_reference(isa, param_dtype, mode, stochastic, grad_dtype):
    check_bits_against_reference("cpu", param_dtype, mode, stochastic, grad_dtype, SIZES)


# ---- grad_norm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=["bf16", "fp16", "fp32"])
def test_grad_norm_of_integers_is_exact(isa, dtype):
    """Entries in {+-1, +-2, +-3}: every partial sum of squares is an integer below 2**24, exact in
    fp32 lanes and in double whatever the lane layout, so each kernel set must return exactly the
    fp32 rounding of sqrt(sum). (Other data: the lane layout, hence the rounding of the sum,
    differs between the sets; the contract there is the fp64 norm within 1e-5, checked below.)"""
    gen = torch.Generator().manual_seed(40)
    sizes = [1, 7, 15, 16, 17, 1023, 0, 70001, 100003]
    tensors = []
    for i, n in enumerate(sizes):
        values = torch.randint(1, 4, (n,), generator=gen) * (2 * torch.randint(0, 2, (n,), generator=gen) - 1)
        tensors.append(_misaligned(values.to(dtype), i % 3))
    exact_sum = sum(int((t.long() ** 2).sum()) for t in tensors)
    assert exact_sum < 2**24
    got = grad_norm(tensors, backend="cpu")
    assert bits(got) == bits(torch.tensor(math.sqrt(exact_sum), dtype=FP32))


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=["bf16", "fp16", "fp32"])
def test_grad_norm_matches_fp64(isa, dtype):
    gen = torch.Generator().manual_seed(41)
    tensors = [_misaligned((torch.randn(n, generator=gen) * 0.01).to(dtype), n % 3) for n in SIZES]
    expected = reference.grad_norm_reference(tensors, compute_dtype=torch.float64)
    torch.testing.assert_close(grad_norm(tensors, backend="cpu"), expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize(("param_dtype", "mode", "stochastic"), MODES, ids=MODE_IDS)
def test_triton_interpreter_bits_equal_reference(param_dtype, mode, stochastic):
    """The Triton kernel under its CPU interpreter follows the same contract, bit for bit."""
    skip_unless_available("cpu", "triton")
    check_bits_against_reference("triton", param_dtype, mode, stochastic, BF16, SIZES)

"""NaN and Inf safety of fused_adamw_ (and sparse_adam_) in every master mode, on every backend
and CPU kernel set.

A NaN gradient makes the weight NaN, and it must stay NaN: in the param the model reads, in the
fp32 master and in the remainder encoding (a GPU's arithmetic turns every NaN into 0x7fffffff,
whose rounding used to carry into the sign bit and give -0.0, a silently zeroed weight). An inf
gradient gives inf/inf in the update, a NaN weight too. Elements next to them must be untouched.
fp32 gradients carry the NaN payloads that trip bit-level rounding (0x7fffffff, the x86 default
0xffc00000, 0x7fc00000, signalling 0x7f800001) and +-inf, in the SIMD body and in the scalar tail.

On CPU the results are also compared bit for bit with reference.py in fp32, which defines the NaN
bits of bf16 params (csrc/adam_math.h: sign and high payload with the quiet bit set); fp16 NaN
payloads are left to the hardware conversion, so fp16 params are only checked to be NaN.
"""

from __future__ import annotations

import pytest
import torch
from backend_targets import CPU_ISAS, force_cpu_isa, skip_unless_available

from badam_kernels import fused_adamw_, reference, sparse_adam_
from badam_kernels.verification import ALL_WEIGHT_MODE_IDS, ALL_WEIGHT_MODES, bits

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MODES, MODE_IDS = ALL_WEIGHT_MODES, ALL_WEIGHT_MODE_IDS
# Triton's interpreter computes with numpy, which warns about the inf * 0 and inf / inf provoked here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
# (device, backend, CPU kernel set or None)
TARGETS = [("cpu", "cpu", isa) for isa in CPU_ISAS] + [
    ("cpu", "triton", None),
    ("cpu", "torch", None),
    ("cuda", "cuda", None),
    ("cuda", "triton", None),
    ("cuda", "torch", None),
]
TARGET_IDS = [f"{d}-{b}" + (f"-{isa}" if isa else "") for d, b, isa in TARGETS]
SPECIAL_GRAD_BITS = [
    0x7FFFFFFF,
    0xFFFFFFFF,
    0x7FC00000,
    0xFFC00000,
    0x7F800001,
    0xFF800001,
    0x7F800000,
    0xFF800000,
]
NUMEL = 45  # two 16-lane (or four 8-lane) vectors and a 13-element scalar tail
SPECIAL_AT = [1 + 4 * k for k in range(8)] + list(range(33, 41))  # each value in the body and in the tail


@pytest.fixture(params=TARGETS, ids=TARGET_IDS)
def where(request, monkeypatch) -> tuple[torch.device, str]:
    device, backend, isa = request.param
    if isa is None:
        skip_unless_available(device, backend)
    else:
        force_cpu_isa(monkeypatch, isa)
    return torch.device(device), backend


def f32_from_bits(values: list[int]) -> torch.Tensor:
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32).view(FP32)


def _state(param_dtype, mode, gen):
    weights = torch.randn(NUMEL, generator=gen) * 0.5
    params = weights.to(param_dtype)
    masters = {
        "none": None,
        "fp32": weights.clone(),
        "remainder": torch.randint(-(2**15), 2**15, (NUMEL,), generator=gen, dtype=torch.int16),
    }[mode]
    return params, torch.randn(NUMEL, generator=gen) * 1e-3, torch.rand(NUMEL, generator=gen) * 1e-6, masters


def _weights(params: torch.Tensor, masters: torch.Tensor | None, mode: str) -> torch.Tensor:
    if mode == "fp32":
        return masters
    if mode == "remainder":
        return reference.remainder_decode(params, masters)
    return params.float()


def _run(where, param_dtype, mode, stochastic, params, grads, exp_avg, exp_avg_sq, masters, step):
    """One step of the backend under test and of reference.py (fp32) on copies of the inputs, on
    the target's device; returns both results as CPU tensors [param, exp_avg, exp_avg_sq, master]."""
    device, backend = where
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step,
                 master_weights=mode, stochastic_rounding=stochastic, seed=7)  # fmt: skip
    state = [t.to(device) for t in (params, exp_avg, exp_avg_sq)] + (
        [] if masters is None else [masters.to(device)]
    )
    grads = grads.to(device)
    expected = reference.fused_adamw_reference(
        [state[0]], [grads], [state[1]], [state[2]], None if masters is None else [state[3]],
        grad_mul=None, found_inf=None, **hyper,
    )  # fmt: skip
    fused_adamw_([state[0]], [grads], [state[1]], [state[2]], masters=None if masters is None else [state[3]],
                 backend=backend, **hyper)  # fmt: skip
    got = [t.cpu() for t in state]
    want = [t[0].cpu() for t in expected if t]
    return got, want


def _check(where, param_dtype, mode, got, want, nan_at: torch.Tensor, nan_bits: bool = True) -> None:
    """NaN exactly where `nan_at` says, in the param and the weight (master or decoded remainder);
    on CPU every bit as reference.py. NaN bits are compared only with `nan_bits`, for NaNs with a
    single source: when two NaN operands meet (a NaN weight minus a NaN update), which payload
    survives depends on the instruction (x86 returns the first operand of a subtraction, an FMA
    the multiplicand), so torch and the kernels may legitimately differ. fp16 NaN payloads are
    never compared (the hardware conversion chooses them)."""
    device, _ = where
    param, master = got[0], (got[3] if len(got) > 3 else None)
    weight = _weights(param, master, mode)
    for name, t in (("param", param), ("weight", weight)):
        wrong = t.isnan() != nan_at
        assert not wrong.any(), (
            f"{name}: NaN expected at {nan_at.nonzero().flatten().tolist()}, got NaN at "
            f"{t.isnan().nonzero().flatten().tolist()} (bits {[hex(int(b)) for b in bits(t)[wrong]]})"
        )
    if device.type != "cpu":
        return  # GPUs make every NaN 0x7fffffff in arithmetic; the bits differ from the CPU's
    for name, g, w in zip(("param", "exp_avg", "exp_avg_sq", "master"), got, want):
        if not nan_bits or (name == "param" and g.dtype == FP16):
            both_nan = g.isnan() & w.isnan() if g.is_floating_point() else nan_at
            assert torch.equal(g.isnan(), w.isnan()) or not g.is_floating_point(), f"{name}: NaN elsewhere"
            g, w = g[~both_nan], w[~both_nan]
        assert torch.equal(bits(g), bits(w)), f"{name}: bits differ from reference.py at " + str(
            (bits(g) != bits(w)).nonzero().flatten().tolist()
        )


@pytest.mark.parametrize(("param_dtype", "mode", "stochastic"), MODES, ids=MODE_IDS)
def test_nan_and_inf_gradients_make_nan_weights_that_stay_nan(where, param_dtype, mode, stochastic):
    gen = torch.Generator().manual_seed(90)
    params, exp_avg, exp_avg_sq, masters = _state(param_dtype, mode, gen)
    grads = torch.randn(NUMEL, generator=gen) * 1e-2
    grads[SPECIAL_AT] = f32_from_bits(SPECIAL_GRAD_BITS * 2)
    nan_at = torch.zeros(NUMEL, dtype=torch.bool)
    nan_at[SPECIAL_AT] = True

    got, want = _run(
        where, param_dtype, mode, stochastic, params, grads, exp_avg, exp_avg_sq, masters, step=1
    )
    _check(where, param_dtype, mode, got, want, nan_at)
    assert (~got[1].isfinite()).equal(nan_at) and (~got[2].isfinite()).equal(nan_at)  # inf grads: inf state

    # The next step, with ordinary gradients, starts from what the kernel stored (the NaN in the
    # param and remainder encoding) and must keep exactly those weights NaN.
    grads = torch.randn(NUMEL, generator=gen) * 1e-2
    got, want = _run(where, param_dtype, mode, stochastic, got[0], grads, got[1], got[2],
                     got[3] if masters is not None else None, step=2)  # fmt: skip
    _check(where, param_dtype, mode, got, want, nan_at, nan_bits=False)


# Weights that are already NaN or inf, with ordinary gradients and Adam state: NaN stays NaN and
# inf stays inf (decay and a finite update leave it infinite). 0x7fffffff is what a GPU stores.
SPECIAL_WEIGHT_BITS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7FBFFFFF, 0x7F800000, 0xFF800000]


@pytest.mark.parametrize(("param_dtype", "mode", "stochastic"), MODES, ids=MODE_IDS)
def test_nan_and_inf_weights_stay_nan_and_inf(where, param_dtype, mode, stochastic):
    gen = torch.Generator().manual_seed(91)
    params, exp_avg, exp_avg_sq, masters = _state(param_dtype, mode, gen)
    at = SPECIAL_AT[: len(SPECIAL_WEIGHT_BITS)] + SPECIAL_AT[8 : 8 + len(SPECIAL_WEIGHT_BITS)]
    special = f32_from_bits(SPECIAL_WEIGHT_BITS * 2)
    if mode == "fp32":
        masters[at] = special
        params = reference.round_bf16_rne(masters) if param_dtype == BF16 else masters.to(param_dtype)
    elif mode == "remainder":
        params[at], masters[at] = reference.remainder_encode(special)
    else:
        params[at] = special.to(param_dtype)
    start = _weights(params, masters, mode)
    assert start[at].isnan().sum() == 10 and start[at].isinf().sum() == 4  # the encoding kept them
    grads = torch.randn(NUMEL, generator=gen) * 1e-2

    got, want = _run(
        where, param_dtype, mode, stochastic, params, grads, exp_avg, exp_avg_sq, masters, step=3
    )
    _check(where, param_dtype, mode, got, want, start.isnan())
    weight = _weights(got[0], got[3] if masters is not None else None, mode)
    assert torch.equal(weight.isinf(), start.isinf()) and torch.equal(
        weight[start.isinf()], start[start.isinf()]
    )
    assert torch.equal(got[0].isinf(), start.isinf())


@pytest.mark.parametrize(
    "value_bits", [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0x7F80FFFF],
    ids=lambda b: f"{b:#010x}",
)  # fmt: skip
def test_reference_encoders_keep_nan(value_bits):
    """The bit-level encoders of reference.py (the CPU and CUDA kernels share adam_math.h's)."""
    value = f32_from_bits([value_bits] * 4)
    param, remainder = reference.remainder_encode(value)
    assert param.isnan().all() and reference.remainder_decode(param, remainder).isnan().all()
    quiet = (value_bits >> 16) | 0x0040
    assert int(bits(param)[0]) & 0xFFFF == quiet
    assert int(bits(reference.round_bf16_rne(value))[0]) & 0xFFFF == quiet
    random16 = torch.tensor([0, 1, 0x8000, 0xFFFF], dtype=torch.int64)
    assert (bits(reference.round_bf16_stochastic(value, random16)) & 0xFFFF == quiet).all()


SPARSE_MODES = [(BF16, "none"), (BF16, "fp32"), (BF16, "remainder"), (FP32, "none")]


@pytest.mark.parametrize("indexed", [False, True], ids=["run", "indexed"])
@pytest.mark.parametrize(("param_dtype", "mode"), SPARSE_MODES, ids=[f"{d}-{m}" for d, m in SPARSE_MODES])
def test_sparse_adam_nan_gradients_make_nan_weights(where, param_dtype, mode, indexed):
    """sparse_adam_ (ratio mode) writes through the same encoders: NaN and inf gradients give NaN
    weights exactly at the selected entries they hit, the other entries untouched, and on CPU the
    bits of reference.py."""
    device, backend = where
    gen = torch.Generator().manual_seed(92)
    params, _, _, masters = _state(param_dtype, mode, gen)
    index = torch.randperm(NUMEL, generator=gen)[:24].sort().values.to(torch.int32)
    selected = index.long() if indexed else torch.arange(NUMEL)
    count = len(selected)
    grads = torch.randn(count, generator=gen) * 1e-2
    hit = torch.arange(0, count, 3)  # every third selected entry gets a special gradient
    grads[hit] = f32_from_bits((SPECIAL_GRAD_BITS * 2)[: len(hit)])
    exp_avg, exp_avg_sq = torch.zeros(count), torch.zeros(count)
    if masters is not None:
        masters = masters[selected].clone()
    state = [t.to(device) for t in (params, exp_avg, exp_avg_sq)] + (
        [] if masters is None else [masters.to(device)]
    )
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1, master_weights=mode)
    want = reference.sparse_adam_reference(
        [state[0]], [grads.to(device)], [state[1]], [state[2]], None if masters is None else [state[3]],
        [index.to(device)] if indexed else [], grad_mul=None, **hyper,
    )  # fmt: skip
    sparse_adam_(
        [state[0]], [grads.to(device)], [state[1]], [state[2]],
        indices=[index.to(device)] if indexed else None,
        masters=None if masters is None else [state[3]], backend=backend, **hyper,
    )  # fmt: skip
    nan_at = torch.zeros(NUMEL, dtype=torch.bool)
    nan_at[selected[hit]] = True
    param = state[0].cpu()
    assert torch.equal(param.isnan(), nan_at), f"NaN at {param.isnan().nonzero().flatten().tolist()}"
    untouched = torch.ones(NUMEL, dtype=torch.bool)
    untouched[selected] = False
    assert torch.equal(bits(param[untouched]), bits(params[untouched]))
    if device.type == "cpu":
        for name, got, expected in zip(
            ("param", "exp_avg", "exp_avg_sq", "master"), state, [t[0] for t in want if t]
        ):
            assert torch.equal(bits(got.cpu()), bits(expected.cpu())), (
                f"{name}: bits differ from reference.py"
            )

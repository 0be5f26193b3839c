"""Every available backend of fused_adamw_ against reference.py in fp64, step by step.

Each step is judged from the state the kernel itself produced in the previous step (the oracle
is re-anchored), so three steps test the update with non-zero Adam state and masters without
letting one legitimate rounding difference grow. Tolerances: see badam_kernels/verification.py.
"""

from __future__ import annotations

import pytest
import torch

from badam_kernels.verification import (
    AdamState,
    apply_step,
    bits,
    check_step,
    make_state,
    oracle_step,
    random_grads,
)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
SIZES = [0, 1, 3, 1023, 65537]
LARGE = (1 << 20) + 7
STEPS = 3

# (param dtype, grad dtype, master mode): every mode valid for each param dtype, with bf16 and
# fp32 grads (and fp16 grads for fp16 params, the GradScaler setting). Stochastic rounding is in
# test_stochastic_rounding.py.
ROWS = [
    (FP32, FP32, "none"),
    (FP32, BF16, "none"),
    (BF16, BF16, "none"),
    (BF16, FP32, "none"),
    (BF16, BF16, "fp32"),
    (BF16, FP32, "fp32"),
    (BF16, BF16, "remainder"),
    (BF16, FP32, "remainder"),
    (FP16, FP16, "none"),
    (FP16, BF16, "none"),
    (FP16, FP32, "none"),
    (FP16, FP16, "fp32"),
    (FP16, BF16, "fp32"),
    (FP16, FP32, "fp32"),
]
SHORT = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}
ROW_IDS = [f"{SHORT[p]}-grad_{SHORT[g]}-{mode}" for p, g, mode in ROWS]


def checked_step(target, state: AdamState, grads, *, step: int, weight_decay: float = 0.1, **kwargs) -> None:
    """One step of the backend under test, checked against the fp64 oracle and (for the other
    backends) against the error of the fp32 torch backend on the same inputs."""
    expected = oracle_step(
        state, grads, step=step, weight_decay=weight_decay, grad_mul=kwargs.get("grad_mul")
    )
    baseline = None
    if target.backend != "torch":
        baseline = state.clone()
        apply_step(baseline, grads, backend="torch", step=step, weight_decay=weight_decay, **kwargs)
    apply_step(state, grads, backend=target.backend, step=step, weight_decay=weight_decay, **kwargs)
    check_step(state, expected, baseline)


def run_and_check(
    target, param_dtype, grad_dtype, mode, sizes, *, weight_decay=0.1, seed=0, steps=STEPS
) -> AdamState:
    """Run `steps` checked steps on fresh random data; return the final state."""
    gen = torch.Generator().manual_seed(seed)
    state = make_state(sizes, param_dtype, mode, gen, target.device)
    for step in range(1, steps + 1):
        grads = random_grads(sizes, grad_dtype, gen, target.device)
        checked_step(target, state, grads, step=step, weight_decay=weight_decay)
    return state


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd0.1"])
@pytest.mark.parametrize(("param_dtype", "grad_dtype", "mode"), ROWS, ids=ROW_IDS)
def test_mixed_sizes_in_one_call(target, param_dtype, grad_dtype, mode, weight_decay):
    run_and_check(target, param_dtype, grad_dtype, mode, SIZES, weight_decay=weight_decay)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype", "mode"),
    [(FP32, FP32, "none"), (BF16, BF16, "none"), (BF16, BF16, "remainder"), (FP16, FP16, "fp32")],
    ids=["fp32-none", "bf16-none", "bf16-remainder", "fp16-fp32"],
)
def test_single_tensor(target, param_dtype, grad_dtype, mode, size):
    run_and_check(target, param_dtype, grad_dtype, mode, [size])


@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype", "mode"),
    [(BF16, BF16, "remainder"), (FP32, FP32, "none")],
    ids=["bf16-remainder", "fp32-none"],
)
def test_over_a_million_elements(target, param_dtype, grad_dtype, mode):
    # Beyond 2**20 elements: many chunks/programs and a ragged tail; 2 steps keep the Triton
    # interpreter's time reasonable.
    run_and_check(target, param_dtype, grad_dtype, mode, [LARGE], steps=2)


@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype", "mode"),
    [(BF16, BF16, "remainder"), (BF16, BF16, "none"), (FP16, FP16, "fp32"), (FP32, BF16, "none")],
    ids=["bf16-remainder", "bf16-none", "fp16-fp32", "fp32-none"],
)
def test_fifty_tensors_of_mixed_sizes(target, param_dtype, grad_dtype, mode):
    gen = torch.Generator().manual_seed(50)
    sizes = torch.randint(0, 3000, (50,), generator=gen).tolist()
    sizes[7], sizes[20], sizes[33] = 0, 1, 70001  # an empty tensor, a scalar, one spanning chunks
    run_and_check(target, param_dtype, grad_dtype, mode, sizes, seed=1)


@pytest.mark.parametrize("grad_mul", [0.25, 2.0**-16], ids=["clip0.25", "unscale2^-16"])
@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype", "mode"),
    [(BF16, BF16, "remainder"), (FP16, FP16, "fp32"), (FP32, FP32, "none")],
    ids=["bf16-remainder", "fp16-fp32", "fp32-none"],
)
def test_grad_mul(target, param_dtype, grad_dtype, mode, grad_mul):
    if grad_mul < 1e-3 and grad_dtype == FP16:
        pytest.skip("fp16 grads cannot hold a 2**16 loss scale times gradients up to 1")
    # The multiplier is read on the device; gradients here are scaled up so that the unscaled
    # ones have realistic magnitudes.
    multiplier = torch.tensor(grad_mul, device=target.device)
    gen = torch.Generator().manual_seed(2)
    sizes = [3, 4099]
    state = make_state(sizes, param_dtype, mode, gen, target.device)
    for step in range(1, STEPS + 1):
        grads = [
            (g.double() / grad_mul).to(grad_dtype) for g in random_grads(sizes, FP32, gen, target.device)
        ]
        checked_step(target, state, grads, step=step, grad_mul=multiplier)


@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype", "mode"),
    [(BF16, BF16, "remainder"), (BF16, BF16, "fp32"), (BF16, BF16, "none"), (FP16, FP16, "fp32"),
     (FP32, FP32, "none")],
    ids=["bf16-remainder", "bf16-fp32", "bf16-none", "fp16-fp32", "fp32-none"],
)  # fmt: skip
def test_found_inf_writes_nothing(target, param_dtype, grad_dtype, mode):
    gen = torch.Generator().manual_seed(3)
    sizes = [3, 1023, 4099]
    # Two real steps first, so the skipped step has non-trivial state and masters to preserve.
    state = run_and_check(target, param_dtype, grad_dtype, mode, sizes, steps=2, seed=3)
    grads = random_grads(sizes, grad_dtype, gen, target.device)
    grads[0][1] = float("inf")  # what makes GradScaler report found_inf
    grads[2][5] = float("nan")
    before = state.clone()
    found_inf = torch.tensor(1.0, device=target.device)
    apply_step(state, grads, backend=target.backend, step=3, weight_decay=0.1, found_inf=found_inf)
    for old, new in zip(before.all_tensors(), state.all_tensors()):
        assert torch.equal(bits(old), bits(new)), "found_inf=1 must leave every tensor bit for bit unchanged"

    # found_inf == 0 is an ordinary step.
    grads = random_grads(sizes, grad_dtype, gen, target.device)
    checked_step(target, state, grads, step=3, found_inf=found_inf * 0)

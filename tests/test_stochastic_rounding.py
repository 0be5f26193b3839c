"""Stochastic rounding (master_weights="none", bf16 params): neighbours, unbiasedness,
determinism in (seed, step, index), and the exact bits of reference.py."""

from __future__ import annotations

import math

import pytest
import torch

from badam_kernels import reference
from badam_kernels.verification import (
    AdamState,
    apply_step,
    bits,
    check_step,
    make_state,
    oracle_step,
    random_grads,
)

BF16_ULP_BELOW_ONE = 2.0**-8  # spacing of bf16 in [0.5, 1)
N_UNBIASED = 1 << 20


def constant_weight_state(value: float, numel: int, device) -> tuple[AdamState, list[torch.Tensor]]:
    """Params all equal to `value` with zero grads and zero Adam state: the update term is exactly
    zero, so the fp32 weight a kernel rounds is exactly fp32(value * fp32(1 - lr * weight_decay))."""
    params = [torch.full((numel,), value, dtype=torch.bfloat16, device=device)]
    zeros = [torch.zeros(numel, device=device)]
    grads = [torch.zeros(numel, dtype=torch.bfloat16, device=device)]
    return AdamState(params, zeros, [zeros[0].clone()], "none"), grads


def weight_decay_for_fraction(fraction: float, lr: float = 1e-3) -> float:
    """Weight decay that puts 1.0 * decay `fraction` of a bf16 ulp below 1.0."""
    return fraction * BF16_ULP_BELOW_ONE / lr


def sr_step(state, grads, target, *, step=1, seed=0, weight_decay=0.0) -> None:
    apply_step(
        state, grads, backend=target.backend, step=step, weight_decay=weight_decay,
        stochastic_rounding=True, seed=seed,
    )  # fmt: skip


@pytest.mark.parametrize("sizes", [[1, 3, 1023, 65537], [(1 << 20) + 7]], ids=["mixed", "1M+7"])
def test_results_are_neighbours_of_the_fp32_weight(target, sizes):
    gen = torch.Generator().manual_seed(10)
    state = make_state(sizes, torch.bfloat16, "none", gen, target.device)
    for step in range(1, 4):
        grads = random_grads(sizes, torch.bfloat16, gen, target.device)
        expected = oracle_step(state, grads, step=step, weight_decay=0.1)
        sr_step(state, grads, target, step=step, seed=123, weight_decay=0.1)
        check_step(state, expected, None, stochastic_rounding=True)


@pytest.mark.parametrize(("sign", "fraction"), [(1, 0.3), (1, 0.02), (-1, 0.7), (1, 0.0)])
def test_unbiased(target, sign, fraction):
    """N equal weights a known fraction f of an ulp below 1.0 (or above -1.0): the number rounded
    away from the lower-magnitude neighbour is Binomial(N, 1 - f); accept 5 sigma."""
    weight_decay = weight_decay_for_fraction(fraction)
    state, grads = constant_weight_state(sign * 1.0, N_UNBIASED, target.device)
    sr_step(state, grads, target, weight_decay=weight_decay, seed=7)

    decay32 = float(torch.tensor(1.0 - 1e-3 * weight_decay, dtype=torch.float32))
    upper = 1.0  # magnitude of the neighbour above
    lower = upper - BF16_ULP_BELOW_ONE if fraction > 0 else upper
    p_upper = (decay32 - lower) / BF16_ULP_BELOW_ONE if fraction > 0 else 1.0  # exact fraction in fp32
    magnitudes = state.params[0].double().abs().cpu()
    assert bool(((magnitudes == upper) | (magnitudes == lower)).all()), "a result is not a neighbour"
    n_upper = int((magnitudes == upper).sum())
    sigma = math.sqrt(N_UNBIASED * p_upper * (1 - p_upper))
    expected = N_UNBIASED * p_upper
    assert abs(n_upper - expected) <= 5 * sigma, (
        f"{n_upper} of {N_UNBIASED} rounded up, expected {expected:.0f} +- {5 * sigma:.0f} (5 sigma)"
    )


def run_half_ulp(target, *, seed: int, step: int) -> torch.Tensor:
    """64K weights exactly half an ulp below 1.0: each rounds up or down with probability 1/2."""
    state, grads = constant_weight_state(1.0, 1 << 16, target.device)
    sr_step(state, grads, target, step=step, seed=seed, weight_decay=weight_decay_for_fraction(0.5))
    return bits(state.params[0]).cpu()


def test_same_seed_and_step_give_identical_bits(target):
    assert torch.equal(run_half_ulp(target, seed=5, step=3), run_half_ulp(target, seed=5, step=3))


@pytest.mark.parametrize(
    ("seed", "step"), [(6, 3), (5, 4), (5 + (1 << 40), 3)], ids=["seed", "step", "seed_high_bits"]
)
def test_other_seed_or_step_gives_other_bits(target, seed, step):
    # With p = 1/2 per element, two independent streams differ in about half the elements.
    differ = (
        (run_half_ulp(target, seed=5, step=3) != run_half_ulp(target, seed=seed, step=step)).double().mean()
    )
    assert 0.45 < differ.item() < 0.55, f"{differ.item():.3f} of the bits differ, expected about 0.5"


@pytest.mark.parametrize("seed", [0, 987654321, (1 << 40) + 12345], ids=["seed0", "seed32bit", "seed64bit"])
@pytest.mark.parametrize("step", [1, 1000])
def test_bits_equal_reference(target, seed, step):
    """Random bf16 weights times an fp32 decay with a zero update: the fp32 value is exact in every
    backend, so the stochastically rounded bits must equal reference.py's for each (tensor index,
    element index)."""
    gen = torch.Generator().manual_seed(11)
    sizes = [1, 3, 1023, 65537, 70001]
    params = [(torch.randn(n, generator=gen) * 0.3).to(torch.bfloat16).to(target.device) for n in sizes]
    grads = [torch.zeros(n, dtype=torch.bfloat16, device=target.device) for n in sizes]
    zeros = [torch.zeros(n, device=target.device) for n in sizes]
    state = AdamState(params, zeros, [z.clone() for z in zeros], "none")
    kwargs = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 3.7, "step": step}
    expected, _, _, _ = reference.fused_adamw_reference(
        params, grads, state.exp_avgs, state.exp_avg_sqs, None, master_weights="none",
        stochastic_rounding=True, seed=seed, grad_mul=None, found_inf=None, **kwargs,
    )  # fmt: skip
    apply_step(state, grads, backend=target.backend, stochastic_rounding=True, seed=seed, **kwargs)
    for i, (got, want) in enumerate(zip(state.params, expected)):
        mismatches = int((bits(got) != bits(want)).sum())
        assert mismatches == 0, f"params[{i}]: {mismatches} of {got.numel()} bits differ from reference.py"

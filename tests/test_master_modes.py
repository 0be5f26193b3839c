"""Master modes: "remainder" holds exactly the "fp32" master, and both keep updates too small for
a bf16 param, which mode "none" loses."""

from __future__ import annotations

import pytest
import torch

from badam_kernels import reference
from badam_kernels.verification import AdamState, apply_step, bits, make_state, random_grads


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32], ids=["grad_bf16", "grad_fp32"])
def test_remainder_reconstructs_fp32_master_bit_exactly(target, grad_dtype):
    sizes = [0, 1, 3, 1023, 65537]
    gen = torch.Generator().manual_seed(20)
    with_fp32 = make_state(sizes, torch.bfloat16, "fp32", gen, target.device)
    with_remainder = AdamState(
        [p.clone() for p in with_fp32.params], [m.clone() for m in with_fp32.exp_avgs],
        [v.clone() for v in with_fp32.exp_avg_sqs], "remainder",
        [torch.zeros(n, dtype=torch.int16, device=target.device) for n in sizes],
    )  # fmt: skip
    for step in range(1, 4):
        grads = random_grads(sizes, grad_dtype, gen, target.device)
        for state in (with_fp32, with_remainder):
            apply_step(state, grads, backend=target.backend, step=step, weight_decay=0.1)
        for i, (master, decoded) in enumerate(zip(with_fp32.masters, with_remainder.weights())):
            assert torch.equal(bits(decoded), bits(master)), (
                f"step {step}: decoded remainder[{i}] != fp32 master"
            )
            nearest, _ = reference.remainder_encode(master)
            assert torch.equal(bits(with_remainder.params[i]), bits(nearest)), (
                f"step {step}: params[{i}] is not the nearest bf16 of the master"
            )
        for a, b in zip(
            with_fp32.exp_avgs + with_fp32.exp_avg_sqs, with_remainder.exp_avgs + with_remainder.exp_avg_sqs
        ):
            assert torch.equal(bits(a), bits(b)), f"step {step}: Adam state differs between the modes"


def test_small_lr_is_lost_without_master_and_kept_with_one(target):
    """lr 1e-5 on weights of magnitude 0.5..1 (bf16 spacing 2**-8): each update is far below half
    an ulp, so mode "none" leaves every param unchanged, while "fp32" and "remainder" move their
    masters by what the fp64 oracle says."""
    n, lr, steps = 4099, 1e-5, 3
    gen = torch.Generator().manual_seed(21)
    magnitude = 0.5 + 0.5 * torch.rand(n, generator=gen)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    start = (sign * magnitude).to(torch.bfloat16)
    # A steady gradient: Adam then moves every weight by about lr per step, never cancelling.
    grads = [(0.1 * torch.randn(n, generator=gen)).to(torch.bfloat16)] * steps

    oracle = AdamState([start.double()], [torch.zeros(n)], [torch.zeros(n)], "none")
    states = {
        "none": AdamState([start.clone()], [torch.zeros(n)], [torch.zeros(n)], "none"),
        "fp32": AdamState([start.clone()], [torch.zeros(n)], [torch.zeros(n)], "fp32", [start.float()]),
        "remainder": AdamState(
            [start.clone()],
            [torch.zeros(n)],
            [torch.zeros(n)],
            "remainder",
            [torch.zeros(n, dtype=torch.int16)],
        ),
    }
    states = {mode: s.to(target.device) for mode, s in states.items()}
    for step in range(1, steps + 1):
        new = reference.fused_adamw_reference(
            oracle.params, [grads[step - 1]], oracle.exp_avgs, oracle.exp_avg_sqs, None, lr=lr, beta1=0.9,
            beta2=0.999, eps=1e-8, weight_decay=0.0, step=step, master_weights="none",
            stochastic_rounding=False, seed=0, grad_mul=None, found_inf=None, compute_dtype=torch.float64,
        )  # fmt: skip
        oracle = AdamState(new[0], new[1], new[2], "none")
        for state in states.values():
            apply_step(state, [grads[step - 1].to(target.device)], backend=target.backend, step=step, lr=lr)

    oracle_delta = oracle.params[0] - start.double()
    assert bool((oracle_delta.abs() > 0.9 * steps * lr).all()), "the oracle's weights must have moved"
    assert torch.equal(bits(states["none"].params[0].cpu()), bits(start)), "mode 'none' kept a sub-ulp update"
    for mode in ("fp32", "remainder"):
        delta = states[mode].to("cpu").weights()[0].double() - start.double()
        # Three fp32 roundings of a weight below 1 cost at most 3 * 2**-25; the update's own
        # error is ~1e-12.
        torch.testing.assert_close(delta, oracle_delta, rtol=1e-3, atol=3 * 2.0**-24, msg=f"mode {mode!r}")

"""grad_norm for every available backend against the fp64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from badam_kernels import grad_norm, reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SIZES = [[1], [3], [1023], [65537], [(1 << 20) + 7], [0, 5, 0]]


def ulp32(x: float) -> float:
    """Spacing of fp32 numbers around x > 0."""
    return 2.0 ** (math.frexp(x)[1] - 24)


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "+".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_matches_fp64_reference(target, dtype, sizes):
    # Blocked fp32 sums of n squares are off by about sqrt(n) roundings of the running sum; 1e-5
    # relative on the norm holds to well past a million elements and still catches a dropped block.
    gen = torch.Generator().manual_seed(30)
    tensors = [(torch.randn(n, generator=gen) * 0.01).to(dtype).to(target.device) for n in sizes]
    got = grad_norm(tensors, backend=target.backend)
    assert got.dtype == torch.float32 and got.shape == () and got.device == target.device
    expected = reference.grad_norm_reference([t.cpu() for t in tensors], compute_dtype=torch.float64)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_integer_values_are_exact_in_any_order(target, dtype):
    """Entries in {+-1, +-2, +-3}: every partial sum of squares is an integer below 2**24, exact in
    fp32 whatever the reduction order, so the norm is sqrt(exact sum) to one ulp. A single skipped
    or doubled element changes the sum by at least 1 and is caught."""
    gen = torch.Generator().manual_seed(31)
    sizes = [1, 3, 1023, 65537, 0, 70001, 129] + torch.randint(1, 5000, (43,), generator=gen).tolist()
    tensors = []
    for n in sizes:
        values = torch.randint(1, 4, (n,), generator=gen) * (2 * torch.randint(0, 2, (n,), generator=gen) - 1)
        tensors.append(values.to(dtype).to(target.device))
    exact_sum = sum(int((t.cpu().long() ** 2).sum()) for t in tensors)
    assert exact_sum < 2**24
    got = grad_norm(tensors, backend=target.backend).item()
    expected = math.sqrt(exact_sum)
    assert abs(got - expected) <= ulp32(expected), f"norm {got!r}, exact {expected!r}"
    # A sum off by one would move the norm by about this much; the check above must see it.
    assert 1 / (2 * expected) > ulp32(expected)


def test_all_empty_tensors_give_zero(target):
    tensors = [torch.zeros(0, dtype=torch.bfloat16, device=target.device) for _ in range(3)]
    assert grad_norm(tensors, backend=target.backend).item() == 0.0


def test_inf_gives_inf(target):
    # GradScaler-style overflow detection and clipping rely on an inf gradient giving an inf norm.
    t = torch.ones(1023, dtype=torch.bfloat16, device=target.device)
    t[700] = math.inf
    assert grad_norm([t], backend=target.backend).item() == math.inf


def test_empty_list_is_an_error():
    with pytest.raises(ValueError, match="at least one tensor"):
        grad_norm([])


def test_mixed_devices_is_an_error():
    tensors = [torch.ones(3), torch.ones(3, device="meta")]
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        grad_norm(tensors)

"""`python -m badam_kernels.check` on this machine's backends: it passes on the real kernels, and it
fails (exit status 1, naming the backend) when a backend gives a wrong answer, when the bit-exact
backends disagree by a single ulp, when grad_norm is off, and when a required backend is missing."""

from __future__ import annotations

import pytest
import torch

from badam_kernels import check, ops


def run_check(capsys, *args: str) -> tuple[int, str]:
    status = check.main(["--device", "cpu", "--seed", "5", *args])
    return status, capsys.readouterr().out


def wrapped_adamw_op(monkeypatch, backend: str, corrupt) -> None:
    """Make `backend`'s fused_adamw_ run the real kernel and then `corrupt(params, exp_avgs)`."""
    real = ops._FUSED_ADAMW_OPS[backend]()

    def op(params, grads, exp_avgs, *rest):
        real(params, grads, exp_avgs, *rest)
        corrupt(params, exp_avgs)

    monkeypatch.setitem(ops._FUSED_ADAMW_OPS, backend, lambda: op)


def use_cases(monkeypatch, keep) -> None:
    cases = [c for c in check.adamw_cases() if keep(c)]
    monkeypatch.setattr(check, "adamw_cases", lambda: cases)


@pytest.fixture
def few_cases(monkeypatch):
    """A plain, a stochastic-rounding and a found_inf case instead of all, for the tests that only
    need the check to notice something."""
    cases = check.adamw_cases()
    first_sr = next(c for c in cases if c.stochastic)
    first_found_inf = next(c for c in cases if c.found_inf)
    use_cases(monkeypatch, lambda c: c in (cases[0], first_sr, first_found_inf))


def test_passes_on_the_real_kernels_and_prints_the_tables(capsys):
    status, out = run_check(capsys, "--bench-cpu", "--sizes", "12", "--min-time", "0")
    assert status == 0, out
    assert "VERDICT: OK" in out
    cases = len(check.adamw_cases())
    for backend in ops.available_backends("cpu"):
        assert f"| cpu | {backend} | {cases}/{cases} | 6/6 |" in out
    # The throughput table (timed on the CPU here) has a row per backend and master mode.
    for backend in ops.available_backends("cpu"):
        if backend != "triton":
            assert f"| 2^12 | {backend} remainder | 26 |" in out


def test_a_wrong_update_fails_the_check(capsys, monkeypatch, few_cases):
    backend = ops.available_backends("cpu")[0]

    def corrupt(params, exp_avgs):  # a clearly wrong weight in the largest tensor
        if params and params[-1].numel():
            params[-1].view(-1)[0] += 1

    wrapped_adamw_op(monkeypatch, backend, corrupt)
    status, out = run_check(capsys, "--no-bench")
    assert status == 1
    assert f"MISMATCH cpu/{backend}:" in out and "VERDICT: FAILED" in out


def test_one_ulp_between_bit_exact_backends_fails_the_check(capsys, monkeypatch):
    """An exp_avg one ulp off is within the oracle's tolerance, so only the bit comparison of
    cpu against triton can catch it (found_inf cases are left out: there any change is caught)."""
    bf16 = torch.bfloat16
    use_cases(
        monkeypatch,
        lambda c: (c.param_dtype, c.grad_dtype, c.grad_mul, c.found_inf) == (bf16, bf16, None, False),
    )
    exact = [b for b in ops.available_backends("cpu") if b in check.BIT_EXACT_BACKENDS]
    if len(exact) < 2:
        pytest.skip(
            f"needs two bit-exact backends on the CPU, found {exact} (triton needs TRITON_INTERPRET=1)"
        )

    def corrupt(params, exp_avgs):
        if exp_avgs and exp_avgs[-1].numel():
            value = exp_avgs[-1].view(-1)[:1]
            value.copy_(torch.nextafter(value, torch.full_like(value, torch.inf)))

    wrapped_adamw_op(monkeypatch, exact[1], corrupt)
    status, out = run_check(capsys, "--no-bench")
    assert status == 1
    assert f"MISMATCH cpu/{exact[1]}:" in out and "not bit-equal to cpu/" in out
    assert f"| cpu | {exact[1]} | 4/4 |" in out, "the one-ulp error must pass the oracle's tolerance"


def test_a_wrong_norm_fails_the_check(capsys, monkeypatch, few_cases):
    backend = ops.available_backends("cpu")[0]
    real = ops._GRAD_NORM_OPS[backend]()
    monkeypatch.setitem(ops._GRAD_NORM_OPS, backend, lambda: lambda tensors: real(tensors) * (1 + 1e-4))
    status, out = run_check(capsys, "--no-bench")
    assert status == 1
    assert f"MISMATCH cpu/{backend}: grad_norm" in out


def test_a_missing_required_backend_fails_and_says_why(capsys, monkeypatch, few_cases):
    monkeypatch.setattr(ops, "available_backends", lambda device: ["torch"])
    status, out = run_check(capsys, "--no-bench", "--require", "cpu")
    assert status == 1
    assert "cpu missing: backend 'cpu' is not available" in out
    assert "MISMATCH required backend cpu missing on cpu" in out


def test_requiring_cuda_without_a_gpu_fails(capsys, few_cases):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    status, out = run_check(capsys, "--no-bench", "--require", "cuda")
    assert status == 1 and "no CUDA device" in out

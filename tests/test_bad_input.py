"""Bad input is a clear error naming the problem, through the public API and, for the compiled
backend, through the C++ op itself (a RuntimeError, never a crash or silent garbage)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from backend_targets import skip_unless_available

import badam_kernels

N = 8


def valid_args(param_dtype=torch.bfloat16, mode="remainder", device="cpu", count=2) -> dict:
    """Keyword arguments for a correct fused_adamw_ call (one that changes every param); tests
    break one thing."""
    masters = {
        "none": None,
        "fp32": [torch.zeros(N, device=device) for _ in range(count)],
        "remainder": [torch.zeros(N, dtype=torch.int16, device=device) for _ in range(count)],
    }[mode]
    return {
        "params": [torch.zeros(N, dtype=param_dtype, device=device) for _ in range(count)],
        "grads": [torch.ones(N, dtype=param_dtype, device=device) for _ in range(count)],
        "exp_avgs": [torch.zeros(N, device=device) for _ in range(count)],
        "exp_avg_sqs": [torch.zeros(N, device=device) for _ in range(count)],
        "masters": masters,
        "master_weights": mode,
        "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "step": 1,
    }  # fmt: skip


def device_of(args: dict) -> torch.device:
    return args["params"][0].device


def replace_tensor(args: dict, name: str, index: int, make) -> dict:
    """args with args[name][index] replaced by make(device)."""
    tensors = list(args[name])
    tensors[index] = make(device_of(args))
    return {**args, name: tensors}


BAD_CASES = {
    "list lengths differ": (
        lambda a: {**a, "grads": a["grads"][:1]},
        ValueError,
        "grads has 1 tensors but params has 2",
    ),
    "numel differs": (
        lambda a: replace_tensor(a, "exp_avgs", 1, lambda d: torch.zeros(N + 1, device=d)),
        ValueError,
        r"exp_avgs\[1\] has 9 elements but params\[1\] has 8",
    ),
    "other device": (
        lambda a: replace_tensor(
            a, "grads", 1, lambda _: torch.zeros(N, dtype=torch.bfloat16, device="meta")
        ),
        ValueError,
        r"grads\[1\] is on meta but params\[0\] is on cpu",
    ),
    # An in-place op must not advise `.contiguous()`: the copy would take the update.
    "non-contiguous": (
        lambda a: replace_tensor(
            a, "params", 0, lambda d: torch.zeros(2 * N, dtype=torch.bfloat16, device=d)[::2]
        ),
        ValueError,
        r"params\[0\] is not contiguous. It is updated in place.*make the tensor itself contiguous",
    ),
    "non-contiguous state": (
        lambda a: replace_tensor(a, "exp_avgs", 1, lambda d: torch.zeros(2 * N, device=d)[::2]),
        ValueError,
        r"exp_avgs\[1\] is not contiguous. It is updated in place",
    ),
    "non-contiguous grad": (
        lambda a: replace_tensor(
            a, "grads", 1, lambda d: torch.ones(2 * N, dtype=torch.bfloat16, device=d)[::2]
        ),
        ValueError,
        r"grads\[1\] is not contiguous; pass grads\[1\].contiguous\(\)",
    ),
    "state not fp32": (
        lambda a: replace_tensor(
            a, "exp_avg_sqs", 0, lambda d: torch.zeros(N, dtype=torch.bfloat16, device=d)
        ),
        TypeError,
        r"exp_avg_sqs\[0\] has dtype torch.bfloat16, expected torch.float32",
    ),
    "remainder with fp16": (
        lambda a: {
            **valid_args(torch.float16, "none", device_of(a)),
            "master_weights": "remainder",
            "masters": a["masters"],
        },
        TypeError,
        "'remainder' needs bf16 params",
    ),
    "remainder with fp32": (
        lambda a: {
            **valid_args(torch.float32, "none", device_of(a)),
            "master_weights": "remainder",
            "masters": a["masters"],
        },
        TypeError,
        "'remainder' needs bf16 params",
    ),
    "fp32 masters missing": (
        lambda a: {**valid_args(mode="fp32", device=device_of(a)), "masters": None},
        ValueError,
        "master_weights='fp32' needs masters",
    ),
    "remainder not int16": (
        lambda a: replace_tensor(a, "masters", 0, lambda d: torch.zeros(N, device=d)),
        TypeError,
        r"masters\[0\] has dtype torch.float32, expected torch.int16",
    ),
    "step 0": (lambda a: {**a, "step": 0}, ValueError, "step must be >= 1"),
    "lr NaN": (lambda a: {**a, "lr": math.nan}, ValueError, "lr must be in"),
    "lr negative": (lambda a: {**a, "lr": -1e-3}, ValueError, "lr must be in"),
    "eps negative": (lambda a: {**a, "eps": -1e-8}, ValueError, "eps must be in"),
    "eps NaN": (lambda a: {**a, "eps": math.nan}, ValueError, "eps must be in"),
    "beta1 = 1": (lambda a: {**a, "beta1": 1.0}, ValueError, "beta1 must be in"),
    "beta2 negative": (lambda a: {**a, "beta2": -0.1}, ValueError, "beta2 must be in"),
    "beta2 NaN": (lambda a: {**a, "beta2": math.nan}, ValueError, "beta2 must be in"),
    "weight_decay negative": (lambda a: {**a, "weight_decay": -0.1}, ValueError, "weight_decay must be in"),
    "unknown backend": (lambda a: {**a, "backend": "tpu"}, ValueError, "backend must be one of"),
    "unknown master mode": (
        lambda a: {**a, "master_weights": "fp8"},
        ValueError,
        "master_weights must be one of",
    ),
    "grad_mul not 0-dim": (
        lambda a: {**a, "grad_mul": torch.ones(3)},
        ValueError,
        "grad_mul must be a 0-dim",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_public_api_rejects(case):
    breaker, error, message = BAD_CASES[case]
    args = breaker(valid_args())
    before = [t.clone() for t in args["params"] if t.device.type != "meta"]
    with pytest.raises(error, match=message):
        badam_kernels.fused_adamw_(**args)
    after = [t for t in args["params"] if t.device.type != "meta"]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a rejected call must not write"


def test_numpy_scalars_accepted():
    """np.int64 steps and np.float32 hyperparameters work like Python numbers."""
    args = valid_args()
    reference = valid_args()
    numpy_scalars = {
        "step": np.int64(1),
        "lr": np.float64(1e-3),
        "beta1": np.float32(0.5),
        "seed": np.int64(3),
    }
    badam_kernels.fused_adamw_(**{**args, **numpy_scalars})
    badam_kernels.fused_adamw_(**{**reference, "beta1": 0.5, "seed": 3})
    torch.testing.assert_close(args["params"], reference["params"], rtol=0, atol=0)


def test_unknown_backend_rejected_even_with_no_tensors():
    with pytest.raises(ValueError, match="backend must be one of"):
        badam_kernels.fused_adamw_([], [], [], [], lr=1e-3, step=1, backend="tpu")


def call_cpp_op(args: dict) -> None:
    """torch.ops.badam_kernels.fused_adamw_ with the schema's positional arguments."""
    torch.ops.badam_kernels.fused_adamw_(
        args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"], args["masters"] or [],
        args["lr"], args["beta1"], args["beta2"], args["eps"], args["weight_decay"], args["step"],
        args["master_weights"], False, 0, None, None,
    )  # fmt: skip


# The C++ op is reachable without the Python validation, so it must check everything that would
# otherwise read or write out of bounds or misinterpret memory, with an error naming the problem
# (TORCH_CHECK_VALUE/TYPE give ValueError/TypeError, TORCH_CHECK a RuntimeError).
CPP_BAD_CASES = {
    "list lengths differ": "grads has 1 tensors but params has 2",
    "numel differs": r"exp_avgs\[1\] has 9 elements",
    "non-contiguous": r"params\[0\] is not contiguous.*make those tensors themselves contiguous",
    "state not fp32": r"exp_avg_sqs\[0\] has dtype",
    "remainder with fp16": "'remainder' needs bf16 params",
    "remainder with fp32": "'remainder' needs bf16 params",
    "fp32 masters missing": "masters has 0 tensors",
    "remainder not int16": r"masters\[0\] has dtype",
    "step 0": "step must be >= 1",
    "lr NaN": "lr must be",
    "unknown master mode": "master_weights must be",
}
CLEAR_ERRORS = (RuntimeError, ValueError, TypeError)


COMPILED = pytest.mark.parametrize("device", ["cpu", "cuda"])


@COMPILED
@pytest.mark.parametrize("case", list(CPP_BAD_CASES))
def test_cpp_op_rejects(device, case):
    skip_unless_available(device, device)
    args = BAD_CASES[case][0](valid_args(device=device))
    with pytest.raises(CLEAR_ERRORS, match=CPP_BAD_CASES[case]):
        call_cpp_op(args)


@COMPILED
def test_cpp_op_accepts_the_valid_call(device):
    # Guards the bad-input tests above: they must fail for the broken argument, not for the call.
    skip_unless_available(device, device)
    args = valid_args(device=device)
    call_cpp_op(args)
    assert all(bool((p != 0).all()) for p in args["params"]), "the valid call must update the params"

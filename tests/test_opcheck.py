"""torch.library.opcheck on every registered op of every available backend: schema (mutation
annotations), fake kernels, autograd registration and AOT dispatch."""

from __future__ import annotations

import pytest
import torch

FUSED_ADAMW_OP = {
    "cpu": "fused_adamw_",
    "cuda": "fused_adamw_",
    "triton": "fused_adamw_triton_",
    "torch": "fused_adamw_torch_",
}
GRAD_NORM_OP = {
    "cpu": "grad_norm",
    "cuda": "grad_norm",
    "triton": "grad_norm_triton",
    "torch": "grad_norm_torch",
}

# (param dtype, master mode, stochastic rounding, with grad_mul and found_inf)
VARIANTS = [
    (torch.float32, "none", False, False),
    (torch.bfloat16, "none", False, True),
    (torch.bfloat16, "none", True, False),
    (torch.bfloat16, "fp32", False, False),
    (torch.bfloat16, "remainder", False, True),
    (torch.float16, "fp32", False, True),
]
VARIANT_IDS = [
    "fp32-none",
    "bf16-none-amp",
    "bf16-none-sr",
    "bf16-fp32",
    "bf16-remainder-amp",
    "fp16-fp32-amp",
]


def fused_adamw_args(device, param_dtype, mode, stochastic_rounding, amp) -> tuple:
    """Positional arguments of the fused_adamw_ schema on two small tensors."""
    sizes = [3, 17]
    gen = torch.Generator().manual_seed(40)
    params = [torch.randn(n, generator=gen).to(param_dtype).to(device) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(param_dtype).to(device) for n in sizes]
    exp_avgs = [torch.zeros(n, device=device) for n in sizes]
    exp_avg_sqs = [torch.zeros(n, device=device) for n in sizes]
    masters = {
        "none": [],
        "fp32": [p.float() for p in params],
        "remainder": [torch.zeros(n, dtype=torch.int16, device=device) for n in sizes],
    }[mode]
    grad_mul = torch.tensor(0.5, device=device) if amp else None
    found_inf = torch.tensor(0.0, device=device) if amp else None
    return (
        params, grads, exp_avgs, exp_avg_sqs, masters, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1, mode,
        stochastic_rounding, 17, grad_mul, found_inf,
    )  # fmt: skip


@pytest.mark.parametrize(("param_dtype", "mode", "stochastic_rounding", "amp"), VARIANTS, ids=VARIANT_IDS)
def test_fused_adamw_op(target, param_dtype, mode, stochastic_rounding, amp):
    op = getattr(torch.ops.badam_kernels, FUSED_ADAMW_OP[target.backend])
    args = fused_adamw_args(target.device, param_dtype, mode, stochastic_rounding, amp)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
def test_grad_norm_op(target, dtype):
    op = getattr(torch.ops.badam_kernels, GRAD_NORM_OP[target.backend])
    tensors = [torch.randn(n, device=target.device).to(dtype) for n in (3, 17, 1025)]
    torch.library.opcheck(op, (tensors,))

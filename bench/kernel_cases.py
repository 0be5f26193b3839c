"""The kernel benchmark cases: each provider sets up one AdamW step over `n` elements and says how
many bytes that step must move (DESIGN.md's model), so every runner reports the same GB/s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import badam_kernels
from badam_kernels.ops import available_backends

# Bytes per element and step, bf16 params and grads, fp32 m and v (DESIGN.md).
BYTES_PER_ELEMENT = {"none": 22, "fp32": 28, "remainder": 26}
TORCH_FUSED_FP32_BYTES = 28  # fp32 params and grads: read p,g,m,v (16), write p,m,v (12)
BADAM_PATH_BYTES = 40  # grad.float() (r2 w4), AdamW on fp32 copy (r16 w12), copy back (r4 w2)
COPY_BYTES = 8  # fp32 copy: read 4, write 4


@dataclass(frozen=True)
class Case:
    name: str
    bytes_per_element: int
    make: Callable[[int, torch.device], Callable[[], None]]  # (n, device) -> step function


def _bf16_state(n: int, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    p = (torch.randn(n, generator=gen) * 0.02).to(device=device, dtype=torch.bfloat16)
    g = (torch.randn(n, generator=gen) * 1e-3).to(device=device, dtype=torch.bfloat16)
    m = torch.zeros(n, device=device)
    v = torch.zeros(n, device=device)
    return p, g, m, v


def _ours(backend: str, mode: str) -> Callable:
    def make(n: int, device: torch.device) -> Callable[[], None]:
        p, g, m, v = _bf16_state(n, device)
        masters = {
            "none": None,
            "fp32": [p.float()],
            "remainder": [torch.zeros(n, dtype=torch.int16, device=device)],
        }[mode]
        step = [0]

        def run() -> None:
            step[0] += 1
            badam_kernels.fused_adamw_(
                [p], [g], [m], [v], lr=1e-5, weight_decay=0.01, step=step[0],
                master_weights=mode, masters=masters, backend=backend,
            )  # fmt: skip

        return run

    return make


def _torch_fused_fp32(n: int, device: torch.device) -> Callable[[], None]:
    p, g, _, _ = _bf16_state(n, device)
    param = torch.nn.Parameter(p.float())
    param.grad = g.float()
    opt = torch.optim.AdamW([param], lr=1e-5, weight_decay=0.01, fused=True)
    return opt.step


def _badam_path(n: int, device: torch.device) -> Callable[[], None]:
    """What badam.BlockOptimizer does per step: fp32 grad copy, AdamW on the fp32 master, copy back."""
    p, g, _, _ = _bf16_state(n, device)
    master = torch.nn.Parameter(p.float())
    opt = torch.optim.AdamW([master], lr=1e-5, weight_decay=0.01, fused=True)

    def run() -> None:
        master.grad = g.to(torch.float32)
        opt.step()
        p.copy_(master)
        master.grad = None

    return run


def _copy(n: int, device: torch.device) -> Callable[[], None]:
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def cases(device: torch.device) -> list[Case]:
    """All providers runnable on `device`; the Triton interpreter is left out (it is not a speed path)."""
    found = [Case("copy (fp32)", COPY_BYTES, _copy)]
    for backend in available_backends(device):
        if backend == "triton" and device.type == "cpu":
            continue
        for mode, nbytes in BYTES_PER_ELEMENT.items():
            found.append(Case(f"{backend} {mode}", nbytes, _ours(backend, mode)))
    found.append(Case("torch AdamW(fused) fp32", TORCH_FUSED_FP32_BYTES, _torch_fused_fp32))
    found.append(Case("badam path", BADAM_PATH_BYTES, _badam_path))
    return found

"""Kernel throughput: the providers of one AdamW step over `n` elements and how each is timed.

Shared by `python -m badam_kernels.check`, bench/kernel_table.py and bench/test_bench_kernels.py, so
that every table reports the same GB/s. Each provider says how many bytes its step must move
(DESIGN.md's model: bf16 params and grads, fp32 m and v); GB/s is those bytes over the measured time.

Timing on a GPU: CUDA events around back-to-back calls (no host sync between them), so the number is
the device time per call, not the host's launch time; sizes should be well past the L2 cache (60 MB on
an H200: 2**24 elements move 370-470 MB per step). The host time per call is measured separately, one
call at a time on an idle GPU. On a CPU both are the median wall time per call.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from badam_kernels import ops

# Bytes per element and step, bf16 params and grads, fp32 m and v (DESIGN.md).
BYTES_PER_ELEMENT = {"none": 22, "fp32": 28, "remainder": 26}
TORCH_FUSED_FP32_BYTES = 28  # fp32 params and grads: read p,g,m,v (16), write p,m,v (12)
BADAM_PATH_BYTES = 40  # grad.float() (r2 w4), AdamW on fp32 copy (r16 w12), copy back (r4 w2)
COPY_BYTES = 8  # fp32 copy: read 4, write 4
COPY_NAME = "copy (fp32)"
BADAM_PATH_NAME = "badam path"


@dataclass(frozen=True)
class Case:
    name: str
    bytes_per_element: int
    make: Callable[[int, torch.device], Callable[[], None]]  # (n, device) -> one step


@dataclass(frozen=True)
class Timing:
    device_seconds: float  # per call: CUDA events over back-to-back calls, or CPU wall time
    host_seconds: float  # per call: time until the call returns (on a GPU, the launch overhead)


def _bf16_state(n: int, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    p = (torch.randn(n, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    g = (torch.randn(n, generator=gen, device=device) * 1e-3).to(torch.bfloat16)
    return p, g, torch.zeros(n, device=device), torch.zeros(n, device=device)


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
            ops.fused_adamw_(
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


def cases(device: torch.device, backends: list[str] | None = None) -> list[Case]:
    """The fp32 copy first, then each of `backends` (default: every one available on `device`, but
    not Triton's CPU interpreter, which is no speed path) in each master mode, torch's fused AdamW on
    fp32 params, and badam's path."""
    if backends is None:
        backends = [b for b in ops.available_backends(device) if not (b == "triton" and device.type == "cpu")]
    found = [Case(COPY_NAME, COPY_BYTES, _copy)]
    for backend in backends:
        for mode, nbytes in BYTES_PER_ELEMENT.items():
            found.append(Case(f"{backend} {mode}", nbytes, _ours(backend, mode)))
    found.append(Case("torch AdamW(fused) fp32", TORCH_FUSED_FP32_BYTES, _torch_fused_fp32))
    found.append(Case(BADAM_PATH_NAME, BADAM_PATH_BYTES, _badam_path))
    return found


def time_calls(fn: Callable[[], None], device: torch.device, min_time: float = 0.5) -> Timing:
    """Median time per call of `fn` after a warm-up (see the module docstring for how)."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        times, start = [], time.perf_counter()
        while len(times) < 5 or time.perf_counter() - start < min_time:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        return Timing(seconds, seconds)

    torch.cuda.synchronize(device)
    host = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize(device)
    # Enough back-to-back calls per sample that launch gaps and event resolution do not matter.
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first.record()
    fn()
    last.record()
    last.synchronize()
    calls = max(3, min(100, math.ceil(5.0 / max(first.elapsed_time(last), 1e-3))))
    per_call, start = [], time.perf_counter()
    while len(per_call) < 3 or time.perf_counter() - start < min_time:
        first.record()
        for _ in range(calls):
            fn()
        last.record()
        last.synchronize()
        per_call.append(first.elapsed_time(last) / 1e3 / calls)
    return Timing(statistics.median(per_call), statistics.median(host))


@dataclass(frozen=True)
class Row:
    elements: int
    case: Case
    timing: Timing

    @property
    def gb_per_s(self) -> float:
        return self.case.bytes_per_element * self.elements / self.timing.device_seconds / 1e9


def measure(device: torch.device, sizes: list[int], cases_: list[Case], min_time: float = 0.5) -> list[Row]:
    """Time every case at every size; each case's tensors are freed before the next is made."""
    rows = []
    for n in sizes:
        for case in cases_:
            rows.append(Row(n, case, time_calls(case.make(n, device), device, min_time)))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def markdown_table(rows: list[Row]) -> list[str]:
    """One line per row: time, GB/s, % of the copy and speed-up over badam's path at the same size,
    and the host time per call."""
    lines = [
        "| elements | provider | B/elem | time (ms) | GB/s | % of copy | vs badam path | host (us/call) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same_size = {r.case.name: r for r in rows if r.elements == row.elements}
        copy, badam = same_size.get(COPY_NAME), same_size.get(BADAM_PATH_NAME)
        of_copy = f"{100 * row.gb_per_s / copy.gb_per_s:.0f}%" if copy else "-"
        vs_badam = f"{badam.timing.device_seconds / row.timing.device_seconds:.2f}x" if badam else "-"
        lines.append(
            f"| {size_name(row.elements)} | {row.case.name} | {row.case.bytes_per_element} "
            f"| {row.timing.device_seconds * 1e3:.3f} | {row.gb_per_s:.1f} | {of_copy} | {vs_badam} "
            f"| {row.timing.host_seconds * 1e6:.0f} |"
        )
    return lines


def size_name(n: int) -> str:
    """2^k for powers of two, else the number."""
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)

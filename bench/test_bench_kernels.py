"""pytest-benchmark suite for the fused AdamW kernels (the providers of badam_kernels/kernel_bench.py).

    pytest bench/test_bench_kernels.py --benchmark-only [--benchmark-columns=median,ops]

On a GPU one round is `calls` back-to-back steps followed by one synchronize, so the round's wall time
over `calls` is the device time per step (the host enqueues faster than the device runs at these
sizes), at 2^24 and 2^27 elements, past the L2 cache. On a CPU a round is one step, at 2^20 and 2^24.
BADAM_KERNELS_BENCH_LOG2_SIZES="12 16" sets other sizes (log2).
GB/s by DESIGN.md's byte model and the calls per round go into each result's extra_info. Targets are
judged from these numbers (bench/RESULTS.md), never asserted.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from badam_kernels import kernel_bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [1 << 24, 1 << 27] if DEVICE.type == "cuda" else [1 << 20, 1 << 24]
if os.environ.get("BADAM_KERNELS_BENCH_LOG2_SIZES"):  # e.g. "12" for a quick dry run
    SIZES = [1 << int(s) for s in os.environ["BADAM_KERNELS_BENCH_LOG2_SIZES"].split()]
CASES = kernel_bench.cases(DEVICE)
ROUND_SECONDS = 0.01  # a GPU round lasts at least this long


@pytest.mark.parametrize("n", SIZES, ids=kernel_bench.size_name)
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_adamw_step(benchmark, case, n):
    step = case.make(n, DEVICE)
    calls = 1
    if DEVICE.type == "cuda":
        once = kernel_bench.time_calls(step, DEVICE, min_time=0.0).device_seconds
        calls = max(1, min(50, math.ceil(ROUND_SECONDS / once)))

        def run() -> None:
            for _ in range(calls):
                step()
            torch.cuda.synchronize(DEVICE)
    else:
        run = step
    benchmark.extra_info["bytes_per_element"] = case.bytes_per_element
    benchmark.extra_info["calls_per_round"] = calls
    benchmark.pedantic(run, rounds=10 if DEVICE.type == "cuda" else 5, warmup_rounds=1)
    seconds_per_call = benchmark.stats.stats.median / calls
    benchmark.extra_info["GB/s"] = case.bytes_per_element * n / seconds_per_call / 1e9

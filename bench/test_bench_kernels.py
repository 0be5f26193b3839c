"""pytest-benchmark suite for the fused AdamW kernels.

    pytest bench/test_bench_kernels.py --benchmark-only [--benchmark-columns=median,ops]

GB/s by DESIGN.md's byte model goes into each result's extra_info. Sizes: 1M and 16M elements, plus
64M on a GPU. Targets are judged from these numbers (bench/RESULTS.md), never asserted.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [1 << 20, 16 << 20] + ([64 << 20] if DEVICE.type == "cuda" else [])
CASES = cases(DEVICE)


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n >> 20}M")
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_adamw_step(benchmark, case, n):
    step = case.make(n, DEVICE)
    if DEVICE.type == "cuda":
        run = lambda: (step(), torch.cuda.synchronize())  # noqa: E731
    else:
        run = step
    benchmark.extra_info["bytes_per_element"] = case.bytes_per_element
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = case.bytes_per_element * n / benchmark.stats.stats.median / 1e9

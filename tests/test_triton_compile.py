"""The Triton kernels compiled for sm_90 (H100/H200) on any machine: every variant within the register
budget, no spills, and vector accesses on the aligned path only (tests/triton_sm90.py compiles them).

Why these bounds: utils.REGISTER_BUDGET lets several blocks share an SM (the first version needed
176-255 registers, one block per SM, and spilled); one vector access per tensor and thread on the
aligned path is what makes the kernel bandwidth-bound; the misaligned path must use none, since a
misaligned vector access faults. Scalar loads must exist (that path and the masked tail).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from badam_kernels.triton_ops import utils  # noqa: E402
from triton_sm90 import (  # noqa: E402
    ADAMW_VARIANTS,
    BYTES_OF,
    NORM_DTYPES,
    SPARSE_VARIANTS,
    adamw_id,
    norm_id,
    sparse_id,
)

ELEMENTS_PER_THREAD = utils.BLOCK // (32 * utils.NUM_WARPS)


@pytest.fixture(scope="module")
def sm90() -> dict[str, dict]:
    """The compile report of every variant, from a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("triton_sm90.py"))],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"compiling for sm_90 failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def expected_vectors(dtypes: list[torch.dtype]) -> dict[str, int]:
    """One access per tensor and thread, ELEMENTS_PER_THREAD elements wide: 16 or 8 bytes."""
    counts = {"16": 0, "8": 0}
    for dtype in dtypes:
        counts[str(ELEMENTS_PER_THREAD * BYTES_OF[dtype])] += 1
    return counts


def check_resources(report: dict, budget: int = utils.REGISTER_BUDGET) -> None:
    usage = report["usage"]
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"registers spill to local memory: {usage}"
    assert usage["REG"] <= budget, f"{usage['REG']} registers > {budget}"
    assert report["scalar_loads"], "no scalar loads: where are the misaligned path and the tail?"


@pytest.mark.parametrize("variant", ADAMW_VARIANTS, ids=adamw_id)
def test_fused_adamw(sm90, variant):
    param_dtype, grad_dtype, mode, _ = variant
    report = sm90[adamw_id(variant)]
    check_resources(report)
    master = {"none": [], "fp32": [torch.float32], "remainder": [torch.int16]}[mode]
    # Reads grad, m, v and the weight's sources ("fp32" mode reads the master, not the param);
    # writes m, v, param and the master.
    weight_sources = master if mode == "fp32" else [param_dtype, *master]
    loads = [grad_dtype, torch.float32, torch.float32, *weight_sources]
    stores = [torch.float32, torch.float32, param_dtype, *master]
    assert report["loads"] == expected_vectors(loads), report
    assert report["stores"] == expected_vectors(stores), report
    assert report["fma"] == 0, "the contract rounds every mul and add separately (no fma)"


@pytest.mark.parametrize("variant", SPARSE_VARIANTS, ids=sparse_id)
def test_sparse_adam(sm90, variant):
    """Runs vectorise like AdamW. With indices only the index load is a vector: every other access
    is masked by the per-entry range check (out-of-range indices are skipped, never written), so it
    is scalar, and the kernel has the larger GATHER_REGISTER_BUDGET (utils.py says why)."""
    param_dtype, mode, indexed = variant
    report = sm90[sparse_id(variant)]
    check_resources(report, utils.GATHER_REGISTER_BUDGET if indexed else utils.REGISTER_BUDGET)
    master = {"none": [], "fp32": [torch.float32], "remainder": [torch.int16]}[mode]
    if indexed:
        loads, stores = [torch.int32], []
    else:
        weight_sources = master if mode == "fp32" else [param_dtype, *master]
        loads = [param_dtype, torch.float32, torch.float32, *weight_sources]
        stores = [torch.float32, torch.float32, param_dtype, *master]
    assert report["loads"] == expected_vectors(loads), report
    assert report["stores"] == expected_vectors(stores), report
    assert report["fma"] == 0, "the contract rounds every mul and add separately (no fma)"


@pytest.mark.parametrize("dtype", NORM_DTYPES, ids=norm_id)
def test_grad_norm(sm90, dtype):
    report = sm90[norm_id(dtype)]
    check_resources(report)
    assert report["loads"] == expected_vectors([dtype]), report

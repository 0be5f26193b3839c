"""Shared pytest setup: Triton's interpreter on machines without CUDA, and the `target` fixture
that runs a kernel test once per available (device, backend) pair."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET once, when it is first imported; set it before any test (or
    # badam_kernels) can import triton so the "triton" backend runs CPU tensors in its interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from backend_targets import DEVICE_BACKENDS, Target, skip_unless_available  # noqa: E402


@pytest.fixture(params=DEVICE_BACKENDS, ids=[f"{d}-{b}" for d, b in DEVICE_BACKENDS])
def target(request) -> Target:
    """Each available (device, backend) pair in turn; the others are skipped with the reason."""
    device, backend = request.param
    skip_unless_available(device, backend)
    return Target(torch.device(device), backend)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    they run fastest on one thread, and stay quick on a busy machine (two threads on
    oversubscribed cores made them ~15x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

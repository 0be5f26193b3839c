"""The (device, backend) pairs every kernel test runs on, and skipping the ones missing here.

tests/test_backends.py is what fails when a backend that should have been built is absent; the
other tests skip it with the reason."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from badam_kernels.ops import available_backends

DEVICE_BACKENDS = [
    ("cpu", "cpu"),
    ("cpu", "triton"),
    ("cpu", "torch"),
    ("cuda", "cuda"),
    ("cuda", "triton"),
    ("cuda", "torch"),
]


@dataclass(frozen=True)
class Target:
    """Where a test runs: the tensors' device and the backend asked for by name."""

    device: torch.device
    backend: str


def skip_unless_available(device: str, backend: str) -> None:
    """Skip the calling test, with the reason, if `backend` cannot run on `device` here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    usable = available_backends(device)
    if backend not in usable:
        pytest.skip(f"backend {backend!r} is not available on {device} (available: {usable})")

"""The (device, backend) pairs every kernel test runs on, and skipping the ones missing here.

tests/test_backends.py is what fails when a backend that should have been built is absent; the
other tests skip it with the reason."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


# The CPU kernel sets of the C++ extension and the CPU features each executes beyond x86-64
# (csrc/cpu/isa_select.cpp asks the CPU for the same).
CPU_ISAS = ("avx512", "avx2", "scalar")
CPU_ISA_FLAGS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx2": {"avx2", "f16c"},
    "scalar": set(),
}


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where there is no such file)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_can_execute(isa: str) -> bool:
    """Whether this CPU executes the `isa` kernel set, from /proc/cpuinfo: independent of the
    extension's own detection, which is what the tests check."""
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo: cannot tell which instruction sets this CPU executes")
    return CPU_ISA_FLAGS[isa] <= flags


def cpu_kernel_isa() -> str:
    """The kernel set the CPU ops run now (after BADAM_KERNELS_CPU_ISA), as the extension reports it."""
    return torch.ops.badam_kernels.cpu_kernel_isa()


def force_cpu_isa(monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    """Make the CPU ops run the `isa` kernel set for the rest of the test, checking that they do;
    skip (with the reason) where the extension is missing or this CPU cannot execute the set."""
    skip_unless_available("cpu", "cpu")
    if not cpu_can_execute(isa):
        pytest.skip(f"this CPU cannot execute the {isa} kernels (lacks {sorted(CPU_ISA_FLAGS[isa])})")
    monkeypatch.setenv("BADAM_KERNELS_CPU_ISA", isa)
    assert cpu_kernel_isa() == isa, f"BADAM_KERNELS_CPU_ISA={isa} did not take effect"

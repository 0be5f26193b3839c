"""Which backends exist, how "auto" and named backends are chosen, and the errors that say how to
get a missing one. These tests FAIL (not skip) when a backend that should be built is absent: the
C++ CPU backend always (unless BADAM_KERNELS_ALLOW_NO_EXTENSION=1), the CUDA kernels when
BADAM_KERNELS_EXPECT_CUDA=1 (CI's oldest stack: a CUDA torch and nvcc, no GPU)."""

from __future__ import annotations

import importlib.util
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

import badam_kernels
from badam_kernels import ops

ALLOW_NO_EXTENSION = os.environ.get("BADAM_KERNELS_ALLOW_NO_EXTENSION") == "1"
EXPECT_CUDA = os.environ.get("BADAM_KERNELS_EXPECT_CUDA") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def one_step(backend: str, device="cpu") -> None:
    p, g, m, v = (torch.zeros(4, device=device) for _ in range(4))
    badam_kernels.fused_adamw_([p], [g], [m], [v], lr=1e-3, step=1, backend=backend)


@pytest.mark.skipif(ALLOW_NO_EXTENSION, reason="BADAM_KERNELS_ALLOW_NO_EXTENSION=1")
def test_compiled_cpu_backend_is_available():
    assert "cpu" in badam_kernels.available_backends("cpu"), (
        f"the C++ CPU backend is missing ({ops.EXTENSION_ERROR or 'extension built without CPU kernels'}); "
        "build it with `pip install --no-build-isolation -e .` or set BADAM_KERNELS_ALLOW_NO_EXTENSION=1"
    )


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"
)
@pytest.mark.skipif(ALLOW_NO_EXTENSION, reason="BADAM_KERNELS_ALLOW_NO_EXTENSION=1")
def test_compiled_cuda_backend_is_available():
    assert "cuda" in badam_kernels.available_backends("cuda"), ops.EXTENSION_ERROR


@pytest.mark.skipif(not EXPECT_CUDA, reason="BADAM_KERNELS_EXPECT_CUDA is not 1")
@pytest.mark.parametrize("op", ["fused_adamw_", "grad_norm"])
def test_cuda_kernels_were_built_when_expected(op):
    """Registration needs no GPU: a CUDA build of the extension registers its CUDA kernels on import."""
    assert ops._has_cpp_kernel(op, "CUDA"), (
        f"BADAM_KERNELS_EXPECT_CUDA=1 but badam_kernels::{op} has no CUDA kernel: "
        f"{ops.missing_kernels_reason('cuda')}"
    )


def _without_cuda_kernels(monkeypatch, reason: str) -> None:
    """This installation as a CUDA torch whose build left the CUDA kernels out for `reason`."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(ops, "EXTENSION_ERROR", None)
    monkeypatch.setattr(ops, "_has_cpp_kernel", lambda op, key: key == "CPU")
    build_info = SimpleNamespace(CUDA_KERNELS=False, CUDA_REASON=reason, CUDA_WARN=True)
    monkeypatch.setattr(ops, "_build_info", build_info)


def test_the_reason_recorded_at_build_time_is_reported(monkeypatch):
    """setup.py records why it built no CUDA kernels; asking for them on a CUDA device says it."""
    reason = "no CUDA kernels: torch was built with CUDA 12.8 but the only CUDA toolkits found are 13.0"
    _without_cuda_kernels(monkeypatch, reason)
    with pytest.warns(UserWarning, match=f"'cuda' backend is not available: {reason}"):
        assert "cuda" not in badam_kernels.available_backends("cuda")
    with pytest.raises(RuntimeError, match=rf"backend 'cuda' is not available \({reason}\)"):
        ops.resolve_backend("cuda", torch.device("cuda"))


def test_a_deliberate_cpu_only_build_does_not_warn(monkeypatch):
    _without_cuda_kernels(monkeypatch, "BADAM_KERNELS_NO_CUDA=1 was set when the extension was built")
    monkeypatch.setattr(ops._build_info, "CUDA_WARN", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert badam_kernels.available_backends("cuda")[-1] == "torch"
    with pytest.raises(RuntimeError, match="BADAM_KERNELS_NO_CUDA=1 was set"):
        ops.resolve_backend("cuda", torch.device("cuda"))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_runs_cpu_tensors_under_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1 (conftest sets it only when there is no CUDA device)")
    assert "triton" in badam_kernels.available_backends("cpu")


def test_torch_backend_is_always_available():
    assert badam_kernels.available_backends("cpu")[-1] == "torch"


def test_auto_never_picks_the_triton_interpreter_on_cpu():
    expected = "cpu" if "cpu" in badam_kernels.available_backends("cpu") else "torch"
    assert ops.resolve_backend("auto", torch.device("cpu")) == expected


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the error for CUDA kernels on a CPU-only machine"
)
def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(ValueError, match="backend 'cuda' cannot run tensors on cpu"):
        one_step("cuda")


def test_missing_cpu_backend_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(ops, "available_backends", lambda device: ["torch"])
    with pytest.raises(
        RuntimeError, match=r"backend 'cpu' is not available.*pip install --no-build-isolation -e \."
    ):
        one_step("cpu")


def test_triton_on_cpu_without_interpreter_says_to_set_it(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    assert "triton" not in badam_kernels.available_backends("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        one_step("triton")


def test_triton_not_installed_says_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
    )
    ops.triton_installed.cache_clear()  # the answer is cached at the first call
    try:
        assert "triton" not in badam_kernels.available_backends("cpu")
        with pytest.raises(RuntimeError, match="pip install triton"):
            one_step("triton")
    finally:
        ops.triton_installed.cache_clear()


def test_grad_norm_missing_backend_is_an_error(monkeypatch):
    monkeypatch.setattr(ops, "available_backends", lambda device: ["torch"])
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e"):
        badam_kernels.grad_norm([torch.ones(3)], backend="cpu")

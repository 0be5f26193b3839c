"""Which backends exist, how "auto" and named backends are chosen, and the errors that say how to
get a missing one. These tests FAIL (not skip) when a backend that should be built is absent."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import badam_kernels
from badam_kernels import ops

ALLOW_NO_EXTENSION = os.environ.get("BADAM_KERNELS_ALLOW_NO_EXTENSION") == "1"
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

"""Build checks that need no GPU: the pure-CUDA kernels compile with nvcc for sm_80 and sm_90, the
torch glue compiles against torch's headers, and the CMake project configures and builds.

The kernels themselves run in the backend tests when a GPU is present.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
NVCC = shutil.which("nvcc")
CMAKE = shutil.which("cmake")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")


def _run(cmd: list[str], timeout: float) -> None:
    """Run `cmd`; on failure show the command and its output in the test report."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}"


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile(arch: str, tmp_path: Path) -> None:
    """Every csrc/cuda/*.cu compiles warning-free with the restrictions torch's build adds (no
    implicit half/bf16 conversions), and no kernel spills registers or uses local memory."""
    sources = sorted((CSRC / "cuda").glob("*.cu"))
    assert sources, "no .cu files in csrc/cuda"
    _run(
        [
            NVCC, "-c", "-std=c++17", "-O3", "-fmad=false", f"-arch={arch}", "-I", CSRC, *COMMON_NVCC_FLAGS,
            "--Werror", "all-warnings", "-Xptxas", "-warn-spills,-warn-lmem-usage",
            "-Xcompiler", "-Wall,-Wextra,-Werror", "--output-directory", tmp_path, *sources,
        ],
        timeout=300,
    )  # fmt: skip
    assert sorted(p.stem for p in tmp_path.glob("*.o")) == sorted(p.stem for p in sources)


@needs_nvcc
def test_cuda_glue_compiles_against_torch_headers(tmp_path: Path) -> None:
    """The torch glue (csrc/cuda/*.cpp) compiles, even with a CPU build of torch: its c10/cuda headers
    are installed and only the CMake-generated macro header is missing, which a stub replaces."""
    torch_include = Path(include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("this torch installation has no c10/cuda headers")
    generated = Path("c10") / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not (torch_include / generated).exists():
        (tmp_path / generated).parent.mkdir(parents=True)
        (tmp_path / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    system_includes = [arg for path in include_paths() for arg in ("-isystem", path)]
    # nvcc as the driver: it adds the CUDA toolkit's include directory for the host compiler too.
    for source in sorted((CSRC / "cuda").glob("*.cpp")):
        _run(
            [
                NVCC, "-x", "c++", "-c", "-std=c++17", "-I", tmp_path, *system_includes, "-I", CSRC,
                "-Xcompiler", "-Wall,-Wextra,-Werror", source, "-o", tmp_path / f"{source.stem}.o",
            ],
            timeout=300,
        )  # fmt: skip


@pytest.mark.skipif(CMAKE is None, reason="cmake is not on the PATH")
def test_cmake_builds(tmp_path: Path) -> None:
    """CMakeLists.txt configures and builds the _C module against the installed torch (and the CUDA
    kernel library when nvcc exists); the module registers the ops when loaded on its own, with the
    CUDA kernels too when torch has CUDA. No TORCH_CUDA_ARCH_LIST is given: with no GPU, the project
    must default it (torch's own fallback list starts at compute_50, which nvcc 13 rejects)."""
    build = tmp_path / "build"
    configure = [
        CMAKE, "-S", REPO, "-B", build, f"-DPython_EXECUTABLE={sys.executable}",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DBADAM_KERNELS_CUDA={'ON' if NVCC else 'OFF'}",
    ]  # fmt: skip
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    _run(configure, timeout=300)
    _run([CMAKE, "--build", build, "--parallel"], timeout=1200)

    modules = list(build.glob("_C*.so"))
    assert len(modules) == 1, f"expected one _C module in {build}, found {modules}"
    if NVCC:
        assert (build / "libbadam_kernels_cuda.a").exists()
    # A fresh interpreter: this one may already hold the pip-built badam_kernels._C, and the same
    # TORCH_LIBRARY cannot be registered twice in one process.
    has_cpu_kernels = any((CSRC / "cpu").glob("*.cpp"))
    has_cuda_kernels = NVCC is not None and torch.version.cuda is not None  # kernels and torch glue
    check = (
        "import importlib.util, torch\n"
        f"spec = importlib.util.spec_from_file_location('_C', {str(modules[0])!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "for op in ('fused_adamw_', 'grad_norm'):\n"
        "    getattr(torch.ops.badam_kernels, op).default  # the schema from ops.cpp\n"
        f"    if {has_cpu_kernels}:\n"
        "        assert torch._C._dispatch_has_kernel_for_dispatch_key(f'badam_kernels::{op}', 'CPU'), op\n"
        f"    if {has_cuda_kernels}:\n"
        "        assert torch._C._dispatch_has_kernel_for_dispatch_key(f'badam_kernels::{op}', 'CUDA'), op\n"
    )
    _run([sys.executable, "-c", check], timeout=120)

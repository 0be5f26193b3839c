"""Builds badam_kernels._C: the CPU kernels always, and the CUDA kernels when torch has CUDA and a CUDA
toolkit of torch's CUDA major version is found (build_tools/cuda_toolkit.py: CUDA_HOME / CUDA_PATH,
else the toolkit the `nvcc` on the PATH belongs to even when that nvcc is a wrapper script, else
/usr/local/cuda*). A CUDA torch without such a toolkit gets the CPU extension and a loud warning; the
reason is written to badam_kernels/_build_info_<python>.py and reported at run time by
`badam_kernels.available_backends("cuda")` and by the error for backend="cuda".

Environment: BADAM_KERNELS_NO_CUDA=1 skips the CUDA kernels; DEBUG=1 builds -O0 -g;
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default: the visible GPUs', else DEFAULT_ARCHS);
MAX_JOBS caps parallel compiles.
"""

import glob
import importlib.util
import os
import sys
from pathlib import Path

import setuptools
from setuptools import setup

# setuptools builds wheels and editable installs by itself from 70.1 on; older versions need the
# `wheel` package, which `pip install --no-build-isolation` does not install (pyproject's build
# requirements only apply to isolated builds). Say so now rather than fail after compiling.
if tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1) and not importlib.util.find_spec("wheel"):
    sys.exit(
        f"badam_kernels: setuptools {setuptools.__version__} cannot build without the `wheel` package; "
        "run `pip install 'setuptools>=70.1'` and retry"
    )

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
from build_tools.cuda_toolkit import find_toolkits, plan_cuda_build  # noqa: E402

# A100 and H100/H200, plus PTX so newer GPUs can JIT-compile the kernels. torch's own default is
# the visible GPUs' architectures; with no GPU (a build machine, CI) it has none and fails.
DEFAULT_ARCHS = "8.0;9.0+PTX"
# badam_kernels/ops.py imports the record under the same name.
BUILD_INFO_MODULE = "_build_info_" + sys.implementation.cache_tag.replace("-", "_")

skip_cuda = os.environ.get("BADAM_KERNELS_NO_CUDA", "0") == "1"
toolkits, notes = find_toolkits() if torch.version.cuda and not skip_cuda else ([], [])
plan = plan_cuda_build(torch.version.cuda, toolkits, skip_requested=skip_cuda, notes=notes)
use_cuda = plan.toolkit is not None
if use_cuda:
    # Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import time.
    os.environ["CUDA_HOME"] = str(plan.toolkit.home)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
if plan.warn:
    bar = "!" * 100
    print(f"\n{bar}\nbadam_kernels: building WITHOUT CUDA kernels.\n{plan.reason}\n{bar}\n", file=sys.stderr)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def write_build_info() -> None:
    """badam_kernels/_build_info_<python>.py (git-ignored): what this build contains and why, for run
    time. One per Python version, like the _C module itself, so builds for two Pythons in one source
    tree (the two test stacks) keep their own records."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPUs'") if use_cuda else None
    text = (
        '"""Written by setup.py when badam_kernels._C was built; not tracked by git."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_KERNELS = {use_cuda!r}\n"
        f"CUDA_REASON = {plan.reason!r}\n"
        f"CUDA_WARN = {plan.warn!r}\n"
        f"CUDA_ARCH_LIST = {arch_list!r}\n"
    )
    path = REPO / "badam_kernels" / f"{BUILD_INFO_MODULE}.py"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


write_build_info()

debug = os.environ.get("DEBUG", "0") == "1"
sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
opt = ["-O0", "-g"] if debug else ["-O3"]
extra_compile_args = {"cxx": [*opt, "-std=c++17", "-fopenmp"]}
if use_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    # -fmad=false: no FMA contraction, so the CUDA kernels stay bit-exact to adam_math.h.
    extra_compile_args["nvcc"] = [*opt, "-std=c++17", "-lineinfo", "-fmad=false"]
Extension = CUDAExtension if use_cuda else CppExtension

setup(
    ext_modules=[
        Extension(
            "badam_kernels._C",
            sources,
            include_dirs=[str(REPO / "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)

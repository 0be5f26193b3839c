"""Builds badam_kernels._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc
exists. Set BADAM_KERNELS_NO_CUDA=1 to skip the CUDA part, DEBUG=1 for -O0 -g."""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

debug = os.environ.get("DEBUG", "0") == "1"
use_cuda = (
    torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.environ.get("BADAM_KERNELS_NO_CUDA", "0") != "1"
)

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
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)

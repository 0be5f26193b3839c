"""Compile every Triton kernel variant for sm_90 (H100/H200) without a GPU and report what the
compiler made of it; run as a script it prints the report as JSON (tests/test_triton_compile.py).

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` needs no GPU, but it needs real
@triton.jit functions, so this runs in a process without TRITON_INTERPRET. Resource usage is read from
the cubin with the cuobjdump that Triton ships. Each variant is compiled with the argument types the
launchers pass: an int64 table (a fresh torch allocation, so 16-byte aligned), int32 integers, fp32
scalars, and for fused AdamW with grad_mul and found_inf (the most code).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl
from badam_kernels.triton_ops import fused_adamw, grad_norm, sparse_adam, utils
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
SHORT = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}
BYTES_OF = {BF16: 2, FP16: 2, FP32: 4, torch.int16: 2, torch.int32: 4}

# (param dtype, grad dtype, master mode, stochastic rounding): every combination the launcher runs.
ADAMW_VARIANTS = [
    (p, g, mode, False)
    for p, modes in ((FP32, ["none"]), (BF16, ["none", "fp32", "remainder"]), (FP16, ["none", "fp32"]))
    for mode in modes
    for g in (BF16, FP16, FP32)
] + [(BF16, g, "none", True) for g in (BF16, FP16, FP32)]
NORM_DTYPES = [BF16, FP16, FP32]
# (param dtype, master mode, indexed): sparse Adam on contiguous runs and on int32 indices; the
# gradients are in the param dtype, as BlockOptimizerRatio takes them.
SPARSE_VARIANTS = [
    (p, mode, indexed)
    for p, modes in ((FP32, ["none"]), (BF16, ["none", "fp32", "remainder"]), (FP16, ["none", "fp32"]))
    for mode in modes
    for indexed in (False, True)
]


def adamw_id(variant) -> str:
    p, g, mode, stochastic = variant
    return f"adamw-{SHORT[p]}-grad_{SHORT[g]}-{mode}" + ("-sr" if stochastic else "")


def sparse_id(variant) -> str:
    p, mode, indexed = variant
    return f"sparse-{SHORT[p]}-{mode}-" + ("indexed" if indexed else "runs")


def norm_id(dtype) -> str:
    return f"norm-{SHORT[dtype]}"


def _compile(kernel, types: dict[str, str], constexprs: dict, enable_fp_fusion: bool) -> dict:
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    src = ASTSource(kernel, signature, constexprs, attrs={(0,): [["tt.divisibility", 16]]})
    options = {"num_warps": utils.NUM_WARPS, "enable_fp_fusion": enable_fp_fusion}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    usage_line = next(line for line in out.splitlines() if "REG:" in line)
    ptx = compiled.asm["ptx"]
    return {
        "usage": {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage_line)},
        # 16-byte (v4.b32) and 8-byte (v2.b32) global loads and stores, and whether scalar loads exist.
        "loads": {"16": ptx.count("ld.global.v4.b32"), "8": ptx.count("ld.global.v2.b32")},
        "stores": {"16": ptx.count("st.global.v4.b32"), "8": ptx.count("st.global.v2.b32")},
        "scalar_loads": bool(re.search(r"ld\.global\.b(16|32) ", ptx)),
        "fma": ptx.count("fma.rn.f32"),
    }


def build_all() -> dict[str, dict]:
    to_tl = {BF16: tl.bfloat16, FP16: tl.float16, FP32: tl.float32}
    adamw_types = {"table": "*i64", "chunk": "i32", "grad_mul_ptr": "*fp32", "found_inf_ptr": "*fp32",
                   "seed32": "i32", "step32": "i32"}  # fmt: skip
    for name in fused_adamw._fused_adamw_kernel.arg_names:
        if name not in adamw_types and not name.isupper():
            adamw_types[name] = "fp32"
    report = {}
    for variant in ADAMW_VARIANTS:
        p, g, mode, stochastic = variant
        constexprs = {
            "PARAM_DTYPE": to_tl[p], "GRAD_DTYPE": to_tl[g], "MASTER_DTYPE": fused_adamw._MASTER_DTYPES[mode],
            "MASTER_MODE": fused_adamw._MASTER_MODE_IDS[mode], "STOCHASTIC": stochastic,
            "HAS_GRAD_MUL": True, "HAS_FOUND_INF": True, "BLOCK": utils.BLOCK,
        }  # fmt: skip
        report[adamw_id(variant)] = _compile(fused_adamw._fused_adamw_kernel, adamw_types, constexprs, False)
    sparse_types = {"table": "*i64", "chunk": "i32", "grad_mul_ptr": "*fp32"}
    for name in sparse_adam._sparse_adam_kernel.arg_names:
        if name not in sparse_types and not name.isupper():
            sparse_types[name] = "fp32"
    for variant in SPARSE_VARIANTS:
        p, mode, indexed = variant
        constexprs = {
            "PARAM_DTYPE": to_tl[p], "GRAD_DTYPE": to_tl[p], "MASTER_DTYPE": fused_adamw._MASTER_DTYPES[mode],
            "INDEX_DTYPE": tl.int32, "MASTER_MODE": fused_adamw._MASTER_MODE_IDS[mode], "INDEXED": indexed,
            "HAS_GRAD_MUL": True, "BLOCK": utils.BLOCK,
        }  # fmt: skip
        kernel = sparse_adam._sparse_adam_kernel
        report[sparse_id(variant)] = _compile(kernel, sparse_types, constexprs, False)
    for dtype in NORM_DTYPES:
        types = {"table": "*i64", "chunk": "i32", "partials": "*fp32"}
        constexprs = {"DTYPE": to_tl[dtype], "BLOCK": utils.BLOCK}
        report[norm_id(dtype)] = _compile(grad_norm._sum_of_squares_kernel, types, constexprs, True)
    return report


if __name__ == "__main__":
    print(json.dumps(build_all()))

"""Throughput of the Triton fused-AdamW kernel per tiling (elements per block, warps) on a GPU.

    python bench/triton_tiling.py [--sizes 27] [--tilings 1024x8 2048x8 1024x4 4096x8]

The shipped tiling is triton_ops/utils.py's BLOCK x NUM_WARPS (1024 x 8: 4 elements per thread);
4096 x 8 is the first version's (16 per thread, 176-255 registers). Each row: GB/s of every master
mode by DESIGN.md's byte model and its percentage of an fp32 copy measured in the same run (CUDA
events over back-to-back calls, badam_kernels/kernel_bench.py). On a CPU the interpreter runs the
kernel: use it only as a dry run with a small size.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets backend="triton" accept CPU tensors

from badam_kernels.triton_ops import utils  # noqa: E402

from badam_kernels import kernel_bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", type=int, default=[27], help="log2 of the sizes")
    parser.add_argument("--tilings", nargs="+", default=["1024x8", "2048x8", "1024x4", "512x4", "4096x8"])
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds measured per row")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [1 << s for s in args.sizes]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    print(f"device={device} ({name}) torch={torch.__version__}")
    copy_case = [c for c in kernel_bench.cases(device, []) if c.name == kernel_bench.COPY_NAME]
    copy = {r.elements: r for r in kernel_bench.measure(device, sizes, copy_case, args.min_time)}
    modes = list(kernel_bench.BYTES_PER_ELEMENT)
    print("| elements | BLOCK x warps | " + " | ".join(f"{m} GB/s (% of copy)" for m in modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    shipped = (utils.BLOCK, utils.NUM_WARPS)
    try:
        for tiling in args.tilings:
            utils.BLOCK, utils.NUM_WARPS = (int(x) for x in tiling.split("x"))
            utils.clear_table_cache()  # tables hold the chunk size, a multiple of BLOCK
            cases = [c for c in kernel_bench.cases(device, ["triton"]) if c.name.startswith("triton")]
            rows = kernel_bench.measure(device, sizes, cases, args.min_time)
            for n in sizes:
                of_copy = [(r.gb_per_s, 100 * r.gb_per_s / copy[n].gb_per_s) for r in rows if r.elements == n]
                cells = [f"{gbs:.0f} ({percent:.0f}%)" for gbs, percent in of_copy]
                mark = " (shipped)" if (utils.BLOCK, utils.NUM_WARPS) == shipped else ""
                print(f"| {kernel_bench.size_name(n)} | {tiling}{mark} | " + " | ".join(cells) + " |")
    finally:
        utils.BLOCK, utils.NUM_WARPS = shipped
        utils.clear_table_cache()


if __name__ == "__main__":
    main()

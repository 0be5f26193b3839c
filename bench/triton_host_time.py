"""Host time per call of the Triton fused-AdamW path for a block of Llama-layer tensors.

    python bench/triton_host_time.py [--device cuda] [--hidden 4096 --intermediate 11008] [--layers 1 4]

Rows, in microseconds per call (median):
  * table lookup, cached: utils.launch_tables for the same tensors again (every step of a block);
  * table build, uncached: the same after clearing the cache (a block's first step, or gradients
    that moved), including the upload on a GPU;
  * fused_adamw_ call: the whole public call with backend="triton" (argument checks, the table
    lookup, Triton's launcher); on a CPU the kernel launch itself is replaced by a no-op, since the
    interpreter would run it, so the row is the Python side alone.
Blocks of 1 and 4 Llama layers (9 and 36 tensors; 7B shapes by default). On a CPU the table rows use
the real element counts without allocating them (the table holds pointers and counts only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets backend="triton" accept CPU tensors

from badam_kernels.triton_ops import fused_adamw, utils  # noqa: E402

import badam_kernels  # noqa: E402


def layer_numels(hidden: int, intermediate: int) -> list[int]:
    """q, k, v, o, gate, up, down and the two norms of one Llama layer (no GQA)."""
    return [hidden * hidden] * 4 + [hidden * intermediate] * 3 + [hidden] * 2


def median_us(fn, repeats: int = 200) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


class NoLaunch:
    """Stands in for the kernel on a CPU: Triton's launcher is not run, nothing is computed."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def measure_block(numels: list[int], device: torch.device) -> tuple[float, float, float]:
    """(cached lookup, uncached build, whole call) in microseconds for tensors of `numels`."""
    columns = [(64 * i, 64 * i + 16, 64 * i + 32, 64 * i + 48, 0, n, i) for i, n in enumerate(numels)]
    cached = median_us(lambda: utils.launch_tables(columns, 5, device))

    def uncached() -> None:
        utils.clear_table_cache()
        utils.launch_tables(columns, 5, device)

    build = median_us(uncached)
    # The whole call, on real tensors: full size on a GPU, one element each on a CPU.
    sizes = numels if device.type == "cuda" else [1] * len(numels)
    params = [torch.zeros(n, dtype=torch.bfloat16, device=device) for n in sizes]
    grads = [torch.zeros_like(p) for p in params]
    exp_avgs = [torch.zeros(n, device=device) for n in sizes]
    exp_avg_sqs = [torch.zeros(n, device=device) for n in sizes]
    remainders = [torch.zeros(n, dtype=torch.int16, device=device) for n in sizes]
    step = [0]

    def call() -> None:
        step[0] += 1
        badam_kernels.fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, lr=1e-5, step=step[0], master_weights="remainder",
            masters=remainders, backend="triton",
        )  # fmt: skip

    whole = median_us(call, repeats=50 if device.type == "cuda" else 200)
    return cached, build, whole


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        fused_adamw._fused_adamw_kernel = NoLaunch()
    print(f"device={device} torch={torch.__version__} layers: hidden {args.hidden}, MLP {args.intermediate}")
    print(
        "| tensors | elements | table lookup, cached (us) | table build, uncached (us) | fused_adamw_ (us) |"
    )
    print("|---|---|---|---|---|")
    for layers in args.layers:
        numels = layer_numels(args.hidden, args.intermediate) * layers
        cached, build, whole = measure_block(numels, device)
        print(f"| {len(numels)} | {sum(numels) / 1e6:.0f}M | {cached:.1f} | {build:.1f} | {whole:.1f} |")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Print the fused-AdamW throughput table (markdown) for bench/RESULTS.md.

    python bench/kernel_table.py --sizes 1M 16M [--device cuda] [--threads 2]

Each row: median step time, GB/s by DESIGN.md's byte model, percent of an fp32 copy measured in the
same run, and speed relative to badam's path (time ratio, higher is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from kernel_cases import cases


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def median_seconds(fn, device: torch.device, min_time: float = 1.0, min_reps: int = 5) -> float:
    """Median wall time per call after a warm-up; synchronises CUDA around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["1M", "16M"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds measured per row")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print("| elements | provider | B/elem | time (ms) | GB/s | % of copy | vs badam path |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        n = parse_size(size)
        rows = []
        for case in cases(device):
            seconds = median_seconds(case.make(n, device), device, args.min_time)
            rows.append((case, seconds, case.bytes_per_element * n / seconds / 1e9))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        copy_gbs = rows[0][2]
        badam_s = next(s for c, s, _ in rows if c.name == "badam path")
        for case, seconds, gbs in rows:
            print(
                f"| {size} | {case.name} | {case.bytes_per_element} | {seconds * 1e3:.2f} | {gbs:.1f} "
                f"| {100 * gbs / copy_gbs:.0f}% | {badam_s / seconds:.2f}x |"
            )


if __name__ == "__main__":
    main()

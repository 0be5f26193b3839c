"""Print the fused-AdamW throughput table (markdown) for bench/RESULTS.md, optionally as a PNG.

    python bench/kernel_table.py [--sizes 24 27] [--device cuda] [--png out.png] [--threads 2]

Each row: time per call, GB/s by DESIGN.md's byte model, percent of an fp32 copy measured in the same
run, speed relative to badam's path (time ratio, higher is faster) and the host time per call. On a
GPU the time is from CUDA events over back-to-back calls, at sizes past the L2 cache (defaults 2^24
and 2^27 elements); on a CPU it is the median wall time per call (defaults 2^20 and 2^24).
See badam_kernels/kernel_bench.py.
"""

from __future__ import annotations

import argparse

import torch

from badam_kernels import kernel_bench


def parse_size(text: str) -> int:
    """A log2 size ('24' -> 2**24), a size with a unit ('16M'), or an element count above 64."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    value = int(text)
    return 1 << value if value <= 64 else value


def plot(rows: list[kernel_bench.Row], path: str, title: str) -> None:
    """Grouped bars of GB/s per provider, one group per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r.elements for r in rows})
    names = list(dict.fromkeys(r.case.name for r in rows))
    width = 0.8 / len(sizes)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(names)), 4.5))
    for i, n in enumerate(sizes):
        by_name = {r.case.name: r.gb_per_s for r in rows if r.elements == n}
        xs = [j + i * width for j in range(len(names))]
        ax.bar(
            xs,
            [by_name.get(name, 0.0) for name in names],
            width,
            label=f"{kernel_bench.size_name(n)} elements",
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=35, ha="right")
    ax.set_ylabel("GB/s (DESIGN.md byte model)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=None, help="log2 sizes (24) or 16M-style sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds measured per row")
    parser.add_argument("--png", default=None, help="also draw the GB/s bars into this PNG")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [parse_size(s) for s in args.sizes or (["24", "27"] if device.type == "cuda" else ["20", "24"])]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = f"device={device} ({name}) torch={torch.__version__} threads={torch.get_num_threads()}"
    print(header, flush=True)
    rows = kernel_bench.measure(device, sizes, kernel_bench.cases(device), args.min_time)
    print("\n".join(kernel_bench.markdown_table(rows)))
    if args.png:
        plot(rows, args.png, header)


if __name__ == "__main__":
    main()

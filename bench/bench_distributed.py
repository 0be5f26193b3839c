"""Data-parallel step time and gradient bytes communicated: BlockAdamW(process_group=...) vs DDP
with full torch AdamW, 2 gloo processes on CPU (or NCCL, one GPU per rank), the same bf16 Llama.

    python bench/bench_distributed.py [--layers 4 --hidden 256 --seq-len 128 --steps 12]

A step is forward + backward + optimizer.step() on each rank's own batch; the median over the
timed steps of rank 0 is reported. Bytes are counted where they are sent: for BlockAdamW by its
gradient sync (`bytes_last_step`), for DDP by a comm hook that adds up each bucket it
all-reduces. BlockAdamW never switches blocks while timing (the same middle layer trains). The
last row runs BlockAdamW without a process group, the compute alone, so the difference to the row
above is what communication costs beyond what overlaps backward. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from stdlib_text import as_tokens, batches, byte_llama, stdlib_sources  # noqa: E402

from badam_kernels import BlockAdamW  # noqa: E402

WORLD = 2
NO_COMMUNICATION = "BlockAdamW, no process_group (each rank alone)"
METHODS = ("DDP + AdamW", "BlockAdamW", NO_COMMUNICATION)


def counting_allreduce_hook(counter: list[int], bucket):
    """DDP comm hook: the default all-reduce, counting the bucket's bytes first."""
    buffer = bucket.buffer()
    counter[0] += buffer.numel() * buffer.element_size()
    return allreduce_hook(dist.group.WORLD, bucket)


def run_method(method: str, args, rank: int, device: torch.device) -> tuple[float, int]:
    """(median step seconds, gradient bytes all-reduced per step) for one method on this rank."""
    model = byte_llama(args.layers, args.hidden, args.seq_len, seed=0).to(device, torch.bfloat16)
    counter = [0]
    if method.startswith("BlockAdamW"):
        optimizer = BlockAdamW(
            model, lr=1e-5, switch_every=10**9, start_block=args.layers // 2, switch_mode="fixed",
            process_group=None if method == NO_COMMUNICATION else dist.group.WORLD, verbose=0,
        )  # fmt: skip
        train_model = model
    else:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
        train_model.register_comm_hook(counter, counting_allreduce_hook)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    tokens = as_tokens(stdlib_sources(max_bytes=2 << 20))
    data = batches(tokens, args.batch_size, args.seq_len, args.warmup + args.steps, seed=rank)
    times, sent = [], []
    for step in range(args.warmup + args.steps):
        x = next(data).to(device)
        before = counter[0]
        dist.barrier()
        start = time.perf_counter()
        train_model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            if method == "BlockAdamW":
                sent.append(optimizer.gradient_sync.bytes_last_step)
            else:
                sent.append(counter[0] - before)
    return statistics.median(times), max(sent)


def worker(rank: int, args, init_file: str, results: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or WORLD) // WORLD))
    use_cuda = torch.cuda.is_available()
    dist.init_process_group(
        "nccl" if use_cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(minutes=5),
    )  # fmt: skip
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    rows = {method: run_method(method, args, rank, device) for method in METHODS}
    if rank == 0:
        torch.save(rows, results)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "results.pt")
        mp.spawn(worker, args=(args, os.path.join(tmp, "rendezvous"), results), nprocs=WORLD)
        rows = torch.load(results)
    model = byte_llama(args.layers, args.hidden, args.seq_len, seed=0)
    params = sum(p.numel() for p in model.parameters())
    backend = "nccl" if torch.cuda.is_available() else "gloo (CPU)"
    print(
        f"{WORLD} ranks, {backend}; bf16 Llama {args.layers} layers x {args.hidden}, "
        f"{params / 1e6:.2f} M params; batch {args.batch_size} x {args.seq_len} per rank"
    )
    print("| method | step time (ms, median) | gradient bytes all-reduced per step |")
    print("|---|---:|---:|")
    for method, (seconds, sent) in rows.items():
        print(f"| {method} | {seconds * 1e3:.1f} | {sent / 1e6:.3f} MB |")


if __name__ == "__main__":
    main()

"""Data-parallel BAdam without DDP: every rank trains its own batches of a full model copy, and
BlockAdamW averages only the active block's gradients over the ranks (bucketed all-reduces
launched during backward, waited for in step()).

    torchrun --nproc-per-node 2 examples/torchrun_data_parallel.py [--steps 20] [--accumulate 2]

CPU processes talk through gloo, GPUs (one per rank) through NCCL. A small byte-level Llama learns
standard-library text (no download). Micro-batches before the last of each step run inside
`optimizer.gradient_sync.no_sync()`, so each step communicates once. At the end the ranks check
that their weights are bit-identical.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from stdlib_text import as_tokens, batches, byte_llama, stdlib_sources

from badam_kernels import BlockAdamW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank and micro-batch")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--switch-every", type=int, default=5)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    # The seed differs per rank on purpose: BlockAdamW broadcasts rank 0's weights, as DDP does.
    model = byte_llama(args.layers, args.hidden, args.seq_len, seed=rank).to(device, torch.bfloat16)
    optimizer = BlockAdamW(
        model, lr=1e-3, switch_every=args.switch_every, switch_mode="random", seed=0,
        max_grad_norm=1.0, process_group=dist.group.WORLD, verbose=0,
    )  # fmt: skip
    tokens = as_tokens(stdlib_sources(max_bytes=2 << 20))
    data = batches(tokens, args.batch_size, args.seq_len, args.steps * args.accumulate, seed=1000 + rank)
    for step in range(args.steps):
        total = torch.zeros((), device=device)
        for micro in range(args.accumulate):
            x = next(data).to(device)
            loss = model(input_ids=x, labels=x).loss / args.accumulate
            if micro < args.accumulate - 1:
                with optimizer.gradient_sync.no_sync():
                    loss.backward()
            else:
                loss.backward()
            total += loss.detach()
        block = optimizer.active_block
        optimizer.step()
        dist.all_reduce(total)
        if rank == 0:
            sent = optimizer.gradient_sync.bytes_last_step
            mean_loss = total.item() / world
            print(f"step {step:3d}  block {block}  loss {mean_loss:.4f}  all-reduced {sent / 1e6:.3f} MB")

    checksum = torch.stack([p.float().sum() for p in model.parameters()])
    gathered = [torch.empty_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"ranks hold identical weights: {same}; DDP would all-reduce {full / 1e6:.3f} MB per step")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Sharded BAdam with FSDP2: each rank holds 1/N of every weight; BlockAdamW updates the local
shards of the active block with the fused kernels, and checkpoints go through
torch.distributed.checkpoint (DCP). The run is saved halfway, resumed by a fresh model and
optimizer, and must end on exactly the weights of the uninterrupted run.

    torchrun --nproc-per-node 2 examples/torchrun_fsdp2.py [--steps 20]

CPU processes talk through gloo, GPUs (one per rank) through NCCL. Use process_group=None with
FSDP2: FSDP2 itself reduce-scatters the gradients, and only the active block has any.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
from stdlib_text import as_tokens, batches, byte_llama, stdlib_sources
from torch.distributed.fsdp import fully_shard

from badam_kernels import BlockAdamW
from badam_kernels.distributed import load_checkpoint, save_checkpoint


def sharded_model(args, device: torch.device) -> torch.nn.Module:
    model = byte_llama(args.layers, args.hidden, args.seq_len, seed=0).to(device, torch.bfloat16)
    for layer in model.model.layers:  # one FSDP group per layer: a block switch is a group switch
        fully_shard(layer)
    return fully_shard(model)


def train(model, optimizer, data, steps: range, device: torch.device, rank: int) -> None:
    for step in steps:
        x = data[step].to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        block = optimizer.active_block
        optimizer.step()
        if rank == 0:
            print(f"step {step:3d}  block {block}  loss {loss.item():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--switch-every", type=int, default=3)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    options = dict(
        lr=1e-3, switch_every=args.switch_every, switch_mode="random", max_grad_norm=1.0, verbose=0
    )
    tokens = as_tokens(stdlib_sources(max_bytes=2 << 20))
    data = list(batches(tokens, args.batch_size, args.seq_len, args.steps, seed=1000 + rank))
    half = args.steps // 2
    checkpoint = [tempfile.mkdtemp(prefix="badam_fsdp2_") if rank == 0 else None]
    dist.broadcast_object_list(checkpoint)

    model = sharded_model(args, device)
    optimizer = BlockAdamW(model, **options)
    train(model, optimizer, data, range(half), device, rank)
    save_checkpoint(model, optimizer, checkpoint[0])
    train(model, optimizer, data, range(half, args.steps), device, rank)
    straight = [p.full_tensor() for p in model.parameters()]

    if rank == 0:
        print(f"resuming from the DCP checkpoint at step {half} ({checkpoint[0]})")
    model = sharded_model(args, device)
    optimizer = BlockAdamW(model, **options)
    load_checkpoint(model, optimizer, checkpoint[0])
    train(model, optimizer, data, range(half, args.steps), device, rank)
    resumed = [p.full_tensor() for p in model.parameters()]
    if rank == 0:
        exact = all(torch.equal(a, b) for a, b in zip(straight, resumed))
        print(f"resumed run ends on the uninterrupted run's weights: {exact}")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(checkpoint[0])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

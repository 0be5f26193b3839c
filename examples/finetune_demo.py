"""Fine-tune a small Llama-style model on real text with BlockAdamW and with full AdamW.

Nothing is downloaded: the model is built from transformers.LlamaConfig and the text is Python's own
standard-library source code, read as bytes (vocabulary 256, no tokenizer files). Both runs start from
the same weights and see the same batches. Prints loss, step time and optimizer + gradient memory for
both and saves a loss-curve PNG. Uses CUDA when present. `--ratio 0.1` adds a third run with
BlockOptimizerRatio (badam's ratio mode: 10% of every weight's entries trained per mask period).

    python examples/finetune_demo.py [--steps 160] [--device cuda] [--out demo_out] [--ratio 0.1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from stdlib_text import as_tokens, batches, bf16_weights, byte_llama, split_by_file, stdlib_sources

from badam_kernels import BlockAdamW, BlockOptimizerRatio


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(state.values()) for state in optimizer.state.values())


def taken_grad_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Gradients BlockOptimizerRatio took from the parameters during backward (p.grad is None)."""
    return optimizer.memory_summary()["grad_bytes"] if isinstance(optimizer, BlockOptimizerRatio) else 0


@torch.no_grad()
def eval_loss(model, tokens, args, device) -> float:
    losses = []
    for x in batches(tokens, args.batch_size, args.seq_len, 8, seed=1234):
        x = x.to(device)
        losses.append(model(input_ids=x, labels=x).loss.float().item())
    return sum(losses) / len(losses)


def train(name, model, optimizer, train_tokens, eval_tokens, args, device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, step_times, opt_times, peak_opt_grad = [], [], [], 0
    for step, x in enumerate(batches(train_tokens, args.batch_size, args.seq_len, args.steps, args.seed)):
        x = x.to(device)
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        grad_bytes = tensor_bytes(p.grad for p in model.parameters()) + taken_grad_bytes(optimizer)
        sync()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        peak_opt_grad = max(peak_opt_grad, optimizer_bytes(optimizer) + grad_bytes)
        losses.append(loss.item())
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        if step % max(1, args.steps // 8) == 0 or step == args.steps - 1:
            print(f"  [{name}] step {step:4d}  loss {loss.item():.4f}")
    result = {
        "losses": losses,
        "eval": eval_loss(model, eval_tokens, args, device),
        "step_ms": 1e3 * statistics.median(step_times[2:]),
        "opt_ms": 1e3 * statistics.median(opt_times[2:]),
        "opt_grad_mb": peak_opt_grad / 2**20,
        "weights_mb": tensor_bytes(model.parameters()) / 2**20,
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def save_plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        window = 10
        losses = r["losses"]
        smooth = [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(smooth, label=f"{name} (eval {r['eval']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (mean of last {window})")
    ax.set_title("Byte-level Llama on Python stdlib sources")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--switch-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratio", type=float, default=0.0, help="also run BlockOptimizerRatio (0: skip)")
    parser.add_argument("--out", default="demo_out")
    args = parser.parse_args()
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)

    train_files, eval_files = split_by_file(stdlib_sources("*.py", max_bytes=4 << 20), eval_every=20)
    train_tokens, eval_tokens = as_tokens(train_files), as_tokens(eval_files)
    base = byte_llama(args.layers, args.hidden, args.seq_len, args.seed)
    params = sum(p.numel() for p in base.parameters())
    corpus_mib = (len(train_tokens) + len(eval_tokens)) / 2**20
    print(
        f"device {device}, torch {torch.__version__}; model {params / 1e6:.2f}M params, "
        f"{args.layers} layers; "
        f"corpus {corpus_mib:.1f} MiB of stdlib sources ({len(eval_files)} of "
        f"{len(train_files) + len(eval_files)} files held out for eval); "
        f"{args.steps} steps of {args.batch_size}x{args.seq_len} tokens"
    )

    results = {}
    model = bf16_weights(copy.deepcopy(base).to(device))
    optimizer = BlockAdamW(
        model, lr=args.lr, switch_every=args.switch_every, switch_mode="random", include_embedding=True,
        include_lm_head=True, seed=args.seed, verbose=0,
    )  # fmt: skip
    print("BlockAdamW (bf16 weights, exact fp32 master via 'remainder', one block active at a time)")
    results["BlockAdamW bf16"] = train(
        "BlockAdamW", model, optimizer, train_tokens, eval_tokens, args, device
    )

    if args.ratio > 0:
        model = bf16_weights(copy.deepcopy(base).to(device))
        optimizer = BlockOptimizerRatio(
            model.parameters(), list(model.named_parameters()), update_ratio=args.ratio,
            switch_every=args.switch_every, lr=args.lr, verbose=0,
        )  # fmt: skip
        print(f"BlockOptimizerRatio (bf16 weights, {args.ratio:.0%} of each weight per mask period)")
        results["BlockOptimizerRatio bf16"] = train(
            "BlockOptimizerRatio", model, optimizer, train_tokens, eval_tokens, args, device
        )

    model = copy.deepcopy(base).to(device=device, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    print("Full AdamW (fp32 weights, torch fused AdamW over every parameter)")
    results["AdamW fp32"] = train("AdamW", model, optimizer, train_tokens, eval_tokens, args, device)

    print()
    cuda_col = device.type == "cuda"
    header = (
        "| optimizer | final train loss (mean of last 10) | eval loss | step ms | optimizer ms "
        "| optimizer+grad MiB | weights MiB |"
    )
    print(header + (" peak CUDA MiB |" if cuda_col else ""))
    print("|---" * (7 + cuda_col) + "|")
    for name, r in results.items():
        row = (
            f"| {name} | {statistics.fmean(r['losses'][-10:]):.4f} | {r['eval']:.4f} | {r['step_ms']:.1f} "
            f"| {r['opt_ms']:.2f} | {r['opt_grad_mb']:.1f} | {r['weights_mb']:.1f} |"
        )
        print(row + (f" {r['peak_cuda_mb']:.0f} |" if cuda_col else ""))
    path = os.path.join(args.out, "loss_curve.png")
    save_plot(results, path)
    print(f"\nloss curves saved to {path}")


if __name__ == "__main__":
    main()

"""Optimizer step time and memory: BlockAdamW (each master mode) vs the badam package vs full torch
AdamW(fused), on the same bf16 Llama-shaped model. Prints a markdown table for bench/RESULTS.md.

    python bench/optimizer_step.py [--layers 6 --hidden 1024] [--device cuda] [--reps 20]

Only optimizer.step() is timed: before each step the active parameters get precomputed bf16
gradients, so forward/backward cost (the same for every block method) does not blur the comparison.
Memory is counted per active parameter:
  * held: bytes the optimizer keeps between steps (Adam state, masters/remainders), walked tensor by
    tensor after the step;
  * peak in step: the largest total of live allocations made during step() (torch.profiler's memory
    events; CPU and CUDA allocators both report), i.e. transient copies such as badam's fp32 gradients;
  * opt+grad: held + the bf16 gradients that exist when step() starts + peak in step (frees of those
    gradients during the step count against the peak): the optimizer+gradient footprint at the
    worst moment of a training step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from badam_kernels import BlockAdamW

SWITCH_EVERY = 10**9  # never switch while timing: every step updates the same (first) block


def build_model(layers: int, hidden: int, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def make_badam(model, lr):
    from badam import BlockOptimizer

    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    opt = BlockOptimizer(
        base, list(model.named_parameters()), switch_block_every=SWITCH_EVERY, switch_mode="ascending",
        verbose=0,
    )  # fmt: skip

    def held() -> int:  # fp32 masters of the active block plus the base optimizer's m and v
        masters = tensor_bytes(opt.param_idx2hp.values())
        return masters + sum(tensor_bytes(s.values()) for s in base.state.values())

    return opt, held


def make_block_adamw(mode):
    def make(model, lr):
        opt = BlockAdamW(
            model, lr=lr, switch_every=SWITCH_EVERY, switch_mode="ascending", master_weights=mode, verbose=0
        )
        return opt, lambda: sum(tensor_bytes(s.values()) for s in opt.state.values())

    return make


def make_full_adamw(model, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    return opt, lambda: sum(tensor_bytes(s.values()) for s in opt.state.values())


def peak_allocated_during(fn, device: torch.device) -> int:
    """Peak of (bytes allocated - bytes freed) over the call. The profiler attributes each
    allocation to the innermost op that made it and reports frees as "[memory]" events; replaying
    the leaf events in time order gives the live total (outer events only re-count them)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    field = "self_device_memory_usage" if device.type == "cuda" else "self_cpu_memory_usage"
    live = peak = 0
    leaves = (e for e in prof.events() if not e.cpu_children)
    for event in sorted(leaves, key=lambda e: e.time_range.start):
        live += getattr(event, field)
        peak = max(peak, live)
    return peak


def measure(name, make, args, device) -> dict:
    model = build_model(args.layers, args.hidden, device)
    opt, held_bytes = make(model, 1e-5)
    active = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(1)
    grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(device, torch.bfloat16) for p in active]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        for p, g in zip(active, grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: allocates the state
        step()
    times = []
    for _ in range(args.reps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    for p, g in zip(active, grads):
        p.grad = g.clone()  # owned by the parameter only, so an optimizer that frees it early gets credit
    peak = peak_allocated_during(opt.step, device)
    numel = sum(p.numel() for p in active)
    held = held_bytes()
    return {
        "name": name,
        "active": numel,
        "ms": 1e3 * statistics.median(times),
        "held": held / numel,
        "peak": peak / numel,
        "total": (held + tensor_bytes(grads) + peak) / numel,
        "total_mib": (held + tensor_bytes(grads) + peak) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    runs = [
        ("BlockAdamW remainder", make_block_adamw("remainder")),
        ("BlockAdamW fp32", make_block_adamw("fp32")),
        ("BlockAdamW none", make_block_adamw("none")),
        ("badam 1.4 (AdamW base)", make_badam),
        ("torch AdamW(fused), all params", make_full_adamw),
    ]
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"model: bf16 Llama, {args.layers} layers, hidden {args.hidden}"
    )
    results = [measure(name, make, args, device) for name, make in runs]
    badam_ms = next(r["ms"] for r in results if r["name"].startswith("badam"))
    print("| optimizer | params updated | step (ms) | vs badam | held B/param | step peak B/param | "
          "opt+grad B/param | opt+grad MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['name']} | {r['active'] / 1e6:.1f}M | {r['ms']:.2f} | {badam_ms / r['ms']:.2f}x "
            f"| {r['held']:.1f} | {r['peak']:.1f} | {r['total']:.1f} | {r['total_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()

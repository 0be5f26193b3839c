"""End-to-end fine-tuning step: BlockAdamW vs badam's BlockOptimizer vs torch AdamW(fused), bf16.

    python bench/e2e_step.py [--model 1b|tiny] [--device cuda] [--batch 4 --seq 512] [--steps 10]
                             [--png out.png] [--json out.json]

One step = forward, backward and optimizer.step() on a randomly initialised Llama built from
LlamaConfig (nothing is downloaded; "1b" is TinyLlama-1.1B's shape, "tiny" a 2-layer toy for
testing the script on a CPU), bf16 weights, random tokens. Methods:
  * BlockAdamW, master_weights "auto" (= "remainder" for bf16), one layer active;
  * badam 1.4's BlockOptimizer around torch.optim.AdamW(fused=True), the same layer active;
  * torch.optim.AdamW(fused=True) on every parameter (plain bf16 full fine-tuning).
The active layer is the middle one for both block methods (backward runs from the head down to it)
and never switches while timing. Each method gets a fresh model from the same seed. Reported:
median step time after warm-up steps (CUDA synchronised), peak allocated memory during the timed
steps (CUDA only) and the last loss. A method whose package is missing (badam) is reported as such.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from badam_kernels import BlockAdamW

SWITCH_NEVER = 10**9
MODELS = {
    # TinyLlama-1.1B: 1.10e9 parameters.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}  # fmt: skip


def build_model(name: str, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(**MODELS[name], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 on the device: no fp32 copy first
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)


def make_block_adamw(model, lr: float, layer: int):
    return BlockAdamW(
        model, lr=lr, switch_every=SWITCH_NEVER, switch_mode="ascending", start_block=layer, verbose=0
    )


def make_badam(model, lr: float, layer: int):
    from badam import BlockOptimizer

    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    return BlockOptimizer(
        base, list(model.named_parameters()), switch_block_every=SWITCH_NEVER, start_block=layer,
        switch_mode="ascending", verbose=0,
    )  # fmt: skip


def make_full_adamw(model, lr: float, layer: int):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)


METHODS = {
    "BlockAdamW (remainder)": make_block_adamw,
    "badam 1.4 BlockOptimizer (AdamW fused)": make_badam,
    "torch AdamW(fused), all params": make_full_adamw,
}


def run(name: str, make, args, device: torch.device) -> dict:
    model = build_model(args.model, device)
    optimizer = make(model, 1e-5, model.config.num_hidden_layers // 2)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> torch.Tensor:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "method": name,
        "updated_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "step_ms": 1e3 * statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss": loss.item(),
    }


def table(results: list[dict]) -> list[str]:
    badam = next((r for r in results if r["method"].startswith("badam") and "step_ms" in r), None)
    lines = [
        "| method | params updated per step | step (ms) | vs badam | peak allocated (GiB) | last loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | - | - | - | - | {r['error']} |")
            continue
        speed = f"{badam['step_ms'] / r['step_ms']:.2f}x" if badam else "-"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        updated = f"{r['updated_params'] / 1e6:.3g}M of {r['total_params'] / 1e6:.3g}M"
        lines.append(
            f"| {r['method']} | {updated} | {r['step_ms']:.1f} | {speed} | {peak} | {r['loss']:.3f} |"
        )
    return lines


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "step_ms" in r]
    names = [r["method"].split(" (")[0] for r in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, [r["step_ms"] for r in ok], color="tab:blue")
    left.set_ylabel("step time (ms)")
    if all(r["peak_gib"] is not None for r in ok):
        right.bar(names, [r["peak_gib"] for r in ok], color="tab:orange")
        right.set_ylabel("peak allocated (GiB)")
    else:
        right.text(0.5, 0.5, "peak memory is measured on CUDA only", ha="center", va="center")
        right.set_axis_off()
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--png", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    title = (
        f"Llama {args.model} bf16, batch {args.batch} x {args.seq} tokens, {device.type} ({name}), "
        f"torch {torch.__version__}"
    )
    print(title, flush=True)
    results = []
    for method, make in METHODS.items():
        try:
            results.append(run(method, make, args, device))
        except ImportError as exc:  # badam is not installed
            results.append({"method": method, "error": f"not run: {exc}"})
        gc.collect()  # the last method's model and optimizer state
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"done: {method}", flush=True)
    print("\n".join(table(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "results": results}, f, indent=1)
    if args.png:
        plot(results, args.png, title)


if __name__ == "__main__":
    main()

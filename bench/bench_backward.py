"""Backward time of BAdam against full fine-tuning: the block-coordinate saving the BAdam paper
reports (backward stops at the active block), with and without gradient checkpointing.

A small Llama built from LlamaConfig (fp32 on CPU, GPU when present) on byte windows of
standard-library text. Each case times loss.backward() only (the forward is not timed), median
of several repetitions after a warm-up:

- full: every parameter trainable (what full AdamW needs)
- BAdam, active block near the output (last layer): backward runs through the head and one layer
- BAdam, active block near the input (layer 0): backward runs through every layer, computing
  activation gradients only for the frozen ones, weight gradients for one
- the same under gradient checkpointing, with BlockAdamW's backward cut (default) and without
  it (transformers' checkpointing makes the embedding output require grad, so without the cut
  backward recomputes and traverses every frozen layer even for the top block).

    python bench/bench_backward.py [--layers 8] [--hidden 256] [--seq-len 256] [--batch 4] [--reps 5]
                                   [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from badam_kernels import BlockAdamW


@dataclass(frozen=True)
class Case:
    name: str
    active_layer: int | None  # None: full fine-tuning
    checkpointing: bool = False
    truncate_backward: bool = True


def build_model(layers: int, hidden: int, seq_len: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=seq_len, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device)


def text_tokens(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Byte windows of the standard library's own sources: real text, no download."""
    data = b"".join(p.read_bytes() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40])
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    starts = torch.randint(0, len(tokens) - seq_len, (batch,), generator=torch.Generator().manual_seed(0))
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long().to(device)


def time_backward(base, case: Case, tokens: torch.Tensor, reps: int) -> float:
    """Median seconds of loss.backward() for `case`."""
    model = copy.deepcopy(base)
    model.train()
    optimizer = None
    if case.checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable's rename
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case.active_layer is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fp32 parameters: fine for timing
            optimizer = BlockAdamW(
                model, lr=1e-5, switch_mode="fixed", start_block=case.active_layer,
                truncate_backward=case.truncate_backward, verbose=0,
            )  # fmt: skip
    times = []
    for rep in range(reps + 1):
        loss = model(input_ids=tokens, labels=tokens).loss
        sync(tokens.device)
        start = time.perf_counter()
        loss.backward()
        sync(tokens.device)
        if rep:  # the first repetition warms up allocator and kernels
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    del optimizer
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = build_model(args.layers, args.hidden, args.seq_len, device)
    tokens = text_tokens(args.batch, args.seq_len, device)
    top = args.layers - 1
    cases = [
        Case("full (all parameters trainable)", None),
        Case(f"BAdam, active layer {top} (near output)", top),
        Case(f"BAdam, active layer {args.layers // 2} (middle)", args.layers // 2),
        Case("BAdam, active layer 0 (near input)", 0),
        Case("checkpointing: full", None, checkpointing=True),
        Case(f"checkpointing: BAdam layer {top}, backward cut", top, checkpointing=True),
        Case(f"checkpointing: BAdam layer {top}, no cut", top, checkpointing=True, truncate_backward=False),
        Case("checkpointing: BAdam layer 0, backward cut", 0, checkpointing=True),
    ]
    print(
        f"Llama {args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq_len} tokens, "
        f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.reps}"
    )
    results = {case: time_backward(base, case, tokens, args.reps) for case in cases}
    reference = {False: results[cases[0]], True: results[cases[4]]}
    width = max(len(case.name) for case in cases)
    print(f"| {'case':<{width}} | backward ms | vs full |")
    print(f"|{'-' * (width + 2)}|------------:|--------:|")
    for case, seconds in results.items():
        ratio = seconds / reference[case.checkpointing]
        print(f"| {case.name:<{width}} | {seconds * 1e3:11.1f} | {ratio:6.2f}x |")


if __name__ == "__main__":
    main()

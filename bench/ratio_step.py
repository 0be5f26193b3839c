"""Ratio mode: BlockOptimizerRatio vs badam's BlockOptimizerRatio on a bf16 Llama-shaped model.
Prints a markdown table for bench/RESULTS.md.

    python bench/ratio_step.py [--layers 6 --hidden 1024] [--ratio 0.1] [--device cuda] [--reps 5]

In ratio mode the optimizer works in two places: each parameter's post-accumulate-grad hook
during backward (badam: a sparse COO gradient from its mask; here: the selected entries copied
and the dense gradient freed) and step(). Timed:
  * optimizer (ms): every trainable parameter gets a precomputed bf16 gradient and its hook is
    called, as autograd calls it after accumulating that gradient, then step(): the optimizer's
    whole work per training step, without a backward pass around it;
  * train step (ms): forward, backward and step on a text batch (4 x 128 byte tokens).
Times are the minimum over --reps repetitions run interleaved (each optimizer once per round),
the least disturbed sample on a shared machine. Masks stay fixed while timing (switch_every is
never reached): these are steps within a mask period; building the masks once per period is not
included.
Bytes per model parameter, after backward and before step():
  * grads: what the gradients hold then (here the compact selection; badam's sparse COO values and
    int64 indices);
  * masks: index storage kept for the masks (badam's COO masks; here int32 indices for "scatter");
  * state: Adam state and masters held after step();
  * step peak: the largest live total of allocations inside step() (torch.profiler memory events).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from optimizer_step import build_model, peak_allocated_during, tensor_bytes

from badam_kernels import BlockOptimizerRatio

SWITCH_EVERY = 10**9
BATCH, SEQ = 4, 128


def sparse_bytes(t: torch.Tensor) -> int:
    return tensor_bytes([t._values(), t._indices()]) if t.is_sparse else tensor_bytes([t])


class Run:
    """One optimizer on its own model: the timed units and the memory it holds."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.model = build_model(ARGS.layers, ARGS.hidden, device)
        self.opt, self.hook = self.build()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(1)
        self.grads = [(torch.randn(p.shape, generator=generator) * 1e-3).to(device, torch.bfloat16)
                      for p in self.trainable]  # fmt: skip
        self.tokens = torch.randint(0, 256, (BATCH, SEQ), generator=generator).to(device)
        self.times: dict[str, list[float]] = {"optimizer": [], "train": []}

    def build(self) -> tuple[torch.optim.Optimizer, Callable[[torch.Tensor], None]]:
        raise NotImplementedError

    def held(self) -> dict[str, int]:
        raise NotImplementedError

    def take_gradients(self, grads) -> None:
        for p, g in zip(self.trainable, grads):
            p.grad = g
            self.hook(p)

    def optimizer_work(self, grads) -> None:
        self.take_gradients(grads)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def train(self) -> None:
        self.model(input_ids=self.tokens, labels=self.tokens).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def fresh_grads(self) -> list[torch.Tensor]:
        """Copies made outside the timed region: the hooks may change gradients in place."""
        return [g.clone() for g in self.grads]

    def memory(self, device: torch.device) -> dict[str, float]:
        self.take_gradients(self.fresh_grads())
        after_backward = self.held()
        peak = peak_allocated_during(self.opt.step, device)
        state = self.held()["state"]
        self.opt.zero_grad(set_to_none=True)
        numel = sum(p.numel() for p in self.model.parameters())
        return {
            "grads": after_backward["grads"] / numel,
            "masks": after_backward["masks"] / numel,
            "state": state / numel,
            "peak": peak / numel,
        }


class Ours(Run):
    def __init__(self, mode: str, master_weights: str, device: torch.device) -> None:
        self.mode, self.master_weights = mode, master_weights
        super().__init__(f"BlockOptimizerRatio {master_weights}", device)

    def build(self):
        opt = BlockOptimizerRatio(
            self.model.parameters(), list(self.model.named_parameters()), switch_every=SWITCH_EVERY,
            mask_mode=self.mode, lr=1e-5, verbose=0, master_weights=self.master_weights,
            update_ratio=ARGS.ratio,
        )  # fmt: skip
        return opt, opt._take_gradient  # the post-accumulate-grad hook

    def held(self) -> dict[str, int]:
        summary = self.opt.memory_summary()
        return {
            "grads": summary["grad_bytes"],
            "masks": summary["index_bytes"],
            "state": summary["state_bytes"] + summary["master_bytes"],
        }


class Badam(Run):
    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        super().__init__("badam 1.4", device)

    def build(self):
        from badam import BlockOptimizerRatio as BadamRatio

        opt = BadamRatio(
            self.model.parameters(), list(self.model.named_parameters()), switch_every=SWITCH_EVERY,
            mask_mode=self.mode, lr=1e-5, verbose=0, update_ratio=ARGS.ratio,
        )  # fmt: skip
        return opt, opt.sparse_hook  # the post-accumulate-grad hook

    def held(self) -> dict[str, int]:
        return {
            "grads": sum(sparse_bytes(p.grad) for p in self.model.parameters() if p.grad is not None),
            "masks": sum(sparse_bytes(m) for m in self.opt.mask_dict.values() if m is not None),
            "state": sum(tensor_bytes(s.values()) for s in self.opt.state.values()),
        }


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return 1e3 * (time.perf_counter() - start)


def table(mode: str, device: torch.device, sync) -> None:
    runs = [Ours(mode, "remainder", device), Ours(mode, "none", device), Badam(mode, device)]
    for run in runs:  # warm-up: builds the masks and the state
        run.optimizer_work(run.fresh_grads())
    for _ in range(ARGS.reps):
        for run in runs:
            grads = run.fresh_grads()
            run.times["optimizer"].append(timed(lambda run=run, grads=grads: run.optimizer_work(grads), sync))
            run.times["train"].append(timed(run.train, sync))
    results = [
        {"name": run.name, "optimizer_ms": min(run.times["optimizer"]), "train_ms": min(run.times["train"]),
         **run.memory(device)}
        for run in runs
    ]  # fmt: skip
    theirs = results[-1]
    for r in results:
        print(
            f"| {mode} | {r['name']} | {r['optimizer_ms']:.1f} "
            f"| {theirs['optimizer_ms'] / r['optimizer_ms']:.1f}x | {r['train_ms']:.0f} "
            f"| {theirs['train_ms'] / r['train_ms']:.2f}x | {r['grads']:.2f} "
            f"| {r['masks']:.2f} | {r['state']:.2f} | {r['peak']:.2f} |"
        )


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    ARGS = parser.parse_args()
    device = torch.device(ARGS.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} model: bf16 Llama, "
        f"{ARGS.layers} layers, hidden {ARGS.hidden}; update_ratio {ARGS.ratio}, keep_mask=True; "
        f"min of {ARGS.reps} interleaved repetitions"
    )
    print("| mask | optimizer | optimizer (ms) | vs badam | train step (ms) | vs badam | grads B/param "
          "| masks B/param | state B/param | step peak B/param |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in ("adjacent", "scatter"):
        table(mode, device, sync)


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()

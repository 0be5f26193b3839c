"""Convergence on real text: BlockAdamW vs badam vs full AdamW vs LoRA (r8, r64), 3 lrs each.

    python bench/convergence.py [--quick] [--steps 240] [--device cuda] [--out bench/out]

The setting is a fine-tuning one, without downloads:
  * base model: a byte-level Llama built from LlamaConfig, pretrained here (full AdamW, fp32) on
    the top-level standard-library modules ("*.py") and cached in --out;
  * fine-tuning data: the stdlib's own test suite ("test/test_*.py"), a different domain (unittest
    code), split by file: every 10th file is held out, and eval loss is measured on those files;
  * every run starts from the same base weights and sees the same token batches, in the same order.

Methods, each with a sweep of 3 learning rates (weight decay 0 everywhere, betas 0.9/0.999):
  * BlockAdamW: bf16 weights, master_weights="auto" (an exact fp32 master as an int16 remainder);
  * badam: badam.BlockOptimizer (PyPI) wrapping torch.optim.AdamW, bf16 weights;
    both block methods train one transformer layer at a time, "ascending" order, every block
    visited several times; embedding, final norm and lm_head stay frozen (both packages' default);
  * full AdamW: fp32 weights and torch.optim.AdamW on every parameter, fp32 forward (the usual
    baseline: in bf16 without a master copy small updates would round away);
  * LoRA r8 / r64: peft on every linear layer of the blocks ("all-linear", not lm_head), lora_alpha
    = 2 * rank, on the bf16 base model with peft's default fp32 adapters, torch.optim.AdamW.

Every run is a fresh child process (fork on Linux CPU, else spawn) so the memory numbers are its own:
  * train bytes: the largest total, over the run, of weights + gradients + optimizer state (Adam
    moments, masters/remainders, badam's fp32 copies and fp32 gradients), walked tensor by tensor
    after each backward and inside each step of the torch optimizer doing the arithmetic;
  * CPU: peak RSS growth (VmHWM, reset at the start of the run, minus RSS then), which also counts
    activations and allocator caching; CUDA: torch.cuda.max_memory_allocated.
The table's eval loss runs the final weights in fp32 for every method; the eval points along the
curves use each run's own weights and dtype. Writes convergence.md (table), convergence.json (all
curves) and convergence.png to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
from stdlib_text import (  # noqa: E402
    as_tokens,
    bf16_weights,
    byte_llama,
    fixed_batches,
    split_by_file,
    stdlib_sources,
)

LR_GRIDS = {
    "BlockAdamW": (3e-4, 1e-3, 3e-3),
    "badam": (3e-4, 1e-3, 3e-3),
    "full AdamW": (3e-4, 1e-3, 3e-3),
    "LoRA r8": (1e-3, 3e-3, 1e-2),
    "LoRA r64": (3e-4, 1e-3, 3e-3),
}
WEIGHTS = {  # the weights' dtype and who does the arithmetic, for the table
    "BlockAdamW": "bf16, fused AdamW, int16 remainder master",
    "badam": "bf16, torch AdamW on fp32 copy of block",
    "full AdamW": "fp32, torch AdamW (default implementation)",
    "LoRA r8": "bf16 base + fp32 adapters, torch AdamW",
    "LoRA r64": "bf16 base + fp32 adapters, torch AdamW",
}
PRETRAIN_GLOB = "*.py"
FINETUNE_GLOB = "test/test_*.py"
FINETUNE_MAX_BYTES = 6 << 20
EVAL_EVERY_FILE = 10  # every 10th fine-tuning file is held out


@dataclass(frozen=True)
class Setup:
    """Everything shared by all runs."""

    device: str
    layers: int
    hidden: int
    seq_len: int
    batch_size: int
    steps: int
    switch_every: int
    eval_points: int
    eval_batches: int
    pretrain_steps: int
    pretrain_lr: float
    seed: int
    out: str

    @property
    def base_path(self) -> str:
        key = (
            f"L{self.layers}_H{self.hidden}_T{self.seq_len}_B{self.batch_size}_P{self.pretrain_steps}"
            f"_{self.seed}"
        )
        return os.path.join(self.out, f"convergence_base_{key}.pt")


# ---- data ---------------------------------------------------------------------------------------


def finetune_data(setup: Setup) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """(train batches, held-out eval batches, a description): the same for every run."""
    files = stdlib_sources(FINETUNE_GLOB, max_bytes=FINETUNE_MAX_BYTES)
    train_files, eval_files = split_by_file(files, eval_every=EVAL_EVERY_FILE)
    train_tokens, eval_tokens = as_tokens(train_files), as_tokens(eval_files)
    train = fixed_batches(train_tokens, setup.batch_size, setup.seq_len, setup.steps, seed=setup.seed)
    held_out = fixed_batches(eval_tokens, setup.batch_size, setup.seq_len, setup.eval_batches, seed=12345)
    about = {
        "train_files": len(train_files),
        "eval_files": len(eval_files),
        "train_mib": len(train_tokens) / 2**20,
        "eval_mib": len(eval_tokens) / 2**20,
    }
    return train, held_out, about


# ---- memory ----------------------------------------------------------------------------------------


def _tensors_in(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)


def training_bytes(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes alive now in weights, gradients and optimizer state, each storage counted once.
    Optimizer parameters that are not model weights (badam's fp32 block copies) count as state."""
    seen: set[tuple] = set()

    def nbytes(tensors: Iterable[torch.Tensor | None]) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            if key not in seen and storage.nbytes():
                seen.add(key)
                total += storage.nbytes()
        return total

    params = list(model.parameters())
    weights = nbytes(params)
    grads = nbytes(p.grad for p in params)
    state = 0
    for opt in optimizers:
        group_params = [p for g in opt.param_groups for p in g["params"]]
        state += nbytes(_tensors_in(dict(opt.state)))
        state += nbytes(group_params) + nbytes(p.grad for p in group_params)
    return {"weights": weights, "grads": grads, "state": state}


class PeakMeter:
    """The largest training_bytes total seen at the moments it is asked to look."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizers = [optimizer]
        if isinstance(getattr(optimizer, "base_optimizer", None), torch.optim.Optimizer):
            self.optimizers.append(optimizer.base_optimizer)
        self.peak = {"weights": 0, "grads": 0, "state": 0}
        # After torch's AdamW step returns, its gradients and new state are both alive: for full
        # AdamW, LoRA and badam's inner AdamW (on fp32 copies and fp32 grads) this is the peak.
        for opt in self.optimizers:
            opt.register_step_post_hook(lambda *_: self.look())

    def look(self) -> None:
        now = training_bytes(self.model, self.optimizers)
        if sum(now.values()) > sum(self.peak.values()):
            self.peak = now


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- methods ---------------------------------------------------------------------------------------


def make_optimizer(method: str, model: torch.nn.Module, lr: float, setup: Setup):
    """(model to train, optimizer) for `method`; `model` is the fp32 base model."""
    if method == "full AdamW":
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model = bf16_weights(model)
    if method == "BlockAdamW":
        from badam_kernels import BlockAdamW

        opt = BlockAdamW(model, lr=lr, switch_every=setup.switch_every, switch_mode="ascending", verbose=0)
        return model, opt
    if method == "badam":
        import badam

        base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        opt = badam.BlockOptimizer(
            base, list(model.named_parameters()), switch_block_every=setup.switch_every,
            switch_mode="ascending", verbose=0,
        )  # fmt: skip
        return model, opt
    if method.startswith("LoRA r"):
        from peft import LoraConfig, get_peft_model

        rank = int(method.removeprefix("LoRA r"))
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown method {method!r}; expected one of {list(LR_GRIDS)}")


# ---- one run (in a child process) -------------------------------------------------------------------


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, held_out: list[torch.Tensor], device: torch.device) -> float:
    losses = [model(input_ids=x.to(device), labels=x.to(device)).loss.float().item() for x in held_out]
    return statistics.fmean(losses)


def pretrain(setup: Setup) -> dict:
    """Train the base model with full AdamW (fp32, warmup + cosine) on the top-level stdlib modules."""
    device = torch.device(setup.device)
    model = byte_llama(setup.layers, setup.hidden, setup.seq_len, setup.seed).to(device)
    tokens = as_tokens(stdlib_sources(PRETRAIN_GLOB))
    opt = torch.optim.AdamW(model.parameters(), lr=setup.pretrain_lr, weight_decay=0.0)
    warmup = max(1, setup.pretrain_steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, setup.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.perf_counter()
    batches = fixed_batches(
        tokens, setup.batch_size, setup.seq_len, setup.pretrain_steps, seed=setup.seed + 1
    )
    losses = []
    for x in batches:
        x = x.to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, setup.base_path)
    return {"seconds": time.perf_counter() - start, "final_train_loss": statistics.fmean(losses[-10:])}


def describe_base(setup: Setup) -> dict:
    """The base model's held-out loss before fine-tuning (fp32), its size, and the data sizes."""
    device = torch.device(setup.device)
    _, held_out, about = finetune_data(setup)
    model = byte_llama(setup.layers, setup.hidden, setup.seq_len, setup.seed)
    model.load_state_dict(torch.load(setup.base_path))
    params = sum(p.numel() for p in model.parameters())
    return {"eval_loss": eval_loss(model.to(device), held_out, device), "params": params, **about}


def _import_child_modules() -> None:
    """Import once in the parent, so that forked children start without paying for it. Nothing
    here runs a torch kernel: a parent that had started OpenMP threads could not fork safely."""
    import badam  # noqa: F401
    import peft  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import badam_kernels  # noqa: F401


def run(setup: Setup, method: str, lr: float) -> dict:
    """Fine-tune the base model with `method` at `lr`; losses, eval curve, time and memory."""
    # badam prints at every block switch; peft calls a deprecated transformers property
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    with contextlib.redirect_stdout(io.StringIO()):
        return _fine_tune(setup, method, lr)


def _fine_tune(setup: Setup, method: str, lr: float) -> dict:
    device = torch.device(setup.device)
    sync = _sync(device)
    train, held_out, _ = finetune_data(setup)
    _import_child_modules()  # a no-op after fork; after spawn, keeps import memory out of the peak
    rss_resettable = device.type == "cpu" and reset_peak_rss()
    rss_start = _vm_kib("VmRSS") if rss_resettable else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = byte_llama(setup.layers, setup.hidden, setup.seq_len, setup.seed)
    model.load_state_dict(torch.load(setup.base_path))
    model, optimizer = make_optimizer(method, model.to(device), lr, setup)
    meter = PeakMeter(model, optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # block methods: one block
    eval_at = {round(setup.steps * (k + 1) / setup.eval_points) for k in range(setup.eval_points)}

    losses, step_seconds, step_cpu_seconds, evals = [], [], [], []
    for step, x in enumerate(train, start=1):
        x = x.to(device)
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        meter.look()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        step_seconds.append(time.perf_counter() - start)
        step_cpu_seconds.append(time.process_time() - start_cpu)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break  # diverged: recorded as such, the sweep goes on
        if step in eval_at:
            evals.append((step, eval_loss(model, held_out, device)))

    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (_vm_kib("VmHWM") - rss_start) / 2**10 if rss_resettable else math.nan
    # The final eval runs the trained weights in fp32 for every method, so the bf16 forward of
    # the bf16-weight methods does not blur the comparison of what the optimizers learned.
    final_eval = eval_loss(model.float(), held_out, device) if math.isfinite(losses[-1]) else math.nan
    return {
        "method": method,
        "lr": lr,
        "losses": losses,
        "evals": evals,
        "final_eval": final_eval,
        "train_seconds": sum(step_seconds),
        "train_cpu_seconds": sum(step_cpu_seconds),
        "step_ms": 1e3 * statistics.median(step_seconds),
        "trainable": trainable,
        "weights_mib": meter.peak["weights"] / 2**20,
        "grads_mib": meter.peak["grads"] / 2**20,
        "state_mib": meter.peak["state"] / 2**20,
        "peak_mib": peak_mib,
    }


# ---- driver, table and plot -----------------------------------------------------------------------


def in_child(pool_context, fn, *args):
    """fn(*args) in a fresh process, so its peak memory is its own."""
    with pool_context.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


def best_runs(results: list[dict]) -> dict[str, dict]:
    best = {}
    for r in results:
        score = r["final_eval"] if math.isfinite(r["final_eval"]) else math.inf
        current = best.get(r["method"])
        if current is None or score < current["final_eval"] or not math.isfinite(current["final_eval"]):
            best[r["method"]] = r
    return best


def table(results: list[dict], setup: Setup, base: dict, command: str) -> str:
    """The markdown table (one row per method, at its best lr) with the setup above and notes below."""
    best = best_runs(results)
    tokens = setup.steps * setup.batch_size * setup.seq_len
    on_cuda = setup.device.startswith("cuda")
    memory = "peak CUDA MiB" if on_cuda else "peak RSS growth MiB"
    visits = setup.steps / (setup.switch_every * setup.layers)
    lines = [
        f"`{command}` — device {setup.device}, torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        f"Byte-level Llama ({setup.layers} layers, hidden {setup.hidden}, "
        f"{base['params'] / 1e6:.2f}M params) pretrained {setup.pretrain_steps} steps on the stdlib's "
        "top-level modules, then fine-tuned "
        f"{setup.steps} steps x {setup.batch_size} x {setup.seq_len} = {tokens:,} tokens on "
        f"`Lib/test/test_*.py` ({base['train_files']} files, {base['train_mib']:.1f} MiB); eval on "
        f"{base['eval_files']} held-out test files ({setup.eval_batches} x {setup.batch_size} x "
        f"{setup.seq_len} tokens). Block methods: one layer at a time, {setup.switch_every} steps per block, "
        f"ascending, each block visited {visits:.1f} times. Base model eval loss: {base['eval_loss']:.4f}.",
        "",
        "| method | weights / update | trained per step | eval loss per lr | best lr | eval loss (best lr) "
        "| train loss, last 10 | weights MiB | peak grads + opt state MiB "
        f"| {memory} | train s | ms/step | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in LR_GRIDS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        b = best[method]
        sweep = ", ".join(f"{r['lr']:g}: {r['final_eval']:.3f}" for r in runs)
        peak = f"{b['peak_mib']:.0f}" if math.isfinite(b["peak_mib"]) else "n/a"
        cells = [
            method,
            WEIGHTS[method],
            f"{b['trainable'] / 1e6:.2f}M",
            sweep,
            f"{b['lr']:g}",
            f"**{b['final_eval']:.4f}**",
            f"{statistics.fmean(b['losses'][-10:]):.4f}",
            f"{b['weights_mib']:.1f}",
            f"{b['grads_mib'] + b['state_mib']:.1f}",
            peak,
            f"{b['train_seconds']:.1f}",
            f"{b['step_ms']:.0f}",
            f"{b['train_cpu_seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    memory_note = (
        "torch.cuda.max_memory_allocated, activations included."
        if on_cuda
        else "VmHWM minus RSS at the start of the run, in a fresh process: activations and allocator "
        "caching included, so it is noisier than the walked numbers."
    )
    lines += [
        "",
        "Eval loss: mean cross-entropy (nats/byte) of the final weights run in fp32 on the held-out files; "
        "the best lr is chosen by that same number (3-point grids, so slightly optimistic for every method "
        "alike). Weights / grads / state: walked tensors at the worst moment of a step (badam's fp32 block "
        f"copy and fp32 gradients count as state). {memory}: {memory_note} Time: forward + backward + step "
        "summed over the run (no eval), wall clock and process CPU time (all threads); ms/step is the median "
        "step. The fp32 forward of full AdamW and the bf16 forward of the others differ in speed on their "
        "own.",
    ]
    return "\n".join(lines) + "\n"


def smoothed(
    losses: list[float], tokens_per_step: float, window: int = 10
) -> tuple[list[float], list[float]]:
    """(tokens, mean loss of the last `window` steps), from the first full window on."""
    first = min(window, len(losses))
    means = [statistics.fmean(losses[i - first : i]) for i in range(first, len(losses) + 1)]
    return [i * tokens_per_step for i in range(first, len(losses) + 1)], means


def plot(results: list[dict], setup: Setup, base_loss: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_runs(results)
    methods = [m for m in LR_GRIDS if m in best]
    colors = {m: f"C{i}" for i, m in enumerate(LR_GRIDS)}
    tokens_per_step = setup.batch_size * setup.seq_len / 1e3
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    ax_train, ax_eval = axes[0, 0], axes[0, 1]
    for m in methods:
        r = best[m]
        ax_train.plot(*smoothed(r["losses"], tokens_per_step), color=colors[m], label=f"{m} lr {r['lr']:g}")
        eval_tokens = [0] + [step * tokens_per_step for step, _ in r["evals"]]
        eval_losses = [base_loss] + [loss for _, loss in r["evals"]]
        ax_eval.plot(eval_tokens, eval_losses, "o-", color=colors[m],
                     label=f"{m} lr {r['lr']:g} ({r['final_eval']:.3f})")  # fmt: skip
    ax_train.set_title("train loss (mean of last 10 steps), best lr per method")
    ax_eval.set_title("held-out eval loss, best lr per method (legend: final, fp32)")
    for ax in (ax_train, ax_eval):
        ax.set_xlabel("fine-tuning tokens (thousands)")
        ax.legend(fontsize=8)
    sweep_axes = [axes[0, 2], axes[0, 3], axes[1, 0], axes[1, 1], axes[1, 2]]
    for ax, m in zip(sweep_axes, methods):
        for i, r in enumerate(x for x in results if x["method"] == m):
            ax.plot(*smoothed(r["losses"], tokens_per_step), color=f"C{i}",
                    label=f"lr {r['lr']:g}: eval {r['final_eval']:.3f}")  # fmt: skip
        ax.set_title(f"{m}: lr sweep (train loss, mean of 10)")
        ax.set_xlabel("fine-tuning tokens (thousands)")
        ax.legend(fontsize=8)
    for ax in [*sweep_axes[len(methods) :], axes[1, 3]]:
        ax.axis("off")
    axes[1, 3].text(
        0.0, 0.5,
        f"{setup.layers}-layer byte Llama, hidden {setup.hidden}\n"
        f"pretrained {setup.pretrain_steps} steps on stdlib modules\n"
        f"fine-tuned {setup.steps} steps on stdlib tests\n"
        f"base eval loss {base_loss:.3f}\n"
        f"block methods: {setup.switch_every} steps per layer",
        fontsize=11, va="center",
    )  # fmt: skip
    finite = [v for r in results for v in smoothed(r["losses"], tokens_per_step)[1] if math.isfinite(v)]
    high = min(max(finite), base_loss + 0.5) if finite else base_loss + 0.5
    for ax in [ax_train, ax_eval, *sweep_axes]:
        ax.set_ylim(top=high)
        ax.grid(alpha=0.3)
    fig.suptitle("Fine-tuning a byte-level Llama on Python's test suite: block methods vs full AdamW vs LoRA")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: checks the pipeline")
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default 240; 24 with --quick)")
    parser.add_argument("--switch-every", type=int, help="steps per block (default: 4 visits of every block)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, help="default 256 (128 with --quick)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pretrain-steps", type=int, help="default 200 (20 with --quick)")
    parser.add_argument("--methods", default=",".join(LR_GRIDS), help="comma-separated subset of the methods")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in LR_GRIDS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(LR_GRIDS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    steps = args.steps or (24 if args.quick else 240)
    switch_every = args.switch_every or max(2, steps // (4 * args.layers))
    setup = Setup(
        device=args.device, layers=args.layers, hidden=args.hidden or (128 if args.quick else 256),
        seq_len=args.seq_len, batch_size=args.batch_size, steps=steps, switch_every=switch_every,
        eval_points=3 if args.quick else 4, eval_batches=4 if args.quick else 12,
        pretrain_steps=(20 if args.quick else 200) if args.pretrain_steps is None else args.pretrain_steps,
        pretrain_lr=2e-3, seed=args.seed, out=args.out,
    )  # fmt: skip
    if setup.steps < 2 * setup.switch_every * setup.layers:
        print(f"note: {setup.steps} steps visit each of the {setup.layers} blocks less than twice")
    os.makedirs(setup.out, exist_ok=True)
    # fork keeps the imports of the parent (fast); CUDA cannot be used after fork, so spawn there.
    use_fork = sys.platform == "linux" and not setup.device.startswith("cuda")
    if use_fork:
        _import_child_modules()
    context = multiprocessing.get_context("fork" if use_fork else "spawn")
    if not os.path.exists(setup.base_path):
        print(f"pretraining the base model ({setup.pretrain_steps} steps) ...", flush=True)
        info = in_child(context, pretrain, setup)
        loss = info["final_train_loss"]
        print(f"  {info['seconds']:.0f} s, final train loss {loss:.3f} -> {setup.base_path}")
    base = in_child(context, describe_base, setup)
    print(f"base model: {base}; {setup}", flush=True)

    results = []
    for method in methods:
        for lr in LR_GRIDS[method]:
            r = in_child(context, run, setup, method, lr)
            results.append(r)
            print(
                f"{method:>11} lr {lr:<7g} eval {r['final_eval']:.4f}  train(last10) "
                f"{statistics.fmean(r['losses'][-10:]):.4f}  {r['train_seconds']:6.1f} s  "
                f"weights+grads+state {r['weights_mib'] + r['grads_mib'] + r['state_mib']:.1f} MiB  "
                f"peak {r['peak_mib']:.0f} MiB",
                flush=True,
            )
    command = "python bench/convergence.py " + " ".join(sys.argv[1:])
    markdown = table(results, setup, base, command.strip())
    with open(os.path.join(setup.out, "convergence.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(setup.out, "convergence.json"), "w") as f:
        json.dump({"setup": dataclasses.asdict(setup), "base": base, "runs": results}, f)
    plot(results, setup, base["eval_loss"], os.path.join(setup.out, "convergence.png"))
    print()
    print(markdown)
    print(f"wrote {setup.out}/convergence.md, convergence.json, convergence.png")


if __name__ == "__main__":
    main()

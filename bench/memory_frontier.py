"""Memory frontier: the longest batch-1 sequence that one training step (forward, backward,
optimizer step) fits in a memory budget, per fine-tuning method, and peak memory against sequence
length.

    python bench/memory_frontier.py [--shape proxy|llama3-8b] [--budget-gb GB] [--device cpu|cuda]
        [--methods badam lora badam_kernels badam_kernels_no_chunk] [--min-seq N] [--max-seq N]
        [--common-seq N] [--resolution R] [--time-limit S] [--timed-steps N] [--rss-cap-gb GB]
        [--chunk-size N] [--threads N] [--out-dir DIR]
    python bench/memory_frontier.py --replot DIR    # table and plot again from DIR/memory_frontier.json

The GPU run the README names (Llama-3-8B shape, a 24 GB card emulated on a larger one):

    python bench/memory_frontier.py --shape llama3-8b --budget-gb 24 --device cuda \\
        --min-seq 2048 --max-seq 32768 --resolution 0.25 --time-limit 120 \\
        --out-dir bench/out/frontier_llama3_8b

Model: a Llama built from LlamaConfig (random weights, nothing downloaded), bf16, sdpa attention,
random token ids with labels = inputs. Shapes: "llama3-8b" (hidden 4096, 32 layers, MLP 14336,
32 heads / 8 KV heads, vocabulary 128,256) and "proxy", the CPU stand-in: Llama-3's real 128,256-
token vocabulary (which is what makes long sequences expensive: the logits) with 4 small layers
(hidden 256, MLP 896, 4 heads / 1 KV head).

Methods (the block methods train layer 0, whose backward runs through every layer: the worst
block of the schedule; embedding and head frozen, as both packages default):
  badam                  badam 1.4 `BlockOptimizer` around torch AdamW, transformers' gradient
                         checkpointing (reentrant, input made to require grad), as LLaMA-Factory
                         runs it; transformers' own head and loss
  lora                   peft LoRA r8 (alpha 16) on every linear layer of the blocks, fp32
                         adapters, torch AdamW, the same checkpointing
  badam_kernels          BlockAdamW's memory recipe: the same checkpointing, the backward cut
                         (default), update_in_backward=True, badam_kernels.hf.enable_chunked_loss
  badam_kernels_no_chunk the same without the chunked loss
  head_plain, head_chunked  the head and loss alone (hidden states -> logits -> loss -> backward,
                         frozen head): transformers' computation against linear_cross_entropy

Measurement: peak bytes are the live tensors at the step's worst moment, weights and optimizer
state included; a point fits when they are at most the budget.
  CPU: one fresh process per point. Peak live tensor bytes come from torch.profiler's memory
    events (every allocation and free of the process, in order, since before the model was built;
    their running sum is the live bytes), and peak RSS growth (VmHWM reset at the step's start,
    minus RSS then) is reported next to it. A watchdog thread ends a point whose RSS passes
    --rss-cap-gb (recorded as "killed"), so the search never takes the machine down.
  CUDA: one process per method (a model build per point would cost more device time than the
    steps). The allocator is capped at the budget (set_per_process_memory_fraction) and
    torch.cuda.max_memory_allocated gives the peak; an out-of-memory error means the point does
    not fit.
Search: sequence lengths double from --min-seq while they fit (up to --max-seq), then bisect down
to --resolution (relative) on multiples of 64. --common-seq is always measured, for the table's
peak-bytes and step-time columns. Writes memory_frontier.{md,json,png} to --out-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from convergence import _vm_kib, reset_peak_rss

SHAPES = {
    "proxy": dict(
        hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=128256,
    ),
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256,
    ),
}  # fmt: skip
METHODS = {
    "badam": "badam 1.4 BlockOptimizer + HF checkpointing",
    "lora": "LoRA r8 (peft) + HF checkpointing",
    "badam_kernels": "BlockAdamW: checkpointing + cut + update_in_backward + chunked loss",
    "badam_kernels_no_chunk": "BlockAdamW: checkpointing + cut + update_in_backward",
    "head_plain": "head + loss only: transformers",
    "head_chunked": "head + loss only: chunked",
}
DEFAULT_METHODS = ("badam", "lora", "badam_kernels", "badam_kernels_no_chunk")
KILLED_EXIT = 3  # a worker the RSS watchdog ended
GB = 1e9


@dataclass
class Point:
    """One training step of `method` at `seq` tokens."""

    method: str
    seq: int
    status: str  # "fits", "over budget", "out of memory", "killed", "timeout" or "error: ..."
    peak_bytes: int | None = None  # live tensors at the step's peak (weights and state included)
    start_bytes: int | None = None  # live tensors when the step began
    weight_bytes: int | None = None
    rss_growth_bytes: int | None = None  # CPU only
    step_seconds: float | None = None

    @property
    def fits(self) -> bool:
        return self.status == "fits"


# ---- one method: model, optimizer and a training step ------------------------------------------------


def build_llama(shape: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SHAPES[shape], max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
        use_cache=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no fp32 copy on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.train()


def enable_checkpointing(model) -> None:
    """transformers' gradient checkpointing as LLaMA-Factory enables it (reentrant; the embedding
    output is made to require grad)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing in 5.23
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def make_training_step(method: str, shape: str, device: str, chunk_size: int) -> tuple[Callable, int]:
    """(step(seq), bytes of the model's weights) for `method`."""
    if method.startswith("head_"):
        return make_head_step(method, shape, device, chunk_size)
    model = build_llama(shape, device)
    enable_checkpointing(model)
    if method == "badam":
        from badam import BlockOptimizer

        base = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        optimizer = BlockOptimizer(
            base, list(model.named_parameters()), switch_block_every=50, switch_mode="ascending",
            start_block=0, verbose=0,
        )  # fmt: skip
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, lora)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    elif method in ("badam_kernels", "badam_kernels_no_chunk"):
        from badam_kernels import BlockAdamW
        from badam_kernels.hf import enable_chunked_loss

        if method == "badam_kernels":
            enable_chunked_loss(model, chunk_size=chunk_size)
        optimizer = BlockAdamW(
            model, lr=1e-5, switch_every=50, switch_mode="ascending", start_block=0,
            update_in_backward=True, verbose=0,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    vocab = SHAPES[shape]["vocab_size"]

    def step(seq: int) -> None:
        ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seq)).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return step, sum(weights.values())


def make_head_step(method: str, shape: str, device: str, chunk_size: int) -> tuple[Callable, int]:
    """The head and loss alone: a frozen bf16 head, hidden states that require grad."""
    import torch.nn.functional as F

    from badam_kernels.chunked_loss import linear_cross_entropy

    hidden_size, vocab = SHAPES[shape]["hidden_size"], SHAPES[shape]["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.02).to(device, torch.bfloat16)

    def step(seq: int) -> None:
        hidden = (
            torch.randn(seq, hidden_size, generator=generator).to(device, torch.bfloat16).requires_grad_()
        )
        targets = torch.randint(0, vocab, (seq,), generator=generator).to(device)
        if method == "head_plain":
            loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        else:
            loss = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
        loss.backward()

    return step, weight.numel() * weight.element_size()


# ---- measuring a step -------------------------------------------------------------------------------


def watch_rss(cap_bytes: int) -> None:
    """End this process (exit code KILLED_EXIT) as soon as its RSS passes `cap_bytes`."""

    def watch() -> None:
        while _vm_kib("VmRSS") * 1024 <= cap_bytes:
            time.sleep(0.02)
        os._exit(KILLED_EXIT)

    threading.Thread(target=watch, daemon=True).start()


def live_bytes_in_window(profile, name: str) -> tuple[int, int]:
    """(live bytes when the record_function range `name` began, most live bytes inside it), from
    the CPU memory events of the whole profile."""
    events = profile.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == name)
    begin, end = window.start_ns(), window.start_ns() + window.duration_ns()
    memory = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live, start, peak = 0, None, 0
    for t, nbytes in memory:
        if start is None and t >= begin:
            start = peak = live
        live += nbytes
        if start is not None and t <= end:
            peak = max(peak, live)
    return (live if start is None else start), peak


def measure_cpu_point(method: str, seq: int, args: argparse.Namespace) -> Point:
    """One step in this (fresh) process, profiled from before the model is built."""
    from torch.profiler import ProfilerActivity, profile, record_function

    watch_rss(int(args.rss_cap_gb * GB))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step, weight_bytes = make_training_step(method, args.shape, "cpu", args.chunk_size)
        rss_at_start = _vm_kib("VmRSS") * 1024
        reset_peak_rss()
        began = time.perf_counter()
        with record_function("frontier_step"):
            step(seq)
        seconds = time.perf_counter() - began
        rss_growth = _vm_kib("VmHWM") * 1024 - rss_at_start
    start, peak = live_bytes_in_window(prof, "frontier_step")
    if seq == args.common_seq:
        seconds = timed_steps(step, seq, args.timed_steps, lambda: None) or seconds
    return Point(
        method, seq, "fits" if peak <= args.budget_gb * GB else "over budget", peak, start, weight_bytes,
        rss_growth, seconds,
    )  # fmt: skip


def cuda_search(method: str, args: argparse.Namespace) -> list[Point]:
    """The whole search for `method` in this process, under the allocator cap. After an
    out-of-memory error the model and optimizer are built again: a backward cut short leaves
    gradients and update_in_backward counts behind that would burden the next point."""
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gb * GB / total), device)
    built: list[tuple[Callable, int]] = []

    def measure(seq: int) -> Point:
        if not built:
            gc.collect()  # the previous model and optimizer, if an error left them in a cycle
            torch.cuda.empty_cache()
            built.append(make_training_step(method, args.shape, "cuda", args.chunk_size))
        step, weight_bytes = built[0]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        began = time.perf_counter()
        try:
            step(seq)
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            built.clear()
            return Point(method, seq, "out of memory", None, start, weight_bytes)
        seconds = time.perf_counter() - began
        peak = torch.cuda.max_memory_allocated(device)
        if seq == args.common_seq:
            seconds = timed_steps(step, seq, args.timed_steps, torch.cuda.synchronize) or seconds
        status = "fits" if peak <= args.budget_gb * GB else "over budget"
        if seconds > args.time_limit:
            status = "timeout"  # measured, but longer ones would take longer still
        return Point(method, seq, status, peak, start, weight_bytes, None, seconds)

    return search(measure, args)


def timed_steps(step: Callable[[int], None], seq: int, count: int, sync: Callable[[], None]) -> float | None:
    """Median seconds of `count` more steps (after the measured one, so without its first-call
    costs and outside the profiler); None when count is 0."""
    times = []
    for _ in range(count):
        began = time.perf_counter()
        step(seq)
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times) if times else None


# ---- the search and the worker processes -------------------------------------------------------------


def search(measure: Callable[[int], Point], args: argparse.Namespace) -> list[Point]:
    """Double from min_seq while the step fits, then bisect between the longest fit and the
    shortest failure down to `resolution`; measure common_seq too."""
    points: dict[int, Point] = {}

    def at(seq: int) -> Point:
        if seq not in points:
            points[seq] = measure(seq)
            point = points[seq]
            peak = "" if point.peak_bytes is None else f", peak {point.peak_bytes / GB:.3f} GB"
            step = "" if point.step_seconds is None else f", step {point.step_seconds:.2f} s"
            print(f"  {point.method} {seq}: {point.status}{peak}{step}", file=sys.stderr, flush=True)
        return points[seq]

    fit, fail, seq = None, None, args.min_seq
    while True:
        point = at(seq)
        if point.status == "timeout":
            break
        if not point.fits:
            fail = seq
            break
        fit = seq
        if seq >= args.max_seq:
            break
        seq = min(2 * seq, args.max_seq)
    while fit is not None and fail is not None and fail - fit > max(64, args.resolution * fit):
        middle = (fit + fail) // 2 // 64 * 64
        if middle <= fit:
            break
        if at(middle).fits:
            fit = middle
        else:
            fail = middle
    at(args.common_seq)
    return sorted(points.values(), key=lambda p: p.seq)


def run_worker(args: argparse.Namespace, method: str, seq: int | None) -> list[Point]:
    """This script in a fresh process: one point (CPU) or one method's whole search (CUDA, whose
    progress lines pass through; a CPU worker's stderr only holds the profiler's start and stop)."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, *sys.argv[1:]]
    if seq is not None:
        command += ["--worker-seq", str(seq)]
    # per point: its steps, plus the process start and the model build
    timeout = args.time_limit * (1 + args.timed_steps) + 300 if seq is not None else None
    stderr = subprocess.PIPE if seq is not None else None
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [Point(method, seq, "timeout")]
    if done.returncode == KILLED_EXIT:
        return [Point(method, seq, "killed")]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr or "").strip().splitlines()[-1:] or [""]
        return [Point(method, seq or args.min_seq, f"error: exit code {done.returncode} {last[0][:200]}")]
    return [Point(**json.loads(line)) for line in lines]


def worker_main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.device == "cuda":
            points = cuda_search(args.worker, args)
        else:
            points = [measure_cpu_point(args.worker, args.worker_seq, args)]
    except (ImportError, MemoryError, RuntimeError) as error:  # a missing package, an allocation failure
        out_of_memory = isinstance(error, MemoryError) or "can't allocate memory" in str(error)
        status = "out of memory" if out_of_memory else f"error: {error}"
        points = [Point(args.worker, args.worker_seq or args.min_seq, status.splitlines()[0][:200])]
    for point in points:
        print(json.dumps(dataclasses.asdict(point)), flush=True)


def method_points(method: str, args: argparse.Namespace) -> list[Point]:
    if args.device == "cuda":
        return run_worker(args, method, None)
    return search(lambda seq: run_worker(args, method, seq)[0], args)


# ---- report -----------------------------------------------------------------------------------------


def longest(points: list[Point], args: argparse.Namespace) -> str:
    fits = [p.seq for p in points if p.fits]
    if not fits:
        errors = [p.status for p in points if p.status.startswith("error")]
        return errors[0] if errors else f"< {args.min_seq}"
    best = max(fits)
    above = [p for p in points if p.seq > best]
    if best >= args.max_seq:
        return f">= {best} (search cap)"
    if any(p.status == "timeout" for p in above) or not above:
        return f">= {best} (time limit)"
    return str(best)


def table(results: dict[str, list[Point]], args: argparse.Namespace) -> str:
    def gb(value: int | None) -> str:
        return "-" if value is None else f"{value / GB:.3f}"

    rows = [
        f"Budget {args.budget_gb} GB, shape {args.shape}, device {args.device}; columns after the second "
        f"at {args.common_seq} tokens.",
        "",
        "| method | longest sequence in budget | peak GB | above weights GB | peak RSS growth GB | step s |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for method, points in results.items():
        common = next((p for p in points if p.seq == args.common_seq), Point(method, args.common_seq, "-"))
        above = None if common.peak_bytes is None else common.peak_bytes - common.weight_bytes
        seconds = "-" if common.step_seconds is None else f"{common.step_seconds:.2f}"
        rows.append(
            f"| {method} | {longest(points, args)} | {gb(common.peak_bytes)} | {gb(above)} | "
            f"{gb(common.rss_growth_bytes)} | {seconds} |"
        )
    return "\n".join(rows) + "\n"


def plot(results: dict[str, list[Point]], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    # Methods that coincide (on the proxy the head dominates all but the chunked one) stay
    # visible: each its own dash pattern and marker, drawn thinner and smaller in turn.
    styles = zip(("-", "--", "-.", ":", "-", "--"), ("o", "s", "^", "D", "v", "P"), range(12, 0, -2))
    for (method, points), (dashes, marker, size) in zip(results.items(), styles):
        measured = [p for p in points if p.peak_bytes is not None]
        line = ax.plot(
            [p.seq for p in measured],
            [p.peak_bytes / GB for p in measured],
            linestyle=dashes,
            marker=marker,
            markersize=size,
            linewidth=1 + size / 6,
            alpha=0.85,
            label=METHODS[method],
        )[0]
        failed = [p.seq for p in points if p.peak_bytes is None and not p.status.startswith("error")]
        if failed:  # out of memory or killed: drawn on the budget line
            ax.plot(failed, [args.budget_gb] * len(failed), "x", color=line.get_color(), markersize=10)
    ax.axhline(
        args.budget_gb, color="black", linestyle="--", linewidth=1, label=f"budget {args.budget_gb} GB"
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel("peak live tensor bytes (GB)")
    ax.set_title(f"One training step, {args.shape} shape, {args.device} (x: out of memory)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(results: dict[str, list[Point]], args: argparse.Namespace, command: str) -> None:
    """memory_frontier.md (the table), .json (every point) and .png in args.out_dir."""
    report = table(results, args)
    print(report)
    with open(os.path.join(args.out_dir, "memory_frontier.md"), "w") as f:
        f.write(f"Command: `{command}`\n\n{report}")
    with open(os.path.join(args.out_dir, "memory_frontier.json"), "w") as f:
        points = {m: [dataclasses.asdict(p) for p in ps] for m, ps in results.items()}
        json.dump({"command": command, "args": vars(args), "points": points}, f, indent=1)
    plot(results, args, os.path.join(args.out_dir, "memory_frontier.png"))
    print(f"wrote {args.out_dir}/memory_frontier.md, .json, .png")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="proxy")
    parser.add_argument("--budget-gb", type=float, help="default: 3 for proxy, 24 for llama3-8b")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(DEFAULT_METHODS))
    parser.add_argument("--min-seq", type=int, default=512)
    parser.add_argument("--max-seq", type=int, default=32768)
    parser.add_argument("--common-seq", type=int, help="default: --min-seq")
    parser.add_argument("--resolution", type=float, default=0.15, help="bisect until (fail - fit) <= R * fit")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds per step")
    parser.add_argument(
        "--timed-steps",
        type=int,
        default=0,
        help="step time at --common-seq: median of N more steps (0: the measured one)",
    )
    parser.add_argument(
        "--rss-cap-gb", type=float, default=5.0, help="CPU: end a point whose RSS passes this"
    )
    parser.add_argument("--chunk-size", type=int, default=1024, help="enable_chunked_loss(chunk_size=...)")
    parser.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")
    parser.add_argument(
        "--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "frontier")
    )
    parser.add_argument("--replot", metavar="DIR", help="rewrite the table and plot from DIR's .json")
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-seq", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.budget_gb is None:
        args.budget_gb = 24.0 if args.shape == "llama3-8b" else 3.0
    if args.common_seq is None:
        args.common_seq = args.min_seq
    if not 64 <= args.min_seq <= args.max_seq:
        parser.error("need 64 <= --min-seq <= --max-seq")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args)
    elif args.replot:
        with open(os.path.join(args.replot, "memory_frontier.json")) as f:
            saved = json.load(f)
        args = argparse.Namespace(**{**saved["args"], "out_dir": args.replot})
        results = {m: [Point(**p) for p in ps] for m, ps in saved["points"].items()}
        write_report(results, args, saved["command"])
    else:
        os.makedirs(args.out_dir, exist_ok=True)
        results = {method: method_points(method, args) for method in args.methods}
        write_report(results, args, f"python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()

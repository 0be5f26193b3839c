"""`python -m badam_kernels.check`: is this install right, and how fast is it here?

1. What was found: versions, the compiled extension, and per device the backends available (and
   for each missing one, why: the error that asking for it raises).
2. Correctness: every available backend of fused_adamw_ and grad_norm against reference.py in fp64
   (badam_kernels/verification.py's tolerances), on small cases covering every valid dtype
   combination and master mode, grad_mul, found_inf, stochastic rounding, empty tensors and a
   misaligned view (storage offset 1) among aligned tensors, two steps each. The cuda, triton and
   cpu backends must also agree bit for bit with each other, across devices (csrc/adam_math.h is
   their common contract); the torch backend is held to the tolerances only.
3. On a GPU: GB/s of each backend and master mode at 2^24 and 2^27 elements against `copy_` and
   torch's AdamW(fused=True) in the same run (CUDA events over back-to-back calls), and the host
   time per call (badam_kernels/kernel_bench.py).

It prints a short table and a verdict, and exits with status 1 on any mismatch or when a backend
named with --require is missing. Without a GPU it checks cpu, torch and, under Triton's interpreter,
triton: TRITON_INTERPRET=1 is set when no CUDA device is present and triton is not yet imported.

    python -m badam_kernels.check [--device cpu cuda] [--require cuda triton] [--no-bench]
                                  [--sizes 24 27] [--min-time 0.3]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import zlib
from dataclasses import dataclass

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from badam_kernels import __version__, kernel_bench, ops, reference  # noqa: E402
from badam_kernels.verification import (  # noqa: E402
    AdamState,
    apply_step,
    bits,
    check_step,
    make_state,
    oracle_step,
    random_grads,
)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
SHORT = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}
SIZES = [0, 1, 3, 1023, 4099]
MISALIGNED = 3  # this tensor of every list is a view at storage offset 1
NORM_SIZES = [0, 1, 3, 1023, 70001]
WEIGHT_DECAY = 0.1
BIT_EXACT_BACKENDS = ("cpu", "cuda", "triton")  # adam_math.h's contract: the same bits everywhere
MODES_FOR_PARAM = {FP32: ["none"], BF16: ["none", "fp32", "remainder"], FP16: ["none", "fp32"]}


@dataclass(frozen=True)
class AdamWCase:
    """One fused_adamw_ case: dtypes, master mode and options, over tensors of SIZES."""

    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    mode: str
    stochastic: bool = False
    grad_mul: float | None = None
    found_inf: bool = False  # step 2 has found_inf=1 (and inf/NaN grads): nothing may change

    @property
    def name(self) -> str:
        extras = ["sr"] * self.stochastic + [f"grad_mul={self.grad_mul}"] * (self.grad_mul is not None)
        extras += ["found_inf"] * self.found_inf
        return " ".join([f"{SHORT[self.param_dtype]}/grad {SHORT[self.grad_dtype]}/{self.mode}", *extras])


def adamw_cases() -> list[AdamWCase]:
    """Every valid (param dtype, grad dtype, master mode), stochastic rounding for each grad dtype,
    and grad_mul and found_inf on one row of each master mode."""
    cases = [AdamWCase(p, g, mode) for p, modes in MODES_FOR_PARAM.items() for mode in modes for g in SHORT]
    cases += [AdamWCase(BF16, g, "none", stochastic=True) for g in SHORT]
    flagged = [(BF16, BF16, "remainder"), (FP16, FP16, "fp32"), (FP32, FP32, "none")]
    cases += [AdamWCase(p, g, mode, grad_mul=0.25) for p, g, mode in flagged]
    cases += [AdamWCase(p, g, mode, found_inf=True) for p, g, mode in flagged]
    return cases


def place(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Copies on `device`; tensor MISALIGNED becomes a view at storage offset 1 (never 16-byte aligned)."""
    placed = []
    for i, t in enumerate(tensors):
        if i == MISALIGNED:
            view = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:]
            placed.append(view.copy_(t))
        else:
            placed.append(t.to(device, copy=True))
    return placed


def place_state(state: AdamState, device: torch.device) -> AdamState:
    """`state` on `device`, each of its lists placed as `place` does."""
    return AdamState(
        place(state.params, device), place(state.exp_avgs, device), place(state.exp_avg_sqs, device),
        state.master_weights, place(state.masters, device),
    )  # fmt: skip


def same_bits(a: AdamState, b: AdamState) -> bool:
    """Every tensor of `a` has the bits of its counterpart in `b` (NaN payloads and -0.0 included)."""
    return all(torch.equal(bits(x), bits(y)) for x, y in zip(a.all_tensors(), b.all_tensors()))


def run_adamw_case(
    case: AdamWCase, device: torch.device, backend: str, seed: int
) -> tuple[AdamState | None, list[str]]:
    """Two steps of `backend` on the case's random data (the same for every backend with the same
    `seed`), each judged against the fp64 oracle and, except for stochastic rounding, the torch
    backend's error; returns the final state and the problems found."""
    gen = torch.Generator().manual_seed(seed ^ zlib.crc32(case.name.encode()))
    state = place_state(make_state(SIZES, case.param_dtype, case.mode, gen, "cpu"), device)
    problems = []
    for step in (1, 2):
        grads = random_grads(SIZES, FP32, gen, "cpu")
        kwargs: dict = {"stochastic_rounding": case.stochastic, "seed": 1234 if case.stochastic else 0}
        if case.grad_mul is not None:
            grads = [g / case.grad_mul for g in grads]  # the multiplier brings them back to size
            kwargs["grad_mul"] = torch.tensor(case.grad_mul, device=device)
        grads = place([g.to(case.grad_dtype) for g in grads], device)
        skip = case.found_inf and step == 2
        if case.found_inf:
            kwargs["found_inf"] = torch.tensor(float(skip), device=device)
        if skip:
            grads[1][0], grads[4][7] = math.inf, math.nan
            before = state.clone()
            apply_step(state, grads, backend=backend, step=step, weight_decay=WEIGHT_DECAY, **kwargs)
            if not same_bits(before, state):
                problems.append(f"{case.name}: found_inf=1 changed the tensors")
            continue
        expected = oracle_step(
            state, grads, step=step, weight_decay=WEIGHT_DECAY, grad_mul=kwargs.get("grad_mul")
        )
        baseline = None
        if backend != "torch" and not case.stochastic:
            baseline = state.clone()
            apply_step(baseline, grads, backend="torch", step=step, weight_decay=WEIGHT_DECAY, **kwargs)
        apply_step(state, grads, backend=backend, step=step, weight_decay=WEIGHT_DECAY, **kwargs)
        try:
            check_step(state, expected, baseline, stochastic_rounding=case.stochastic)
        except AssertionError as exc:
            problems.append(f"{case.name}, step {step}: {exc}")
    return state, problems


def run_norm_case(
    dtype: torch.dtype, integer_valued: bool, device: torch.device, backend: str, seed: int
) -> list[str]:
    """grad_norm against the fp64 reference: within 1e-5 relative (blocked fp32 sums of up to 70001
    squares), or, for integer entries whose sum of squares is exact in any order, within one ulp."""
    gen = torch.Generator().manual_seed(seed ^ zlib.crc32(f"norm {dtype} {integer_valued}".encode()))
    if integer_valued:
        cpu = [(torch.randint(-3, 4, (n,), generator=gen)).to(dtype) for n in NORM_SIZES]
    else:
        cpu = [(torch.randn(n, generator=gen) * 0.01).to(dtype) for n in NORM_SIZES]
    got = ops.grad_norm(place(cpu, device), backend=backend).cpu()
    expected = reference.grad_norm_reference(cpu, compute_dtype=torch.float64).double()
    tolerance = 2.0 ** (math.frexp(expected.item())[1] - 24) if integer_valued else 1e-5 * expected.item()
    if not abs(got.double().item() - expected.item()) <= tolerance:
        kind = "integer" if integer_valued else "random"
        return [f"grad_norm {SHORT[dtype]} {kind}: got {got.item()!r}, expected {expected.item()!r}"]
    return []


@dataclass
class BackendReport:
    """What one backend on one device passed, and how its bits compare with the first bit-exact one."""

    device: torch.device
    backend: str
    adamw_passed: int = 0
    adamw_total: int = 0
    norm_passed: int = 0
    norm_total: int = 0
    bits: str = "-"


def missing_backend_reason(backend: str, device: torch.device) -> str:
    """Why `backend` cannot run on `device`: the error that asking for it raises (for the compiled
    backends it carries the extension's import error or build reason, see ops.resolve_backend)."""
    try:
        ops.resolve_backend(backend, device)
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    return "available"


def environment(devices: list[torch.device]) -> list[str]:
    """Lines on versions, the extension and, per device, the backends found and why others are not."""
    import importlib.metadata

    versions = [
        f"badam_kernels {__version__}",
        f"torch {torch.__version__}",
        f"python {platform.python_version()}",
    ]
    for package in ("triton", "numpy", "transformers"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    lines = [", ".join(versions)]
    extension = "loaded" if ops.EXTENSION_ERROR is None else f"NOT loaded ({ops.EXTENSION_ERROR})"
    lines.append(f"compiled extension: {extension}")
    for device in devices:
        name = platform.processor() or platform.machine()
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            name = f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs"
        found = ops.available_backends(device)
        if device.type == "cpu" and "triton" in found:
            found = [b if b != "triton" else "triton (interpreter)" for b in found]
        lines.append(f"{device.type} ({name}): backends {', '.join(found)}")
        for backend in ("cuda", "triton") if device.type == "cuda" else ("cpu", "triton"):
            if backend not in ops.available_backends(device):
                lines.append(f"  {backend} missing: {missing_backend_reason(backend, device)}")
    return lines


def check_correctness(devices: list[torch.device], seed: int) -> tuple[list[BackendReport], list[str]]:
    """Run every case on every available backend; compare the bit-exact backends' final states."""
    reports, problems = [], []
    final_states: dict[tuple[str, str], dict[str, AdamState]] = {}
    cases = adamw_cases()
    for device in devices:
        for backend in ops.available_backends(device):
            report = BackendReport(device, backend)
            for case in cases:
                try:
                    state, found = run_adamw_case(case, device, backend, seed)
                except Exception as exc:  # a crash in a backend is a finding, not the end of the check
                    state, found = None, [f"{case.name}: {type(exc).__name__}: {exc}"]
                report.adamw_total += 1
                report.adamw_passed += not found
                problems += [f"{device.type}/{backend}: {p}" for p in found]
                if state is not None:
                    final_states.setdefault((device.type, backend), {})[case.name] = state.to("cpu")
            for dtype in SHORT:
                for integer_valued in (False, True):
                    try:
                        found = run_norm_case(dtype, integer_valued, device, backend, seed)
                    except Exception as exc:
                        found = [f"grad_norm {SHORT[dtype]}: {type(exc).__name__}: {exc}"]
                    report.norm_total += 1
                    report.norm_passed += not found
                    problems += [f"{device.type}/{backend}: {p}" for p in found]
            reports.append(report)

    exact = [
        r for r in reports if r.backend in BIT_EXACT_BACKENDS and (r.device.type, r.backend) in final_states
    ]
    if exact:
        anchor = final_states[(exact[0].device.type, exact[0].backend)]
        exact[0].bits = "the reference"
        for report in exact[1:]:
            states = final_states[(report.device.type, report.backend)]
            differing = [name for name, state in states.items() if not same_bits(anchor[name], state)]
            report.bits = "equal" if not differing else f"{len(differing)} cases differ"
            problems += [
                f"{report.device.type}/{report.backend}: {name}: not bit-equal to "
                f"{exact[0].device.type}/{exact[0].backend}"
                for name in differing
            ]
    for report in reports:
        if report.backend == "torch":
            report.bits = "tolerance only"
    return reports, problems


def correctness_table(reports: list[BackendReport]) -> list[str]:
    """Markdown rows: cases passed per op, and the bit comparison, per (device, backend)."""
    lines = [
        "| device | backend | fused_adamw_ | grad_norm | bits vs first of cpu/cuda/triton |",
        "|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r.device.type} | {r.backend} | {r.adamw_passed}/{r.adamw_total} | "
            f"{r.norm_passed}/{r.norm_total} | {r.bits} |"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m badam_kernels.check", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    default_devices = ["cpu"] + ["cuda"] * torch.cuda.is_available()
    parser.add_argument("--device", nargs="+", default=default_devices, choices=["cpu", "cuda"])
    parser.add_argument(
        "--require", nargs="*", default=[], choices=["cpu", "cuda", "triton"],
        help="fail when one of these backends is missing where it could run",
    )  # fmt: skip
    parser.add_argument("--no-bench", action="store_true", help="skip the throughput table")
    parser.add_argument("--bench-cpu", action="store_true", help="also time on the CPU (a dry run)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[24, 27], help="log2 of the bench sizes")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds measured per bench row")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random cases (default: fresh)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status (0: all passed, 1: a mismatch or a missing backend)."""
    args = parse_args(argv)
    devices = [torch.device(d) for d in dict.fromkeys(args.device)]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        print("no CUDA device: torch.cuda.is_available() is False")
        return 1
    print("== badam_kernels check")
    print("\n".join(environment(devices)), flush=True)

    problems = []
    if "cuda" in args.require and not any(d.type == "cuda" for d in devices):
        problems.append("required backend cuda: no CUDA device among --device")
    for backend in args.require:
        for device in devices:
            interpreted = os.environ.get("TRITON_INTERPRET") == "1"
            applies = backend == device.type or (
                backend == "triton" and (device.type == "cuda" or interpreted)
            )
            if applies and backend not in ops.available_backends(device):
                problems.append(f"required backend {backend} missing on {device.type}: "
                                f"{missing_backend_reason(backend, device)}")  # fmt: skip

    seed = random.randrange(2**31) if args.seed is None else args.seed
    print(f"\n== correctness against reference.py in fp64 (--seed {seed})", flush=True)
    reports, found = check_correctness(devices, seed)
    problems += found
    print("\n".join(correctness_table(reports)))
    cases = len(adamw_cases())
    print(
        f"({cases} fused_adamw_ cases of 2 steps over tensors of sizes {SIZES}, one misaligned; "
        f"{2 * len(SHORT)} grad_norm cases)"
    )

    bench_devices = [d for d in devices if not args.no_bench and (d.type == "cuda" or args.bench_cpu)]
    for device in bench_devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        timer = "CUDA events over back-to-back calls" if device.type == "cuda" else "median wall time"
        print(f"\n== throughput on {device.type} ({name}; {timer}; bytes by DESIGN.md's model)", flush=True)
        rows = kernel_bench.measure(
            device, [1 << s for s in args.sizes], kernel_bench.cases(device), args.min_time
        )
        print("\n".join(kernel_bench.markdown_table(rows)))

    print()
    for problem in problems[:30]:
        print(f"MISMATCH {problem}")
    if len(problems) > 30:
        print(f"... and {len(problems) - 30} more")
    checked = sum(r.adamw_total + r.norm_total for r in reports)
    if problems:
        print(f"VERDICT: FAILED: {len(problems)} problems in {checked} checks")
        return 1
    backends = "; ".join(f"{d.type}: {', '.join(ops.available_backends(d))}" for d in devices)
    print(f"VERDICT: OK: {checked} checks passed on {backends}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

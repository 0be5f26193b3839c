"""Step and block-switch times inside LLaMA-Factory: the real badam against badam_kernels served as
`badam` (badam_kernels.llamafactory), on the same run (project from examples/llamafactory_tiny.py,
fp32 on the CPU, LLaMA-Factory's own training loop). Needs the LLaMA-Factory environment:

    .venv-llamafactory/bin/python bench/llamafactory_timing.py [--mode ratio] [--layers 8 --hidden 256 ...]

`--mode layer` (default): layer-wise BAdam, ascending switches every `--switch-every` steps.
`--mode ratio`: `badam_mode: ratio` with `--update-ratio`, as tests/test_llamafactory.py compares it
(`optim: adamw_torch`, which real badam's ratio mode needs, and `max_grad_norm: 0`, the norm logged
but nothing clipped, since real badam's clip in ratio mode clips nothing); no switches.

Each optimizer runs in a process of its own (badam can only be replaced in a fresh process), through
LLaMA-Factory's `run_exp` with a callback that times every `optimizer.step()` (the update and, every
`--switch-every` steps, the block switch) and every whole training step. Prints a table: medians of
the whole step and of optimizer.step() without a switch, and of optimizer.step() at a switch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
from llamafactory_tiny import train_config, write_project  # noqa: E402

OPTIMIZERS = ("badam", "badam_kernels")
MODES = ("layer", "ratio")


def _step_timer(out_path: Path) -> Any:
    """A TrainerCallback that times optimizer.step() and whole training steps, and notes at which
    steps the block changed; writes them as JSON when training ends."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.optimizer_step_s: list[float] = []
            self.switched: list[bool] = []

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            inner = optimizer
            while hasattr(inner, "optimizer"):  # accelerate's wrapper
                inner = inner.optimizer
            step = inner.step

            def timed_step(*step_args, **step_kwargs):
                block = getattr(inner, "current_block_idx", None)  # ratio mode has no blocks
                start = time.perf_counter()
                result = step(*step_args, **step_kwargs)
                self.optimizer_step_s.append(time.perf_counter() - start)
                self.switched.append(getattr(inner, "current_block_idx", None) != block)
                return result

            inner.step = timed_step

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self._start)

        def on_train_end(self, args, state, control, **kwargs):
            losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
            record = dict(
                step_s=self.step_s,
                optimizer_step_s=self.optimizer_step_s,
                switched=self.switched,
                losses=losses,
            )
            out_path.write_text(json.dumps(record))

    return StepTimer()


def worker(optimizer: str, config_path: Path, out_path: Path) -> None:
    """Train once with `optimizer` ("badam" or "badam_kernels") inside LLaMA-Factory."""
    config = json.loads(config_path.read_text())
    served = contextlib.nullcontext()
    if optimizer == "badam_kernels":
        from badam_kernels.llamafactory import badam_served_by_badam_kernels

        served = badam_served_by_badam_kernels()
    with served:
        from llamafactory.train.tuner import run_exp

        run_exp(config, callbacks=[_step_timer(out_path)])


def _summary(record: dict[str, Any]) -> dict[str, float]:
    """Medians in ms, the first step (warm-up) left out."""
    steps = list(zip(record["step_s"], record["optimizer_step_s"], record["switched"]))[1:]
    plain = [(s, o) for s, o, switched in steps if not switched]
    return {
        "step_ms": 1e3 * statistics.median(s for s, _ in plain),
        "optimizer_step_ms": 1e3 * statistics.median(o for _, o in plain),
        "switch_step_ms": 1e3 * statistics.median([o for _, o, sw in steps if sw] or [float("nan")]),
        "switches": sum(switched for _, _, switched in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=MODES, default="layer", help="badam_mode")
    parser.add_argument("--update-ratio", type=float, default=0.1, help="badam_update_ratio (ratio mode)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--switch-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (OMP_NUM_THREADS)")
    parser.add_argument("--worker", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.config, args.out)
        return

    with tempfile.TemporaryDirectory(prefix="llamafactory_timing_") as name:
        folder = Path(name)
        write_project(folder, layers=args.layers, hidden=args.hidden)
        env = {
            **os.environ,
            "HF_HOME": str(folder / "hf_home"),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(args.threads),
        }
        records = {}
        for optimizer in OPTIMIZERS:
            if args.mode == "layer":  # ascending: every switch changes the block, the timer sees it
                mode_options = dict(badam_switch_interval=args.switch_every, badam_switch_mode="ascending")
            else:
                mode_options = dict(
                    badam_mode="ratio",
                    badam_update_ratio=args.update_ratio,
                    optim="adamw_torch",
                    max_grad_norm=0,
                )
            config = train_config(
                folder,
                folder / f"out_{optimizer}",
                max_steps=args.steps,
                badam_verbose=0,
                save_strategy="no",
                **mode_options,
            )
            config_path = folder / f"{optimizer}.json"
            config_path.write_text(json.dumps(config))
            out = folder / f"{optimizer}_timing.json"
            command = [
                sys.executable,
                __file__,
                "--worker",
                optimizer,
                "--config",
                str(config_path),
                "--out",
                str(out),
            ]
            result = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"the {optimizer} run failed:\n{result.stderr[-4000:]}")
            records[optimizer] = json.loads(out.read_text())

    import torch

    what = (
        f"layer-wise BAdam switching every {args.switch_every} steps"
        if args.mode == "layer"
        else f"ratio BAdam, update ratio {args.update_ratio}"
    )
    print(
        f"LLaMA-Factory sft, full, {what}; "
        f"{args.layers} layers, hidden {args.hidden}, fp32, {args.steps} steps, {args.threads} thread(s); "
        f"torch {torch.__version__}"
    )
    print("| optimizer | step (median) | optimizer.step() | optimizer.step() with a switch | switches |")
    print("|---|---|---|---|---|")
    for optimizer, record in records.items():
        s = _summary(record)
        print(
            f"| {optimizer} | {s['step_ms']:.1f} ms | {s['optimizer_step_ms']:.2f} ms | "
            f"{s['switch_step_ms']:.1f} ms | {s['switches']} |"
        )
    ours, theirs = records["badam_kernels"]["losses"], records["badam"]["losses"]
    print(
        f"largest loss difference: {max(abs(a - b) for a, b in zip(ours, theirs)):.2e} over {len(ours)} steps"
    )


if __name__ == "__main__":
    main()

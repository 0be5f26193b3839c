"""Checkpoint resume: a run saved with torch.save mid-block (and right after a switch) and
continued in a fresh process ends bit-identical to an uninterrupted run, random order included.

Bit for bit on any CPU: the fresh process runs the same torch ops on the same machine, with the
same environment and (passed on explicitly) the same number of threads, so it rounds alike.

badam loses its schedule on resume; BlockAdamW's state dict carries it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from llama_tiny import build_tiny_llama, causal_lm_loss

from badam_kernels.optim import BlockAdamW

STEPS = 18
SWITCH = 2
SAVE_AT = (5, 8)  # mid-block (steps 4-5 form a block), and exactly at a switch

OPTIONS = dict(
    lr=1e-3,
    weight_decay=0.01,
    switch_every=SWITCH,
    switch_mode="random",
    seed=3,
    max_grad_norm=1.0,
    verbose=0,
)


def _make():
    model = build_tiny_llama()
    return model, BlockAdamW(model, **OPTIONS)


def _train(model, opt, start: int, stop: int) -> None:
    for step in range(start, stop):
        causal_lm_loss(model, step).backward()
        opt.step()


def _snapshot(model, opt) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def resume_and_finish(checkpoint: str, saved_step: int, out: str) -> None:
    """Run in a fresh process: load a checkpoint, train to STEPS, save the final snapshot."""
    model, opt = _make()
    saved = torch.load(checkpoint, weights_only=False)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    _train(model, opt, saved_step, STEPS)
    torch.save(_snapshot(model, opt), out)


def _assert_identical(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _assert_identical(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_resume_in_fresh_process_is_bit_identical(tmp_path: Path):
    model, opt = _make()
    blocks_seen = []
    jobs = []
    for step in range(STEPS):
        if step in SAVE_AT:
            checkpoint = tmp_path / f"step{step}.pt"
            torch.save(_snapshot(model, opt), checkpoint)
            jobs.append((str(checkpoint), step, str(tmp_path / f"final_from_{step}.pt")))
        blocks_seen.append(opt.active_block)
        _train(model, opt, step, step + 1)
    assert len(set(blocks_seen)) == 4 and len(blocks_seen) // SWITCH > 4  # a second random pass
    expected = _snapshot(model, opt)

    script = (
        "import json, sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(int(sys.argv[3]))\n"
        "import test_optim_resume as t\n"
        "for job in json.loads(sys.argv[2]): t.resume_and_finish(*job)\n"
    )
    tests_dir = str(Path(__file__).parent)
    threads = str(torch.get_num_threads())
    subprocess.run(
        [sys.executable, "-c", script, tests_dir, json.dumps(jobs), threads], check=True, timeout=300
    )
    for _, step, out in jobs:
        resumed = torch.load(out, weights_only=False)
        _assert_identical(resumed, expected, f"resumed from step {step}")


def test_state_dict_carries_schedule_and_state():
    model, opt = _make()
    _train(model, opt, 0, 3)  # mid-block: state present
    state = opt.state_dict()
    schedule = state["block_schedule"]
    assert schedule["global_step"] == 3 and schedule["steps_in_block"] == 1
    assert schedule["rng_state"] is not None and len(schedule["order"]) <= 3
    kinds = {(k, v.dtype) for s in state["state"].values() for k, v in s.items() if torch.is_tensor(v)}
    assert kinds == {("exp_avg", torch.float32), ("exp_avg_sq", torch.float32), ("remainder", torch.int16)}
    fresh_model, fresh = _make()
    fresh.load_state_dict(state)
    assert fresh.active_block == opt.active_block
    assert fresh.active_parameter_names() == opt.active_parameter_names()
    assert all(
        p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), fresh_model.parameters())
    )
    assert {k: v.dtype for s in fresh.state.values() for k, v in s.items() if torch.is_tensor(v)} == dict(
        kinds
    )

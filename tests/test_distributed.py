"""Multi-process BlockAdamW on CPU with gloo: data parallel over the active block, FSDP2 shards,
DCP resume, and a failing rank that must not hang the others.

Every test spawns 2 processes (a file:// rendezvous, so no port can be taken by someone else),
each with one thread; process groups have a timeout and the parent kills what is still running at
its deadline, so nothing hangs. References are single-process runs on the combined batch in this
process: the same model, seed and schedule, the batch of both ranks at once.

Tolerance: a rank averages (g0 + g1) / 2 of per-half means where the single process takes one mean
over the whole batch, so fp32 gradients differ by a few ulps (summation order); Adam turns that
into parameter differences of ~3e-8 (measured) after six steps at lr 1e-2; we allow atol 1e-6,
rtol 1e-5. Measured 2026-11-30 (AMD EPYC, torch 2.13.0+cpu): at most 0.9% of that allowance is
used, also with ONEDNN_MAX_CPU_ISA=AVX2 plus ATEN_CPU_CAPABILITY=default, MKL_ENABLE_INSTRUCTIONS=AVX2
or MKL_CBWR=COMPATIBLE. The ranks themselves must agree bit for bit (the same ops on the same
machine), and so must a DCP resume and the uninterrupted run.
"""

from __future__ import annotations

import datetime
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from optim_models import make_net
from torch import nn

from badam_kernels import BlockAdamW
from badam_kernels.distributed import load_checkpoint, save_checkpoint

WORLD = 2
TOLERANCE = dict(atol=1e-6, rtol=1e-5)
# Adam's update is invariant to the gradients' scale, so a sum where a mean belongs could hide; an
# eps as large as the gradients (~1e-2 here) makes the update depend on their scale. A block's
# gradient norm is ~0.2, so max_grad_norm=0.05 clips at every step (FSDP2: a norm over shards).
OPTIONS = dict(
    lr=1e-2, eps=1e-2, weight_decay=0.01, switch_every=2, switch_mode="random", seed=5, max_grad_norm=0.05,
    verbose=0,
)  # fmt: skip
STEPS = 6
MICRO_BATCHES = {1: 2, 3: 2, 5: 2}  # steps with gradient accumulation over two micro-batches
SPAWN_DEADLINE_S = 60
pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed"),
    pytest.mark.filterwarnings("ignore:.*trainable parameters are fp32"),  # fp32 on purpose: tight tolerance
]


# ---- data: a combined batch, split between the ranks -------------------------------------------


def combined_batch(step: int, micro: int = 0) -> torch.Tensor:
    """(8, 8) tokens for (step, micro-batch); rank r trains on rows 4r..4r+3."""
    generator = torch.Generator().manual_seed(100 * step + micro)
    return torch.randint(0, 32, (8, 8), generator=generator)


def loss_on(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens).float()
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def rows_of(tokens: torch.Tensor, rank: int | None) -> torch.Tensor:
    return tokens if rank is None else tokens.chunk(WORLD)[rank]


def train(model, opt, steps: range, rank: int | None, no_sync: bool = False) -> None:
    """Steps with MICRO_BATCHES micro-batches; `no_sync` wraps all but the last in no_sync()."""
    for step in steps:
        count = MICRO_BATCHES.get(step, 1)
        for micro in range(count):
            tokens = rows_of(combined_batch(step, micro), rank)
            if no_sync and micro < count - 1:
                with opt.gradient_sync.no_sync():
                    loss_on(model, tokens).backward()
            else:
                loss_on(model, tokens).backward()
        opt.step()


def single_process_params(steps: int = STEPS) -> dict[str, torch.Tensor]:
    model = make_net(torch.float32, seed=0)
    train(model, BlockAdamW(model, **OPTIONS), range(steps), rank=None)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---- the spawn harness -------------------------------------------------------------------------


def _worker(rank: int, scenario: str, init_file: str, out_dir: str, pg_timeout_s: float) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=pg_timeout_s),
    )
    try:
        result = {"ok": SCENARIOS[scenario](rank, Path(out_dir))}
    except Exception as error:
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if "error" not in result:
        dist.destroy_process_group()


def run_two_ranks(scenario: str, tmp_path: Path, pg_timeout_s: float = 30.0) -> list[dict]:
    """Run SCENARIOS[scenario] on 2 spawned ranks; their results ({"ok": ...} or {"error": ...})."""
    context = mp.get_context("spawn")
    processes = [
        context.Process(
            target=_worker, args=(rank, scenario, str(tmp_path / "rendezvous"), str(tmp_path), pg_timeout_s)
        )
        for rank in range(WORLD)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"ranks {hung} were still running after {SPAWN_DEADLINE_S} s"
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def results_of(runs: list[dict]) -> list:
    for rank, run in enumerate(runs):
        assert "ok" in run, f"rank {rank} failed: {run['error']}\n{run['traceback']}"
    return [run["ok"] for run in runs]


# ---- scenarios (run inside the ranks) ----------------------------------------------------------


def data_parallel(rank: int, out_dir: Path) -> dict:
    """Ranks start from different weights (broadcast must fix that); small buckets from the second
    block on; with and without no_sync; plus the bytes of every step against the active gradients."""
    group = dist.group.WORLD
    results = {}
    for no_sync in (False, True):
        model = make_net(torch.float32, seed=rank)
        opt = BlockAdamW(model, process_group=group, **OPTIONS)
        opt.gradient_sync.bucket_bytes = 512  # fc.weight alone, the small tensors together
        train(model, opt, range(STEPS), rank, no_sync=no_sync)
        results[no_sync] = {name: p.detach().clone() for name, p in model.named_parameters()}
    model = make_net(torch.bfloat16, seed=0)
    opt = BlockAdamW(model, process_group=group, **OPTIONS)
    steps = []
    for step in range(STEPS):
        loss_on(model, rows_of(combined_batch(step), rank)).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_bytes = sum(g.numel() * g.element_size() for g in grads)
        opt.step()
        steps.append((grad_bytes, opt.gradient_sync.bytes_last_step))
    trainable = sum(p.numel() * p.element_size() for p in opt._names)
    return {"params": results, "bytes": steps, "trainable_bytes": trainable}


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    return fully_shard(model)


def fsdp2(rank: int, out_dir: Path) -> dict:
    """FSDP2 training; a DCP checkpoint mid-block at step 3, resumed by a fresh model/optimizer."""
    model = shard(make_net(torch.float32, seed=0))
    opt = BlockAdamW(model, **OPTIONS)
    train(model, opt, range(3), rank)
    checkpoint = str(out_dir / "dcp")
    save_checkpoint(model, opt, checkpoint)
    train(model, opt, range(3, STEPS), rank)
    straight = {name: p.full_tensor() for name, p in model.named_parameters()}
    model = shard(make_net(torch.float32, seed=1))  # other weights: the checkpoint must replace them
    opt = BlockAdamW(model, **OPTIONS)
    load_checkpoint(model, opt, checkpoint)
    train(model, opt, range(3, STEPS), rank)
    resumed = {name: p.full_tensor() for name, p in model.named_parameters()}
    return {"straight": straight, "resumed": resumed}


def failing_rank(rank: int, out_dir: Path) -> None:
    """Rank 1 raises before step() (no backward); rank 0 waits in step() for its gradients.
    Rank 1 then stays alive, as a crashed-but-not-exited process would, until rank 0 is done."""
    model = make_net(torch.float32, seed=0)
    opt = BlockAdamW(model, process_group=dist.group.WORLD, **OPTIONS)
    if rank == 0:
        loss_on(model, rows_of(combined_batch(0), rank)).backward()
        opt.step()
        return
    try:
        opt.step()
    finally:
        deadline = time.monotonic() + SPAWN_DEADLINE_S
        while not (out_dir / "rank0.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def different_seeds(rank: int, out_dir: Path) -> None:
    """A random schedule seeded differently per rank: the ranks would train different blocks."""
    BlockAdamW(make_net(torch.float32), process_group=dist.group.WORLD, **{**OPTIONS, "seed": rank})


SCENARIOS = {
    "data_parallel": data_parallel,
    "fsdp2": fsdp2,
    "failing_rank": failing_rank,
    "different_seeds": different_seeds,
}


# ---- tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return single_process_params()


@pytest.fixture(scope="module")
def data_parallel_run(tmp_path_factory) -> list[dict]:
    return results_of(run_two_ranks("data_parallel", tmp_path_factory.mktemp("dp")))


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> list[dict]:
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch >= 2.4")
    return results_of(run_two_ranks("fsdp2", tmp_path_factory.mktemp("fsdp2")))


def assert_same_params(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        if tolerance:
            describe = lambda message, name=name: f"{name}: {message}"  # noqa: E731
            torch.testing.assert_close(actual[name], expected[name], **tolerance, msg=describe)
        else:
            assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("no_sync", [False, True], ids=["accumulate-in-hooks", "no_sync"])
def test_data_parallel_matches_single_process_on_combined_batch(data_parallel_run, reference, no_sync):
    rank0, rank1 = (run["params"][no_sync] for run in data_parallel_run)
    assert_same_params(rank1, rank0)  # bit-identical ranks, though rank 1 started from other weights
    assert_same_params(rank0, reference, **TOLERANCE)
    initial = dict(make_net(torch.float32, seed=0).named_parameters())
    assert any(not torch.equal(rank0[n], initial[n]) for n in initial), "nothing was trained"


def test_bytes_all_reduced_per_step_are_the_active_gradients(data_parallel_run):
    for run in data_parallel_run:
        for step, (grad_bytes, reduced) in enumerate(run["bytes"]):
            assert reduced == grad_bytes, f"step {step}: all-reduced {reduced} B, gradients {grad_bytes} B"
            assert 0 < grad_bytes < run["trainable_bytes"] / 2  # one block of 3, not DDP's everything


def test_fsdp2_matches_single_process_on_combined_batch(fsdp2_run, reference):
    rank0, rank1 = (run["straight"] for run in fsdp2_run)
    assert_same_params(rank1, rank0)
    assert_same_params(rank0, reference, **TOLERANCE)


def test_fsdp2_resume_from_dcp_checkpoint_is_exact(fsdp2_run):
    for run in fsdp2_run:
        assert_same_params(run["resumed"], run["straight"])


def test_a_rank_that_raises_does_not_hang_the_others(tmp_path):
    timeout_s = 3.0
    rank0, rank1 = run_two_ranks("failing_rank", tmp_path, pg_timeout_s=timeout_s)
    assert "found no gradient" in rank1.get("error", ""), rank1
    # Rank 0 reports the group's timeout: it was released by it, not killed at the parent's deadline
    # (no wall-clock bound here: starting two processes alone can take over 30 s on a loaded machine).
    assert "timed out" in rank0.get("error", "").lower(), rank0


def test_ranks_with_different_schedules_are_refused(tmp_path):
    for run in run_two_ranks("different_seeds", tmp_path):
        assert "ranks disagree on the block schedule" in run.get("error", ""), run


def test_ddp_wrapped_model_is_refused_with_advice():
    model = make_net(torch.float32)
    wrapped = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(wrapped)
    wrapped.module = model  # a DDP instance without a process group: only its type matters here
    with pytest.raises(TypeError, match="ddp_model.module"):
        BlockAdamW(wrapped, **OPTIONS)


def test_process_group_needs_initialised_torch_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        BlockAdamW(make_net(torch.float32), process_group=object(), **OPTIONS)

"""The Triton launchers: a new block of other sizes reuses the compiled kernel, and launch tables are
cached per tensor list.

Recompiles are judged by Triton's own cache key: the launcher's real arguments (captured under the
interpreter on CPU, or on a GPU) go through the binder Triton builds for a kernel
(`create_function_from_signature`, Triton 3.6-3.9), whose specialisation list and options are what
selects a compiled kernel. Two launches with equal keys share one compile.
"""

from __future__ import annotations

import pytest
import torch
from backend_targets import skip_unless_available

pytest.importorskip("triton")

from badam_kernels.triton_ops import fused_adamw, grad_norm, utils  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import badam_kernels  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    skip_unless_available(device, "triton")
    return torch.device(device)


class RecordLaunches:
    """Stands in for a @triton.jit kernel: records each launch's arguments and runs it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch

    def cache_keys(self) -> set[str]:
        """Triton's specialisation key of every recorded launch (as compiled for sm_90)."""
        kernel = self.kernel
        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
        binder = create_function_from_signature(
            jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32))
        )
        keys = set()
        for args, kwargs in self.launches:
            _, specialization, options = binder(*args, **kwargs)
            keys.add(repr((specialization, sorted(options.items()))))
        return keys


def adamw_block(sizes: list[int], device, *, misaligned: int | None = None):
    """bf16 params and grads, fp32 state and int16 remainders of `sizes` (tensor `misaligned` a view
    at storage offset 1)."""
    gen = torch.Generator().manual_seed(sum(sizes))
    tensors = []
    for i, n in enumerate(sizes):
        offset = 1 if i == misaligned else 0
        p = torch.randn(n + offset, generator=gen).to(device, torch.bfloat16)[offset:]
        g = (torch.randn(n, generator=gen) * 1e-2).to(device, torch.bfloat16)
        zeros = [
            torch.zeros(n, dtype=dtype, device=device) for dtype in (torch.float32,) * 2 + (torch.int16,)
        ]
        tensors.append((p, g, *zeros))
    return [[t[role] for t in tensors] for role in range(5)]


def step(block, *, step: int, seed: int = 0, stochastic: bool = False, grad_mul=None) -> None:
    params, grads, exp_avgs, exp_avg_sqs, remainders = block
    mode = "none" if stochastic else "remainder"
    badam_kernels.fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, lr=1e-3, weight_decay=0.1, step=step, master_weights=mode,
        masters=None if stochastic else remainders, stochastic_rounding=stochastic, seed=seed,
        grad_mul=grad_mul, backend="triton",
    )  # fmt: skip


def test_other_blocks_steps_and_seeds_reuse_one_compile(device, monkeypatch):
    recorder = RecordLaunches(fused_adamw._fused_adamw_kernel)
    monkeypatch.setattr(fused_adamw, "_fused_adamw_kernel", recorder)
    grad_mul = torch.tensor(0.5, device=device)
    # Blocks of other tensor counts and sizes (so other chunk sizes, program counts and table
    # lengths), one with a misaligned tensor, at steps and seeds whose 32-bit forms are small, odd,
    # 1, and above 2**31 (which Triton would otherwise type as i64).
    step(adamw_block([1, 4099, 3000, 70001], device), step=1, grad_mul=grad_mul)
    step(adamw_block([5, 17], device, misaligned=1), step=2, grad_mul=grad_mul)
    step(adamw_block([2048] * 9, device), step=1000, grad_mul=grad_mul)
    step(adamw_block([300_000], device), step=2**32 - 1, grad_mul=grad_mul)
    assert len(recorder.launches) == 4
    assert len(recorder.cache_keys()) == 1, recorder.cache_keys()

    recorder.launches.clear()
    step(adamw_block([3, 1023], device), step=1, seed=1, stochastic=True)
    step(adamw_block([70001], device), step=16, seed=(1 << 40) + 2**31 + 3, stochastic=True)
    assert len(recorder.cache_keys()) == 1, recorder.cache_keys()


def test_the_key_would_tell_specialised_values_apart(device, monkeypatch):
    """The check above has teeth: the same launches, keyed as if nothing were exempt from
    specialisation, need several compiles."""
    recorder = RecordLaunches(fused_adamw._fused_adamw_kernel)
    monkeypatch.setattr(fused_adamw, "_fused_adamw_kernel", recorder)
    step(adamw_block([1, 4099], device), step=1)
    step(adamw_block([5, 17], device), step=2**32 - 1)
    specialising = RecordLaunches(JITFunction(getattr(recorder.kernel, "fn", recorder.kernel)))
    specialising.launches = recorder.launches
    assert len(recorder.cache_keys()) == 1
    assert len(specialising.cache_keys()) == 2


def test_grad_norm_of_other_lists_reuses_one_compile(device, monkeypatch):
    recorder = RecordLaunches(grad_norm._sum_of_squares_kernel)
    monkeypatch.setattr(grad_norm, "_sum_of_squares_kernel", recorder)
    badam_kernels.grad_norm([torch.ones(n, device=device) for n in (1, 4099, 70001)], backend="triton")
    badam_kernels.grad_norm([torch.ones(n, device=device) for n in (16, 32)], backend="triton")
    badam_kernels.grad_norm([torch.ones(300_001, device=device)[1:]], backend="triton")
    assert len(recorder.launches) == 3
    assert len(recorder.cache_keys()) == 1, recorder.cache_keys()


def test_tables_are_cached_per_tensor_list(device):
    utils.clear_table_cache()
    columns = [(4096, 8192, 0, 0, 0, 1000, 0), (12288, 16384, 0, 0, 0, 5, 1)]
    first = utils.launch_tables(columns, 5, device)
    assert utils.launch_tables(list(columns), 5, device) is first, "the same tensors must hit the cache"
    other = utils.launch_tables([columns[0]], 5, device)
    assert other is not first
    assert [t.num_programs for t in first] == [2] and [t.num_programs for t in other] == [1]
    for i in range(utils.TABLE_CACHE_SIZE):
        utils.launch_tables([(16 * (i + 1), 0, 0, 0, 0, 7, 0)], 5, device)
    assert len(utils._tables) == utils.TABLE_CACHE_SIZE, "the cache must stay bounded"
    assert utils.launch_tables(columns, 5, device) is not first, "the oldest entry must have been evicted"


def test_table_layout(device):
    """Rows of the table as the kernels read them (utils.py): pointers, numel, first program,
    vector_ok, extras; columns beyond the tensors are padding that no program id reaches."""
    utils.clear_table_cache()
    columns = [(16, 32, 100, 11), (33, 48, 3, 12), (64, 80, 0, 13)]  # 2 pointers, numel, 1 extra
    (launch,) = utils.launch_tables(columns, 2, device)
    table = launch.table.cpu().view(-1, utils.MAX_TENSORS)
    assert table.shape[0] == 2 + 3 + 1
    non_empty = columns[:2]  # the empty tensor gets no column
    for column, c in enumerate(non_empty):
        assert table[:, column].tolist()[:3] == list(c[:3])
        assert table[5, column] == c[3]
    assert table[3, :2].tolist() == [0, 1]
    assert table[4, :2].tolist() == [1, 0], "a pointer at 33 does not allow 16-byte vectors"
    assert launch.num_programs == 2
    assert bool((table[3, 2:] > launch.num_programs).all())

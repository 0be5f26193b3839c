"""Multi-tensor launch plumbing shared by the Triton kernels.

One launch covers up to MAX_TENSORS tensors of a dtype group. The kernel gets one int64 device
tensor, the launch table: `rows x MAX_TENSORS` values, one column per tensor (unused columns are
padding). Its rows, for a kernel with P pointer roles:
  0 .. P-1   the data_ptr() of each role (param, grad, ...)
  P          numel
  P + 1      the first program of the tensor's chunks
  P + 2      1 if every pointer of the tensor allows 16-byte vector accesses, else 0
  P + 3 ...  extra per-tensor integers (e.g. the tensor's index in the caller's list)

Programs are numbered tensor by tensor: tensor t owns programs [first[t], first[t + 1]), one per
`chunk` elements. A program finds its tensor by comparing its id with the whole `first` row in one
vector load, so the host never builds a per-program table: the table's size and the time to build it
depend on the number of tensors only.

Nothing that varies from block to block reaches the kernel as a specialised value: the rows sit at
fixed offsets (row * MAX_TENSORS), the table is a fresh allocation (aligned), `chunk` and the other
integers are in the kernels' do_not_specialize lists, and alignment is read from the table per
tensor. So a new block of other sizes or tensor counts reuses the compiled kernel.

Tables are cached per (device, stream, tensor list): an optimizer calls with the same tensors step
after step, and then a call costs the data_ptr() reads and one dictionary lookup, not an upload.
Offsets are int64 so tensors of more than 2**31 elements work.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, defaultdict
from collections.abc import Hashable, Sequence

import torch
import triton
import triton.language as tl

# 1024 elements per block with 8 warps is 4 elements per thread: one 16-byte vector of fp32 (8 bytes
# of bf16) per thread and tensor, the CUDA kernel's shape. 16 elements per thread (BLOCK 4096, 8
# warps) needed 176-255 registers for sm_90 (Triton 3.9 / 3.6; the fp32-master kernel spilled), one
# block per SM; at 4 per thread every variant needs 40-61 (tests/test_triton_compile.py checks
# REGISTER_BUDGET and no spills), so 4 blocks (1024 threads) share an SM and keep loads in flight.
# A misaligned tensor takes blocks of BLOCK // 4 with scalar accesses: wider scalar blocks need
# almost twice the registers.
# The launchers read both at call time, so bench/triton_tiling.py can compare other tilings.
BLOCK = 1024
NUM_WARPS = 8
# Registers per thread the kernels must stay within (checked for sm_90): 64 lets 4 blocks of 256
# threads share the 64K registers of an SM.
REGISTER_BUDGET = 64
# The indexed sparse Adam kernel (badam's "scatter" masks) gathers and scatters the parameter entry
# by entry, and masks every access by the index range check, so it keeps 64-bit addresses and masks
# per element: 89-98 registers for sm_90 (98 for bf16 with the NaN-safe remainder encoding, triton
# 3.9). Up to 128 still fits two blocks of 256 threads per SM (2 x 256 x 128 = 64K). Its accesses
# are scattered anyway; the contiguous ("adjacent") variant stays within REGISTER_BUDGET.
GATHER_REGISTER_BUDGET = 128
# Columns of the launch table: tensors per launch. A BAdam block (one Llama layer: 9 tensors, up to
# 48 with biases and norms of a bigger block) is one launch; longer lists take several.
MAX_TENSORS = 64
# A program owns up to MAX_BLOCKS_PER_PROGRAM blocks. Small calls get one block per program so that
# they still spread over all SMs; TARGET_PROGRAMS is a few waves of programs on a 100+ SM GPU.
MAX_BLOCKS_PER_PROGRAM = 64
TARGET_PROGRAMS = 1024
TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
# Pointers aligned to 16 bytes let the compiler use 128-bit loads and stores.
VECTOR_BYTES = 16
# Launch tables kept per (device, stream, tensor list); an optimizer needs one per active
# (device, dtype) group, a few more when gradients move between steps.
TABLE_CACHE_SIZE = 64
# The `first` row's padding: larger than any program id, so padding columns never match.
_NO_PROGRAM = 2**62


class LaunchTable:
    """One launch's device table (see the module docstring) and its grid."""

    __slots__ = ("table", "num_programs", "chunk")

    def __init__(self, table: torch.Tensor, num_programs: int, chunk: int):
        self.table = table  # int64 (rows * MAX_TENSORS,) on the tensors' device
        self.num_programs = num_programs
        self.chunk = chunk  # elements per program, a multiple of BLOCK


_MAX_TENSORS = tl.constexpr(MAX_TENSORS)


@triton.jit
def table_entry(table, row, column):
    """The launch table's value at (row, column)."""
    return tl.load(table + row * _MAX_TENSORS + column)


@triton.jit
def locate_chunk(table, NUM_POINTERS: tl.constexpr):
    """(column of this program's tensor, index of its chunk within the tensor)."""
    pid = tl.program_id(0)
    first_row = table + (NUM_POINTERS + 1) * _MAX_TENSORS
    firsts = tl.load(first_row + tl.arange(0, _MAX_TENSORS))
    column = tl.sum((firsts <= pid).to(tl.int32), axis=0) - 1
    return column, pid - tl.load(first_row + column)


@triton.jit
def vector_ok(table, column, NUM_POINTERS: tl.constexpr):
    return table_entry(table, NUM_POINTERS + 2, column) != 0


_tables: OrderedDict[Hashable, list[LaunchTable]] = OrderedDict()


def group_by(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Indices of `keys` grouped by key, in first-seen order (one launch per group)."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        groups[key].append(index)
    return dict(groups)


def device_context(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` current, so that Triton launches on the stream of the tensors' GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _chunk_size(numels: Sequence[int]) -> int:
    total_blocks = sum(-(-n // BLOCK) for n in numels)
    blocks_per_program = -(-total_blocks // TARGET_PROGRAMS)
    return BLOCK * max(1, min(MAX_BLOCKS_PER_PROGRAM, blocks_per_program))


def _build(columns: Sequence[tuple[int, ...]], num_pointers: int, device: torch.device) -> list[LaunchTable]:
    """Tables for `columns`: per tensor (pointers..., numel, extras...); empty tensors skipped."""
    columns = [c for c in columns if c[num_pointers] > 0]
    if not columns:
        return []
    chunk = _chunk_size([c[num_pointers] for c in columns])
    launches = []
    for begin in range(0, len(columns), MAX_TENSORS):
        part = columns[begin : begin + MAX_TENSORS]
        first, programs = [], 0
        for c in part:
            first.append(programs)
            programs += -(-c[num_pointers] // chunk)
        padding = MAX_TENSORS - len(part)
        given = [[c[r] for c in part] + [0] * padding for r in range(len(part[0]))]
        vector_ok = [int(all(c[r] % VECTOR_BYTES == 0 for r in range(num_pointers))) for c in part]
        rows = given[: num_pointers + 1] + [first + [_NO_PROGRAM] * padding, vector_ok + [0] * padding]
        rows += given[num_pointers + 1 :]
        table = torch.tensor([x for row in rows for x in row], dtype=torch.int64)
        if device.type == "cuda":
            # Pinned memory makes the copy asynchronous on the current stream (no host sync); the
            # caching host allocator keeps the buffer alive until the copy has run.
            table = table.pin_memory().to(device, non_blocking=True)
        launches.append(LaunchTable(table, programs, chunk))
    return launches


def launch_tables(
    columns: Sequence[tuple[int, ...]], num_pointers: int, device: torch.device
) -> list[LaunchTable]:
    """The launches for a dtype group, from the cache when the same tensors come again.

    columns: one tuple per tensor, (data pointers (num_pointers of them), numel, extra ints...);
        a null pointer (0) counts as aligned (an unused role).
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    # A table is used only on the stream that uploaded it, so no launch can read it before its copy.
    key = (device, stream, num_pointers, tuple(columns))
    launches = _tables.get(key)
    if launches is None:
        launches = _build(columns, num_pointers, device)
        _tables[key] = launches
        if len(_tables) > TABLE_CACHE_SIZE:
            # The evicted table's memory returns to the caching allocator, which hands it only to
            # work queued later on the same stream: launches already queued finish reading first.
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return launches


def clear_table_cache() -> None:
    """Drop every cached launch table (tests and benchmarks that time a cold call)."""
    _tables.clear()

"""Multi-tensor launch plumbing shared by the Triton kernels.

One launch covers every tensor of a dtype group. The kernel gets one int64 device tensor that
holds two tables:
  tensor table  (rows x num_tensors): per tensor, the data_ptr() of each role (param, grad, ...)
                followed by extra per-tensor integers (numel, a hash key, ...);
  program table (2 x num_programs):   per program, the tensor's column in the tensor table and
                the first element of the chunk it owns.
Each program walks its chunk one BLOCK at a time; offsets are int64 so tensors of more than
2**31 elements work.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import triton.language as tl

# 4096 elements per block with 8 warps is 16 elements per thread: two 16-byte vectors of bf16 or
# four of fp32 per thread and tensor, enough loads in flight to saturate HBM. It also keeps the
# CPU interpreter (which runs every program as numpy code) fast.
BLOCK = 4096
NUM_WARPS = 8
# A program owns up to MAX_BLOCKS_PER_PROGRAM blocks, so the program table of a large call stays
# small (16 bytes per 64K elements: 48 KB for a 200M-parameter block, copied once per call).
# Small calls get one block per program so that they still spread over all SMs; TARGET_PROGRAMS
# is a few waves of programs on a 100+ SM GPU.
MAX_BLOCKS_PER_PROGRAM = 16
TARGET_PROGRAMS = 1024
TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
# Pointers aligned to 16 bytes let the compiler use 128-bit loads and stores.
VECTOR_BYTES = 16


@dataclass(frozen=True)
class LaunchTables:
    """Device tables for one multi-tensor launch (see the module docstring)."""

    tensor_table: torch.Tensor  # int64 (rows * num_tensors,), on the tensors' device
    program_table: torch.Tensor  # int64 (2 * num_programs,), same buffer as tensor_table
    num_tensors: int
    num_programs: int
    chunk: int  # elements per program, a multiple of BLOCK
    aligned: bool  # every pointer in the tensor table is a multiple of VECTOR_BYTES


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


def build_launch_tables(
    pointer_rows: Sequence[Sequence[int]],
    extra_rows: Sequence[Sequence[int]],
    numels: Sequence[int],
    device: torch.device,
) -> LaunchTables | None:
    """Pack the tables for tensors with `numels`; None when every tensor is empty.

    pointer_rows: per role, one data_ptr() per tensor (checked for alignment).
    extra_rows: further per-tensor int64 rows (e.g. numel), placed after the pointer rows.
    """
    chunk = _chunk_size(numels)
    program_tensor, program_start = [], []
    for column, numel in enumerate(numels):
        for start in range(0, numel, chunk):
            program_tensor.append(column)
            program_start.append(start)
    if not program_tensor:
        return None
    rows = [list(r) for r in pointer_rows] + [list(r) for r in extra_rows]
    flat = [x for row in rows for x in row] + program_tensor + program_start
    storage = torch.tensor(flat, dtype=torch.int64)
    if device.type == "cuda":
        # Pinned memory makes the copy asynchronous on the current stream (no host sync); the
        # caching host allocator keeps the buffer alive until the copy has run.
        storage = storage.pin_memory().to(device, non_blocking=True)
    num_tensors = len(numels)
    table_len = len(rows) * num_tensors
    return LaunchTables(
        tensor_table=storage[:table_len],
        program_table=storage[table_len:],
        num_tensors=num_tensors,
        num_programs=len(program_tensor),
        chunk=chunk,
        aligned=all(p % VECTOR_BYTES == 0 for row in pointer_rows for p in row),
    )

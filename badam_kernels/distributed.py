"""BlockAdamW on torch.distributed: data parallel over the active block, and FSDP2 shards.

Data parallel (`BlockAdamW(..., process_group=group)`, no DDP wrapper): only the active block
has gradients, so only they are averaged: 1/D of DDP's traffic for D blocks.
`ActiveBlockGradientSync` registers a post-accumulate-grad hook on each active parameter; when
every gradient of a bucket (consecutive active parameters in backward order, up to
`bucket_bytes`) is ready, the bucket is flattened into one buffer and an asynchronous all-reduce
is launched, so communication overlaps the rest of backward. step() waits for the buckets and
writes the averages back into the gradients before the update. Hooks move with block switches.

Gradient accumulation: a hook cannot tell the last backward of a step from the others. A bucket
whose gradients change after it was launched (a second backward before step()) is reduced again,
from the accumulated gradients, in step(): always correct, but the early launch was wasted.
Wrap the backward passes before the last one in `optimizer.gradient_sync.no_sync()` (DDP's
idiom) to communicate once per step, overlapped with the last backward.

Sharded (FSDP2, `torch.distributed.fsdp.fully_shard`): leave `process_group=None`. Parameters
and gradients are DTensors; FSDP2 reduce-scatters the gradients of parameters that require grad,
i.e. of the active block only. The optimizer runs the fused kernels on the local shards
(`local_tensor`), keeps its Adam state as DTensors shaped like the parameters, and clips with a
norm summed over the shards (`sum_of_squares_over_shards`). FSDP2 copies `requires_grad` from
the sharded to the unsharded parameter at every all-gather (FSDPParam.to_unsharded), so block
switches between iterations need nothing more. `save_checkpoint` / `load_checkpoint` write and
read model and optimizer with torch.distributed.checkpoint (DCP).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from badam_kernels.weak_hooks import weak_method_hook

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:
    try:
        from torch.distributed._tensor import DTensor, Shard  # torch 2.4
    except ImportError:  # torch built without distributed support
        DTensor = Shard = None

DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb
SWITCH_MODE_CODES = {"random": 0, "ascending": 1, "descending": 2, "fixed": 3}

DDP_MESSAGE = (
    "BlockAdamW got a DistributedDataParallel-wrapped model. DDP reduces the parameters that required "
    "grad when it was built: wrapped before BlockAdamW, it fails at the second step ('Expected to have "
    "finished reduction...') or, with find_unused_parameters=True, sends the whole model every step; "
    "wrapped after, it never averages the later blocks and the ranks drift apart. Pass the unwrapped "
    "model (ddp_model.module) and process_group=torch.distributed.group.WORLD (or your group): "
    "BlockAdamW then averages only the active block's gradients itself."
)


def is_dtensor(t: torch.Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels update: this rank's shard of a DTensor, else `t` itself."""
    return t.to_local() if is_dtensor(t) else t


def reject_ddp(model_or_named_params: Any, names: Sequence[str]) -> None:
    """Raise for a DDP-wrapped model; warn when names look like one (all start with "module.")."""
    if isinstance(model_or_named_params, nn.parallel.DistributedDataParallel):
        raise TypeError(DDP_MESSAGE)
    if names and all(name.startswith("module.") for name in names):
        warnings.warn(
            "every parameter name starts with 'module.': if these come from a DistributedDataParallel "
            "wrapper, BlockAdamW will not work with it. " + DDP_MESSAGE,
            stacklevel=3,
        )


def sum_of_squares_over_shards(sum_of_squares: torch.Tensor, grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Complete a gradient's squared norm computed on local shards: sum it over every mesh
    dimension the gradients are sharded along (FSDP2: the shard dimension; HSDP's replicate
    dimension holds copies and is left out). Plain tensors need nothing."""
    sharded = [g for g in grads if is_dtensor(g)]
    if not sharded:
        return sum_of_squares
    if len(sharded) != len(grads):
        raise ValueError("max_grad_norm: the active gradients mix DTensors and plain tensors")
    layouts = {(g.device_mesh, tuple(isinstance(pl, Shard) for pl in g.placements)) for g in sharded}
    if len(layouts) != 1:
        raise ValueError(
            "max_grad_norm with DTensor gradients needs every active parameter on the same mesh with "
            f"the same sharded dimensions, found {len(layouts)} layouts"
        )
    ((mesh, sharded_dims),) = layouts
    for dim, is_sharded in enumerate(sharded_dims):
        if is_sharded:
            dist.all_reduce(sum_of_squares, group=mesh.get_group(dim))
    return sum_of_squares


@dataclass
class _Bucket:
    """Active parameters whose gradients travel in one all-reduce (same device and dtype)."""

    params: list[torch.Tensor]
    ready: set[int] = field(default_factory=set)  # id() of params whose hook fired since step()
    flat: torch.Tensor | None = None
    work: Any = None
    stale: bool = False  # a gradient changed after the launch: reduce again in step()

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)


class ActiveBlockGradientSync:
    """Averages the active block's gradients over `process_group`, launched during backward.

    Built by BlockAdamW when `process_group` is given (available as `optimizer.gradient_sync`).
    At construction every parameter (and the model's buffers) is broadcast from the group's
    first rank, as DDP does, so all ranks start identical. At every block switch the ranks
    check that they agree on the schedule (a seed or a resumed state that differs would make
    them train different blocks).

    Args:
        process_group: the ranks that average gradients (e.g. torch.distributed.group.WORLD).
        named: every (name, parameter) of the optimizer, in model order.
        model: the module, when the optimizer was given one (its buffers are broadcast too).
        bucket_bytes: the most gradient bytes flattened into one all-reduce.

    Attributes:
        bucket_bytes: as above; buckets are rebuilt at block switches, so a change applies from
            the next switch.
        bytes_last_step: gradient bytes all-reduced for the last completed step.
        bytes_total: gradient bytes all-reduced since construction.

    Example:
        >>> opt = BlockAdamW(model, lr=1e-5, process_group=dist.group.WORLD)
        >>> with opt.gradient_sync.no_sync():  # micro-batches before the last: no communication
        ...     loss_fn(model, batch0).backward()
        >>> loss_fn(model, batch1).backward(); opt.step()
    """

    def __init__(
        self,
        process_group: Any,
        named: Sequence[tuple[str, torch.Tensor]],
        model: nn.Module | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group(...) first (torchrun sets the environment)"
            )
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                "process_group must be a torch.distributed.ProcessGroup (e.g. "
                f"torch.distributed.group.WORLD), got {type(process_group).__name__}"
            )
        dtensors = [name for name, p in named if is_dtensor(p)]
        if dtensors:
            raise ValueError(
                f"parameter {dtensors[0]!r} is a DTensor (FSDP2/fully_shard): FSDP2 already reduces the "
                "active block's gradients; leave process_group=None"
            )
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.bucket_bytes = int(bucket_bytes)
        self.bytes_last_step = 0
        self.bytes_total = 0
        self._bytes_this_step = 0
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._next_launch = 0  # buckets launch in order, so every rank issues the same sequence
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._syncing = True
        self._warned_accumulation = False
        tensors = [p for _, p in named] + (list(model.buffers()) if model is not None else [])
        self._broadcast_from_first_rank(tensors)

    # ---- construction and block switches ------------------------------------------------------

    @torch.no_grad()
    def _broadcast_from_first_rank(self, tensors: Sequence[torch.Tensor]) -> None:
        source = dist.get_global_rank(self.group, 0)
        for t in tensors:
            dist.broadcast(t.data, src=source, group=self.group)

    def watch(self, active: Sequence[torch.Tensor], schedule: Any) -> None:
        """After a block switch: hooks on the new active parameters only, buckets rebuilt, and a
        check that every rank has the same schedule."""
        self.unwatch()
        self._verify_same_schedule(schedule, active[0].device)
        self._buckets = []
        for p in reversed(active):  # backward meets the last-registered parameters first
            last = self._buckets[-1] if self._buckets else None
            fits = (
                last is not None
                and last.params[0].dtype == p.dtype
                and last.params[0].device == p.device
                and last.nbytes + p.numel() * p.element_size() <= self.bucket_bytes
            )
            if fits:
                last.params.append(p)
            else:
                self._buckets.append(_Bucket([p]))
        self._bucket_of = {id(p): bucket for bucket in self._buckets for p in bucket.params}
        self._next_launch = 0
        hook = weak_method_hook(self, "_grad_ready")
        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in active]

    def unwatch(self) -> None:
        """Remove the gradient hooks (a newer optimizer took the parameters over)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _verify_same_schedule(self, schedule: Any, device: torch.device) -> None:
        values = [
            schedule.num_blocks,
            schedule.switch_every,
            SWITCH_MODE_CODES.get(schedule.mode, -1),
            schedule.current,
            schedule.upcoming,
            schedule.steps_in_block,
            schedule.global_step,
        ]
        local = torch.tensor(values + [-v for v in values], dtype=torch.int64, device=device)
        extremes = local.clone()
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.group)
        n = len(values)
        if not torch.equal(extremes[:n], -extremes[n:]):
            raise RuntimeError(
                "ranks disagree on the block schedule (num_blocks, switch_every, mode, current, upcoming, "
                f"steps_in_block, global_step): this rank has {values}, the maxima over ranks are "
                f"{extremes[:n].tolist()}. Give every rank the same seed, blocks and options, and load "
                "the same checkpoint on every rank."
            )

    # ---- backward -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally without communication; the gradients are
        averaged by the next backward outside (or, at the latest, in step())."""
        previous, self._syncing = self._syncing, False
        try:
            yield
        finally:
            self._syncing = previous

    def _grad_ready(self, p: torch.Tensor) -> None:
        bucket = self._bucket_of[id(p)]
        if bucket.work is not None:  # launched already: a later backward changed this gradient
            bucket.stale = True
            self._warn_accumulation()
            return
        if not self._syncing:
            return
        bucket.ready.add(id(p))
        while self._next_launch < len(self._buckets):
            next_bucket = self._buckets[self._next_launch]
            if len(next_bucket.ready) < len(next_bucket.params):
                break
            self._launch(next_bucket)
            self._next_launch += 1

    def _warn_accumulation(self) -> None:
        if not self._warned_accumulation:
            self._warned_accumulation = True
            warnings.warn(
                "gradient accumulation with process_group: a bucket was all-reduced during one backward "
                "and changed by the next, so it is reduced again in step(). Wrap the backward passes "
                "before the last in `with optimizer.gradient_sync.no_sync():` to communicate once.",
                stacklevel=2,
            )

    def _launch(self, bucket: _Bucket) -> None:
        # A copy, not the gradients themselves: a later backward may accumulate into them while the
        # collective runs. Pre-dividing keeps fp16 sums in range (gloo has no ReduceOp.AVG).
        grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in bucket.params]
        bucket.flat = torch.cat(grads).div_(self.world_size)
        bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
        bucket.stale = False
        nbytes = bucket.flat.numel() * bucket.flat.element_size()
        self._bytes_this_step += nbytes
        self.bytes_total += nbytes

    # ---- step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def synchronize(self, found_inf: torch.Tensor | None = None) -> None:
        """Called by step() before the update: launch what backward did not (a parameter without a
        gradient here counts as zero), wait, and write the averages into the gradients. A
        GradScaler's `found_inf` is max-reduced so every rank skips the same steps."""
        for index, bucket in enumerate(self._buckets):
            if bucket.stale:
                bucket.work.wait()
            if index >= self._next_launch or bucket.stale:
                self._launch(bucket)
        if found_inf is not None:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.group)
        for bucket in self._buckets:
            bucket.work.wait()
            offset = 0
            for p in bucket.params:
                average = bucket.flat[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
                if p.grad is None:
                    p.grad = average
                else:
                    p.grad.copy_(average)
            bucket.flat = bucket.work = None
            bucket.ready = set()
        self._next_launch = 0
        self.bytes_last_step = self._bytes_this_step
        self._bytes_this_step = 0


# ---- checkpoints (torch.distributed.checkpoint) ------------------------------------------------


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_id: str) -> None:
    """Save model and optimizer (Adam state of the active block, schedule) with DCP, each rank
    writing its own shards. Collective: call on every rank.

    torch.distributed.checkpoint.state_dict.get_state_dict is not used on purpose: on an optimizer
    with no state (BlockAdamW right after a block switch) it runs a step with zero gradients to
    create the state, which would advance the block schedule."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=checkpoint_id)


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_id: str) -> None:
    """Load what `save_checkpoint` wrote into `model` and a freshly built `optimizer`, resharding
    to the current layout. Collective: call on every rank.

    DCP loads in place, into tensors that already exist; BlockAdamW creates Adam state lazily, so
    the state of the block that was active at save time is first allocated here (zeros shaped and
    sharded like its parameters), following the checkpoint's metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata()
    optimizer_state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Keyed by str: DCP writes Python values back along paths of str keys (tensors load in place).
    saved_state: dict[str, dict[str, Any]] = {}
    prefix = "optimizer.state."
    for key, item in metadata.state_dict_metadata.items():
        if not key.startswith(prefix):
            continue
        index, _, name = key[len(prefix) :].partition(".")
        p = params[int(index)]
        if isinstance(item, TensorStorageMetadata):
            if tuple(item.size) != tuple(p.shape):
                raise ValueError(
                    f"checkpoint entry {key!r} has shape {tuple(item.size)}, its parameter {tuple(p.shape)}"
                )
            value: Any = torch.zeros_like(p, dtype=item.properties.dtype)
        else:
            value = None  # a Python value (the Adam step), replaced by the load
        saved_state.setdefault(index, {})[name] = value
    optimizer_state["state"] = saved_state
    # Checkpoints written before BlockAdamW recorded its block layout and seed lack them; without
    # these template entries DCP loads the rest and load_state_dict checks less, with a warning.
    if not any(key.startswith("optimizer.block_layout.") for key in metadata.state_dict_metadata):
        optimizer_state.pop("block_layout", None)
    if "optimizer.block_schedule.seed" not in metadata.state_dict_metadata:
        optimizer_state.get("block_schedule", {}).pop("seed", None)
    state = {"model": model.state_dict(), "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint_id)
    model.load_state_dict(state["model"])
    optimizer_state["state"] = {int(index): value for index, value in saved_state.items()}
    optimizer.load_state_dict(optimizer_state)

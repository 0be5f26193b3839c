"""The block order: which block is active, when to switch, and the state that resumes it exactly.

Like badam, the schedule chooses the next block as soon as a block becomes active (one block
of lookahead). For "random" this draws each new permutation at the same moment badam does, so
a schedule driven by torch's global RNG consumes it exactly as badam would.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from badam_kernels.arguments import as_int

SWITCH_MODES = ("random", "ascending", "descending", "fixed")


class BlockSchedule:
    """Block order over `num_blocks` blocks, switching after `switch_every` steps.

    Args:
        num_blocks: how many blocks there are (>= 1).
        switch_every: steps each block stays active (>= 1).
        mode: "random" (a fresh permutation for every pass over the blocks), "ascending",
            "descending" or "fixed" (the same block throughout).
        start_block: the first block; default 0 for "ascending"/"fixed", the last for
            "descending", the first of the permutation for "random" (with a start block the
            first random pass is the start block, then every other block once).
        seed: seeds the random order (a generator of its own, independent of torch's global
            RNG); None draws from torch's global RNG (badam's behaviour).
        first_block_steps: steps of the first block, when it must differ from switch_every
            (badam switches after switch_every - 1 steps the first time).
        restart_same_block: whether `step()` reports a switch when the next block is the one
            just trained (fixed mode, one block, or a random pass that begins where the last
            ended). badam restarts the block (fresh Adam state); by default it simply continues.

    Example:
        >>> s = BlockSchedule(3, switch_every=2, mode="ascending")
        >>> [s.current] + [s.current for _ in range(4) if s.step()]
        [0, 1, 2]
    """

    def __init__(
        self,
        num_blocks: int,
        switch_every: int,
        mode: str,
        start_block: int | None = None,
        seed: int | None = None,
        first_block_steps: int | None = None,
        restart_same_block: bool = False,
    ) -> None:
        if mode not in SWITCH_MODES:
            raise ValueError(f"switch_mode must be one of {SWITCH_MODES}, got {mode!r}")
        switch_every = as_int("switch_every", switch_every, low=1)
        if first_block_steps is not None:
            first_block_steps = as_int("first_block_steps", first_block_steps, low=1)
        num_blocks = as_int("num_blocks", num_blocks, low=1)
        if start_block is not None:
            start_block = as_int("start_block", start_block, 0, num_blocks)
        self.num_blocks = num_blocks
        self.switch_every = switch_every
        self.mode = mode
        self.seed = None if seed is None else as_int("seed", seed, 0, 2**63)
        self.generator = None if seed is None else torch.Generator().manual_seed(self.seed)
        self.restart_same_block = restart_same_block
        self.order: list[int] = []  # the rest of the current random pass, popped from the end
        self.global_step = 0
        # Counting starts above 0 when the first block is to be shorter than the others.
        self.steps_in_block = switch_every - (first_block_steps or switch_every)
        if start_block is not None:
            self.current = start_block
            if mode == "random":  # the first pass visits the start block once, like any other
                self.order = [b for b in self._permutation() if b != start_block]
        elif mode == "descending":
            self.current = num_blocks - 1
        elif mode == "random":
            self.current = self._pop_random()
        else:
            self.current = 0
        self.upcoming = self._following(self.current)

    def _permutation(self) -> list[int]:
        return torch.randperm(self.num_blocks, generator=self.generator).tolist()

    def _pop_random(self) -> int:
        if not self.order:
            self.order = self._permutation()
        return self.order.pop()

    def _following(self, block: int) -> int:
        if self.mode == "random":
            return self._pop_random()
        if self.mode == "ascending":
            return (block + 1) % self.num_blocks
        if self.mode == "descending":
            return (block - 1) % self.num_blocks
        return block

    def step(self) -> bool:
        """Count one optimizer step; return True when another block has just become current
        (or the same one restarts, with restart_same_block)."""
        self.global_step += 1
        self.steps_in_block += 1
        if self.steps_in_block < self.switch_every:
            return False
        self.steps_in_block = 0
        previous, self.current = self.current, self.upcoming
        self.upcoming = self._following(self.current)
        return self.restart_same_block or self.current != previous

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same block sequence, RNG included."""
        return {
            "num_blocks": self.num_blocks,
            "switch_every": self.switch_every,
            "mode": self.mode,
            "seed": self.seed,
            "current": self.current,
            "upcoming": self.upcoming,
            "order": list(self.order),
            "steps_in_block": self.steps_in_block,
            "global_step": self.global_step,
            "rng_state": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved schedule. The block count and mode must match; a switch_every or
        seed that differs from the saved one is replaced by it, with a warning."""
        for key in ("num_blocks", "mode"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"saved schedule has {key}={state[key]!r}, this one has {getattr(self, key)!r}"
                )
        # State dicts saved before the seed was recorded carry only the generator state.
        for key in ("switch_every", "seed") if "seed" in state else ("switch_every",):
            if state[key] != getattr(self, key):
                warnings.warn(
                    f"the loaded schedule has {key}={state[key]!r}, this optimizer was built with "
                    f"{key}={getattr(self, key)!r}: the loaded value {state[key]!r} wins, so the resumed "
                    "run continues the saved schedule",
                    stacklevel=3,
                )
        self.switch_every = state["switch_every"]
        self.seed = state.get("seed", self.seed)
        self.current = state["current"]
        self.upcoming = state["upcoming"]
        self.order = list(state["order"])
        self.steps_in_block = state["steps_in_block"]
        self.global_step = state["global_step"]
        if self.generator is not None and state["rng_state"] is not None:
            # .cpu(): accelerate moves every tensor of an optimizer state dict to the GPU.
            self.generator.set_state(state["rng_state"].cpu())

"""The block order: which block is active, when to switch, and the state that resumes it exactly.

Like badam, the schedule chooses the next block as soon as a block becomes active (one block
of lookahead). For "random" this draws each new permutation at the same moment badam does, so
a schedule driven by torch's global RNG consumes it exactly as badam would.
"""

from __future__ import annotations

from typing import Any

import torch

SWITCH_MODES = ("random", "ascending", "descending", "fixed")


class BlockSchedule:
    """Block order over `num_blocks` blocks, switching after `switch_every` steps.

    Args:
        num_blocks: how many blocks there are (>= 1).
        switch_every: steps each block stays active (>= 1).
        mode: "random" (a fresh permutation for every pass over the blocks), "ascending",
            "descending" or "fixed" (the same block again at every switch).
        start_block: the first block; default 0 for "ascending"/"fixed", the last for
            "descending", the first of the permutation for "random".
        generator: the RNG for "random"; None means torch's global RNG (badam's behaviour).
        first_block_steps: steps of the first block, when it must differ from switch_every
            (badam switches after switch_every - 1 steps the first time).

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
        generator: torch.Generator | None = None,
        first_block_steps: int | None = None,
    ) -> None:
        if mode not in SWITCH_MODES:
            raise ValueError(f"switch_mode must be one of {SWITCH_MODES}, got {mode!r}")
        for name, value in (("switch_every", switch_every), ("first_block_steps", first_block_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"there must be at least one block, got {num_blocks!r}")
        if start_block is not None and (
            isinstance(start_block, bool)
            or not isinstance(start_block, int)
            or not 0 <= start_block < num_blocks
        ):
            raise ValueError(f"start_block must be an int in [0, {num_blocks}), got {start_block!r}")
        self.num_blocks = num_blocks
        self.switch_every = switch_every
        self.mode = mode
        self.generator = generator
        self.order: list[int] = []  # the rest of the current random pass, popped from the end
        self.global_step = 0
        # Counting starts above 0 when the first block is to be shorter than the others.
        self.steps_in_block = switch_every - (first_block_steps or switch_every)
        if start_block is not None:
            self.current = start_block
        elif mode == "descending":
            self.current = num_blocks - 1
        elif mode == "random":
            self.current = self._pop_random()
        else:
            self.current = 0
        self.upcoming = self._following(self.current)

    def _pop_random(self) -> int:
        if not self.order:
            self.order = torch.randperm(self.num_blocks, generator=self.generator).tolist()
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
        """Count one optimizer step; return True when the next block has just become current."""
        self.global_step += 1
        self.steps_in_block += 1
        if self.steps_in_block < self.switch_every:
            return False
        self.steps_in_block = 0
        self.current = self.upcoming
        self.upcoming = self._following(self.current)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same block sequence, RNG included."""
        return {
            "num_blocks": self.num_blocks,
            "switch_every": self.switch_every,
            "mode": self.mode,
            "current": self.current,
            "upcoming": self.upcoming,
            "order": list(self.order),
            "steps_in_block": self.steps_in_block,
            "global_step": self.global_step,
            "rng_state": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict`; the block count and mode must match."""
        for key in ("num_blocks", "mode"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"saved schedule has {key}={state[key]!r}, this one has {getattr(self, key)!r}"
                )
        self.switch_every = state["switch_every"]
        self.current = state["current"]
        self.upcoming = state["upcoming"]
        self.order = list(state["order"])
        self.steps_in_block = state["steps_in_block"]
        self.global_step = state["global_step"]
        if self.generator is not None and state["rng_state"] is not None:
            # .cpu(): accelerate moves every tensor of an optimizer state dict to the GPU.
            self.generator.set_state(state["rng_state"].cpu())

"""Drop-in replacements for the `badam` package's classes, with badam's signatures and quirks,
running on the fused kernels: swapping the import reproduces badam's training.
BlockOptimizerRatio (badam's ratio mode) lives in ratio.py and is re-exported here."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from badam_kernels.arguments import as_bool, as_int
from badam_kernels.optim import BlockAdamW
from badam_kernels.partition import (
    BADAM_LAYER_PATTERN,
    assign_blocks,
    contains,
    infer_blocks,
    infer_blocks_like_badam,
    named_parameters_of,
)
from badam_kernels.ratio import BlockOptimizerRatio
from badam_kernels.schedule import BlockSchedule

__all__ = ["BlockOptimizer", "BlockOptimizerRatio"]


def _runs_fused(base: Optimizer) -> bool:
    """Whether `base` is an Adam/AdamW whose update the fused AdamW kernel computes exactly."""
    if not isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        return False
    d = base.defaults
    if d.get("amsgrad") or d.get("maximize") or d.get("differentiable"):
        return False
    decoupled = isinstance(base, torch.optim.AdamW) or d.get("decoupled_weight_decay", False)
    return decoupled or d.get("weight_decay", 0.0) == 0.0


def print_rank0(message: str) -> None:
    """Print `message` once per job, as badam prints its switch messages: on stdout, on rank 0
    only when torch.distributed is running."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(message, flush=True)


class BlockOptimizer(BlockAdamW):
    """Drop-in replacement for `badam.BlockOptimizer`: same signature, blocks, switch steps and
    parameter groups, so swapping the import reproduces badam's training.

    With a torch Adam/AdamW `base_optimizer` the update runs in the fused kernels with the base
    optimizer's hyperparameters (lr from its first param group; betas, eps and weight decay from
    its defaults, which badam applies to every group, biases included). Any other base optimizer
    runs badam's generic path: an fp32 copy of the active block, the base optimizer on it, the
    result copied back. Like badam, the first block trains switch_block_every - 1 steps, the
    random order comes from torch's global RNG, and always-active modules restart their state
    at every switch.

    `verbose` has the levels LLaMA-Factory documents for `badam_verbose`: 0 prints nothing, 1 a
    line at each block switch, 2 also the trainable parameter names. Like badam, the lines are
    printed (stdout, rank 0), unless `log_fn` is given. (badam 1.4 itself prints the switch line
    at every level, 0 included.)

    Example:
        >>> base = torch.optim.AdamW(model.parameters(), lr=1e-5)
        >>> opt = BlockOptimizer(base, list(model.named_parameters()), switch_block_every=100)
        >>> model(**batch).loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        named_parameters_list: Iterable[tuple[str, torch.Tensor]],
        block_prefix_list: Sequence[Sequence[str]] | None = None,
        switch_block_every: int = 50,
        start_block: int | None = None,
        switch_mode: str = "descending",
        active_modules: Sequence[str] = (),
        include_embedding: bool = False,
        include_lm_head: bool = False,
        verbose: int = 1,
        log_fn: Callable[[str], Any] | None = None,
        ds_zero3_enabled: bool | None = None,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        if ds_zero3_enabled:
            raise NotImplementedError("DeepSpeed ZeRO-3 is not supported by badam_kernels.BlockOptimizer")
        _, named = named_parameters_of(named_parameters_list)
        names = [name for name, _ in named]
        include_embedding = as_bool("include_embedding", include_embedding)
        include_lm_head = as_bool("include_lm_head", include_lm_head)
        if block_prefix_list is None:
            block_prefix_list = infer_blocks_like_badam(names, include_embedding, include_lm_head)
            if not any(BADAM_LAYER_PATTERN.match(name) for name in names):
                # badam finds no "layers.N." (GPT-2, T5, BERT) and crashes on its empty block list,
                # or with include_lm_head trains everything as one block: infer per layer instead.
                block_prefix_list = infer_blocks(names, include_embedding, include_lm_head)
        block_members, always_members = assign_blocks(
            names, block_prefix_list, active_modules, match=contains
        )
        self.base_optimizer = base_optimizer
        self._fused = _runs_fused(base_optimizer)
        if not self._fused:  # GradScaler then unscales and skips the step itself, as for badam
            self._step_supports_amp_scaling = False
        schedule = BlockSchedule(
            len(block_members),
            switch_block_every,
            switch_mode,
            start_block,
            seed=None,
            first_block_steps=max(1, as_int("switch_block_every", switch_block_every, low=1) - 1),
            restart_same_block=True,
        )
        defaults = base_optimizer.defaults
        # badam builds its groups as {"weight_decay": ..., **defaults}: the defaults' weight decay
        # wins in both groups, so biases are decayed too. Reproduced to give badam's iterates.
        weight_decay = defaults.get("weight_decay", 0.0)
        self._setup(
            named,
            block_members,
            always_members,
            {n for n in names if "bias" in n},
            schedule,
            lr=float(base_optimizer.param_groups[0]["lr"]),
            betas=defaults.get("betas", (0.9, 0.999)),
            eps=defaults.get("eps", 1e-8),
            weight_decay=weight_decay,
            no_decay_weight_decay=weight_decay,
            master_weights="auto",
            stochastic_rounding=False,
            max_grad_norm=None,
            backend="auto",
            verbose=verbose,
            log_fn=log_fn or print_rank0,
            reset_always_active=True,
            extra_defaults=defaults,
        )

    @property
    def switch_block_every(self) -> int:
        return self._schedule.switch_every

    @property
    def current_block_idx(self) -> int:
        """badam's attribute name for the block being trained."""
        return self._schedule.current

    def _release(self, p: torch.Tensor) -> None:
        super()._release(p)
        if not self._fused:
            self.base_optimizer.state = defaultdict(dict)

    def _update(self, params: list[torch.Tensor]) -> None:
        if self._fused:
            super()._update(params)
            return
        self._sync_base_groups()
        for p in params:
            master = self.state[p]["master"]
            master.grad = p.grad.float()
        self.base_optimizer.step()
        for p in params:
            master = self.state[p]["master"]
            p.copy_(master)
            master.grad = None

    def _sync_base_groups(self) -> None:
        """Point the base optimizer at fp32 copies of the active block, one group per ours, with
        our (scheduler-driven) lr; the copies are made at the block's first step."""
        groups = []
        active = set(self._active_params())
        for group in self.param_groups:
            masters = []
            for p in group["params"]:
                if p in active:
                    state = self.state[p]
                    if "master" not in state:
                        state["master"] = p.detach().to(torch.float32, copy=True)
                    masters.append(state["master"])
            groups.append(
                {
                    **self.base_optimizer.defaults,
                    **{k: v for k, v in group.items() if k != "params"},
                    "params": masters,
                }
            )
        self.base_optimizer.param_groups = groups

    def state_dict(self) -> dict[str, Any]:
        """BlockAdamW's state dict; on the generic path also the base optimizer's state."""
        state_dict = super().state_dict()
        if not self._fused:
            self._sync_base_groups()
            state_dict["base_optimizer"] = self.base_optimizer.state_dict()
        return state_dict

    def _check_loaded_state(self, p: torch.Tensor, saved: dict[str, Any]) -> None:
        if self._fused:  # the generic path keeps only fp32 copies here, the rest in base_optimizer
            super()._check_loaded_state(p, saved)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if not self._fused:
            self._sync_base_groups()
            self.base_optimizer.load_state_dict(state_dict["base_optimizer"])

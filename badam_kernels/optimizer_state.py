"""Optimizer-state helpers shared by BlockAdamW and BlockOptimizerRatio: restoring a saved state
dict without torch's dtype casts, and counting the bytes the state holds."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.optim import Optimizer


def check_param_groups(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """Refuse a state dict whose param groups have other sizes than the optimizer's."""
    saved_groups = state_dict["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(
            "cannot load this state dict: it has param groups of sizes "
            f"{[len(g['params']) for g in saved_groups]}, this optimizer has "
            f"{[len(g['params']) for g in optimizer.param_groups]}: it was saved for other parameters"
        )


def restore_state(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """Put the saved per-parameter state and the groups' hyperparameters into `optimizer`,
    keeping every tensor's dtype: torch's loader would cast fp32 Adam state and int16
    remainders to the parameter dtype. Parameters are matched by position in the groups."""
    check_param_groups(optimizer, state_dict)
    saved_groups = state_dict["param_groups"]
    param_of = {
        index: p
        for saved, group in zip(saved_groups, optimizer.param_groups)
        for index, p in zip(saved["params"], group["params"])
    }
    optimizer.state = defaultdict(dict)
    for index, saved in state_dict["state"].items():
        p = param_of[index]
        optimizer.state[p] = {
            key: value.detach().to(p.device, copy=True) if isinstance(value, torch.Tensor) else value
            for key, value in saved.items()
        }
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update({key: value for key, value in saved.items() if key != "params"})


def state_bytes(optimizer: Optimizer) -> tuple[int, int]:
    """(bytes of exp_avg and exp_avg_sq, bytes of every other state tensor: masters, remainders)."""
    moments = others = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                nbytes = value.numel() * value.element_size()
                if key in ("exp_avg", "exp_avg_sq"):
                    moments += nbytes
                else:
                    others += nbytes
    return moments, others

"""The module that `import badam` gives under `python -m badam_kernels.llamafactory`: every name
LLaMA-Factory 0.9.5 imports from badam 1.4, served by badam_kernels.

- `BlockOptimizer`: badam_kernels.BlockOptimizer (badam's signature and iterates, fused kernels).
- `BlockOptimizerRatio`: badam_kernels.BlockOptimizerRatio, looked up when first asked for; a
  badam_kernels without it makes `badam_mode: ratio` fail with a message that says so.
- `BAdamCallback`: the Trainer callback LLaMA-Factory adds whenever `use_badam` is set.
- `clip_grad_norm_old_version`: the Accelerator.clip_grad_norm_ replacement LLaMA-Factory binds
  whenever `use_badam` is set.

Importing this module needs transformers and accelerate (LLaMA-Factory's own dependencies).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import badam_kernels
from badam_kernels.badam_compat import BlockOptimizer
from badam_kernels.checkpointing import BackwardCut
from badam_kernels.hf import unwrap_optimizer
from badam_kernels.optim import CLIP_EPS, BlockAdamW

__all__ = ["BAdamCallback", "BlockOptimizer", "clip_grad_norm_old_version"]  # and BlockOptimizerRatio, below

RATIO_MISSING = (
    "badam_mode: ratio needs badam_kernels.BlockOptimizerRatio, which badam_kernels {version} does "
    "not have. Use badam_mode: layer, or run LLaMA-Factory's own `llamafactory-cli` with the real "
    "badam (pip install badam) for ratio mode."
)


def __getattr__(name: str) -> Any:
    """`BlockOptimizerRatio` is resolved when asked for, so that this module imports whether or
    not badam_kernels provides it, and layer mode never depends on it."""
    if name == "BlockOptimizerRatio":
        try:
            return badam_kernels.BlockOptimizerRatio
        except AttributeError:
            raise NotImplementedError(RATIO_MISSING.format(version=badam_kernels.__version__)) from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BAdamCallback(TrainerCallback):
    """badam.BAdamCallback for badam_kernels' optimizers: when training begins, make backward stop
    at the active block.

    badam's callback undoes `model.enable_input_require_grads()` (which makes the embedding output
    require grad, so backward runs through every frozen layer below the active one) and patches
    gradient checkpointing so that only trainable layers see inputs that require grad; its other
    half wires DeepSpeed ZeRO-3, which badam_kernels does not support (BlockOptimizer refuses it
    when built). Both checkpointing cases are what the optimizer's backward cut handles
    (badam_kernels.checkpointing): this callback gives a BlockAdamW/BlockOptimizer built from
    named parameters a `BackwardCut` on the Trainer's model. The cut changes no gradient of the
    active block. Other optimizers are left alone. LLaMA-Factory passes the class itself
    (`trainer.add_callback(BAdamCallback)`), so it takes no arguments.
    """

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        optimizer = unwrap_optimizer(optimizer)
        if isinstance(optimizer, BlockAdamW) and model is not None and optimizer._backward_cut is None:
            optimizer._backward_cut = BackwardCut(model)
            optimizer._rewire_backward()


def clip_grad_norm_old_version(
    self: Any, parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2
) -> torch.Tensor | None:
    """badam.clip_grad_norm_old_version: `Accelerator.clip_grad_norm_` that also takes sparse
    gradients. LLaMA-Factory binds it as a method of the Trainer's accelerator whenever `use_badam`
    is set (`MethodType(clip_grad_norm_old_version, accelerator)`).

    badam's ratio mode leaves sparse gradients, which torch's clip_grad_norm_ (torch._foreach_norm)
    rejects. Without a sparse gradient (layer mode) this is accelerate's own method, unchanged.
    With one, the gradients are unscaled (fp16 GradScaler) and clipped with torch 1.13's formula,
    as badam does: total = norm of the per-tensor norms, each gradient times
    min(1, max_norm / (total + 1e-6)). Returns the total norm before clipping (a 0-dim tensor).
    (badam 1.4 scales `g.detach()`, which for a sparse tensor is a copy: its sparse gradients are
    never actually clipped. Here they are.)
    """
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(g.is_sparse for g in grads):
        return type(self).clip_grad_norm_(self, parameters, max_norm, norm_type)
    self.unscale_gradients()
    norm_type = float(norm_type)
    device = grads[0].device
    norms = [
        torch.linalg.vector_norm(g.detach().coalesce().values() if g.is_sparse else g.detach(), norm_type)
        for g in grads
    ]
    total_norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    clip_coef = torch.clamp(float(max_norm) / (total_norm + CLIP_EPS), max=1.0)
    with torch.no_grad():
        for g in grads:
            g.mul_(clip_coef.to(g.device))
    return total_norm

"""The module that `import badam` gives under `python -m badam_kernels.llamafactory`: every name
LLaMA-Factory 0.9.5 imports from badam 1.4, served by badam_kernels.

- `BlockOptimizer`: badam_kernels.BlockOptimizer (`badam_mode: layer`; badam's signature and
  iterates, fused kernels).
- `BlockOptimizerRatio`: badam_kernels.BlockOptimizerRatio (`badam_mode: ratio`; badam's masks and
  iterates, one fused sparse update per step).
- `BAdamCallback`: the Trainer callback LLaMA-Factory adds whenever `use_badam` is set.
- `clip_grad_norm_old_version`: the Accelerator.clip_grad_norm_ replacement LLaMA-Factory binds
  whenever `use_badam` is set; in ratio mode it clips what BlockOptimizerRatio holds.

Importing this module needs transformers and accelerate (LLaMA-Factory's own dependencies).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from badam_kernels.badam_compat import BlockOptimizer, BlockOptimizerRatio
from badam_kernels.checkpointing import BackwardCut
from badam_kernels.hf import unwrap_optimizer
from badam_kernels.optim import BlockAdamW

__all__ = ["BAdamCallback", "BlockOptimizer", "BlockOptimizerRatio", "clip_grad_norm_old_version"]

RATIO_FP16 = (
    "badam_mode: ratio with fp16 is not supported by badam_kernels' BlockOptimizerRatio (fp16's "
    "GradScaler unscales gradients after backward, when the optimizer has already taken them): "
    "train in bf16 (bf16: true) or use badam_mode: layer"
)


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
    active block. In ratio mode every layer trains and nothing is cut, but fp16 training (whose
    GradScaler unscales the parameters' gradients after backward, when BlockOptimizerRatio has
    already taken them) is refused with a message instead of GradScaler's assertion at the first
    step. Other optimizers are left alone. LLaMA-Factory passes the class itself
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
        if isinstance(optimizer, BlockOptimizerRatio) and getattr(args, "fp16", False):
            raise ValueError(RATIO_FP16)
        if isinstance(optimizer, BlockAdamW) and model is not None and optimizer._backward_cut is None:
            optimizer._backward_cut = BackwardCut(model)
            optimizer._rewire_backward()


def clip_grad_norm_old_version(
    self: Any, parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2
) -> torch.Tensor | None:
    """badam.clip_grad_norm_old_version: the `Accelerator.clip_grad_norm_` that LLaMA-Factory binds to
    the Trainer's accelerator whenever `use_badam` is set (`MethodType(clip_grad_norm_old_version,
    accelerator)`); the Trainer calls it with `model.parameters()` and logs what it returns as
    `grad_norm`.

    - Ratio mode: BlockOptimizerRatio takes each gradient's selected entries during backward and
      frees the dense gradient, so a clip over the parameters would find no gradient and silently
      clip nothing. Instead the BlockOptimizerRatio that this accelerator prepared and that trains
      `parameters` clips what it holds (`BlockOptimizerRatio.clip_grad_norm_`: the L2 norm of the
      selected entries, the factor applied inside its next step, no host sync) and its total norm
      before clipping (0-dim fp32 tensor) is returned. (badam 1.4's own version scales a detached
      copy of its sparse gradients, so in ratio mode it clips nothing; here the clip is real.)
    - Otherwise (layer mode): accelerate's own method, unchanged.
    """
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    optimizer = _ratio_optimizer_of(self, parameters)
    if optimizer is None:
        return type(self).clip_grad_norm_(self, parameters, max_norm, norm_type)
    stray = sum(p.grad is not None for p in parameters)
    if stray:
        raise RuntimeError(
            f"{stray} of the parameters to clip have dense gradients that BlockOptimizerRatio does not "
            "hold (they are not in its param groups); it cannot clip them together with its own"
        )
    return optimizer.clip_grad_norm_(max_norm, norm_type)


def _ratio_optimizer_of(accelerator: Any, parameters: list[torch.Tensor]) -> BlockOptimizerRatio | None:
    """The BlockOptimizerRatio among the optimizers `accelerator.prepare` wrapped (accelerate keeps
    them in `_optimizers`) that trains any of `parameters`, or None."""
    wanted = {id(p) for p in parameters}
    owners = [
        optimizer
        for optimizer in map(unwrap_optimizer, getattr(accelerator, "_optimizers", ()))
        if isinstance(optimizer, BlockOptimizerRatio)
        and optimizer._replaced_for is None  # not taken over by a newer optimizer
        and any(id(p) in wanted for group in optimizer.param_groups for p in group["params"])
    ]
    if len(owners) > 1:
        raise RuntimeError(
            f"{len(owners)} BlockOptimizerRatio instances train these parameters; one global clip over "
            "them is not supported"
        )
    return owners[0] if owners else None

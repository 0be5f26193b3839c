"""Hugging Face Trainer integration: what `Trainer(..., optimizers=(BlockAdamW(...), None))` needs
beyond the optimizer itself.

The Trainer already works with BlockAdamW unchanged: it builds its LR scheduler on our
param_groups, calls step() once per accumulation window, clips with
`clip_grad_norm_(model.parameters())` (inactive parameters have no gradient and are skipped),
and saves/loads `optimizer.state_dict()`, which carries the block schedule, so
`resume_from_checkpoint` continues the very same block sequence. Its
`gradient_checkpointing=True` is covered by the optimizer's backward cut
(badam_kernels.checkpointing).

What the Trainer cannot see is a mismatch between its arguments and the optimizer's options;
`BlockAdamWCallback` checks them when training begins:

- update_in_backward=True updates parameters during backward, so the Trainer's clipping
  (`max_grad_norm`, 1.0 by default) would act on gradients already applied and freed: it must be 0;
  its `gradient_accumulation_steps` must equal the optimizer's; fp16 (a GradScaler) is refused.
- A multi-process Trainer wraps the model in DDP, which cannot follow block switches: refused.
- Clipping in both places (TrainingArguments.max_grad_norm and BlockAdamW(max_grad_norm=...))
  clips twice: refused, keep the Trainer's.

Example:
    >>> optimizer = BlockAdamW(model, lr=1e-4, switch_every=50)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data,
    ...                   optimizers=(optimizer, None), callbacks=[BlockAdamWCallback()])
    >>> trainer.train()  # later: trainer.train(resume_from_checkpoint=True)
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from badam_kernels.optim import BlockAdamW


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's AcceleratedOptimizer (or any `.optimizer` wrapper)."""
    while not isinstance(optimizer, BlockAdamW) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def check_training_arguments(args: TrainingArguments, optimizer: Any) -> None:
    """Raise ValueError where `args` and a BlockAdamW `optimizer` would not train as configured."""
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, BlockAdamW):
        raise TypeError(f"expected a BlockAdamW optimizer, got {type(optimizer).__name__}")
    if args.world_size > 1:
        raise ValueError(
            f"the Trainer runs {args.world_size} processes and wraps the model in DistributedDataParallel, "
            "which only syncs the parameters trainable when it wraps, so after the first block switch "
            "the ranks would silently drift apart. For multi-GPU BAdam use a training loop with "
            "BlockAdamW(model, ..., process_group=...) or FSDP2 (README, 'Multi-GPU')"
        )
    if optimizer._update_in_backward:
        if args.max_grad_norm:
            raise ValueError(
                f"TrainingArguments.max_grad_norm={args.max_grad_norm} with "
                "BlockAdamW(update_in_backward=True): the parameters are updated during backward, before "
                "the Trainer clips; set max_grad_norm=0"
            )
        if args.gradient_accumulation_steps != optimizer._accumulation_steps:
            raise ValueError(
                f"TrainingArguments.gradient_accumulation_steps={args.gradient_accumulation_steps} but "
                f"BlockAdamW(gradient_accumulation_steps={optimizer._accumulation_steps}): with "
                "update_in_backward=True they must be equal"
            )
        if args.fp16:
            raise ValueError(
                "fp16=True trains with a GradScaler, which update_in_backward=True cannot honour; use bf16"
            )
    elif args.max_grad_norm and optimizer._max_grad_norm is not None:
        raise ValueError(
            f"both TrainingArguments.max_grad_norm={args.max_grad_norm} and "
            f"BlockAdamW(max_grad_norm={optimizer._max_grad_norm}) clip: keep one (the Trainer's also logs "
            "grad_norm)"
        )


class BlockAdamWCallback(TrainerCallback):
    """Checks the Trainer's arguments against its BlockAdamW when training begins (see
    `check_training_arguments`), so a misconfiguration fails at once instead of training wrongly."""

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        check_training_arguments(args, optimizer)

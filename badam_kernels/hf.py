"""Hugging Face integration: what `Trainer(..., optimizers=(BlockAdamW(...), None))` needs beyond
the optimizer itself, and `enable_chunked_loss`, which makes a causal LM compute its loss without
ever holding the (tokens x vocabulary) logits.

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

Long sequences: `enable_chunked_loss(model)` (see its docstring and badam_kernels.chunked_loss).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import ModelOutput

from badam_kernels.chunked_loss import check_chunk_size, linear_cross_entropy
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


# Causal LMs whose forward is exactly: base model -> last hidden state -> lm_head (an nn.Linear
# without bias) -> transformers' ForCausalLMLoss, with nothing done to the logits in between
# (Gemma 2's soft-capping or Cohere's logit scale would be skipped, so those are refused).
CHUNKED_LOSS_MODELS = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GPT2LMHeadModel",
)
DEFAULT_CHUNK_SIZE = 1024


def enable_chunked_loss(model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE) -> nn.Module:
    """Make `model(..., labels=labels)` compute its loss `chunk_size` tokens at a time, without
    the (tokens x vocabulary) logits; returns `model`.

    The loss is transformers' own (labels shifted inside the model, -100 ignored, `shift_labels`,
    `ignore_index` and `num_items_in_batch` honoured, mean over the counted tokens, fp32), and so
    is every gradient, up to rounding (badam_kernels.chunked_loss). Supported: Llama, Mistral,
    Qwen2, Qwen3 and GPT-2 causal LMs, also inside a peft model; anything else is refused with a
    TypeError. Works with the Trainer, gradient checkpointing, BlockAdamW's backward cut and
    update_in_backward, on CPU and CUDA (plain torch), in bf16, fp16, fp32 and under autocast.

    What changes for the caller:
    - With labels, the output's `logits` is None (tuple outputs: the loss, then what follows the
      logits): they are never built, that is the point. Without labels the model returns its logits as
      before (generation, or evaluation metrics that need them); `disable_chunked_loss(model)`
      restores the plain head altogether.
    - The chunked path runs whenever labels are given, in training and in evaluation alike.
    - Calling it again only changes `chunk_size`.
    - Backward through one forward runs once (its gradients are computed in forward): the
      `retain_graph=True` pattern of backpropagating a loss twice raises an error.

    Memory: the plain bf16 head + loss at T tokens and vocabulary V peaks at 12 x T x V bytes
    (the fp32 log-softmax and the fp32 gradients into and out of it; 2 more while the output's
    bf16 logits are held); chunked, at 6 x chunk_size x V bytes (0.8 GB at the default 1024 tokens
    and Llama-3's 128,256-token vocabulary) plus one gradient of the hidden states. Smaller chunks
    need less; larger ones run fewer, bigger matmuls.

    Args:
        model: a supported transformers causal LM, or a peft model wrapping one.
        chunk_size: tokens per chunk (> 0).

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)
        >>> enable_chunked_loss(model, chunk_size=1024)
        >>> model(input_ids=ids, labels=ids).loss.backward()
    """
    check_chunk_size(chunk_size)
    given, model = model, _unwrap_peft(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, ChunkedLossHead):
        head.chunk_size = chunk_size
        return given
    if type(head) is not nn.Linear or head.bias is not None:
        raise TypeError(
            f"{type(model).__name__} has no lm_head that is a plain nn.Linear without bias "
            f"(get_output_embeddings() gave {type(head).__name__}); enable_chunked_loss supports "
            f"{', '.join(CHUNKED_LOSS_MODELS)}"
        )
    _check_forward(model)
    labels_index = list(inspect.signature(type(model).forward).parameters).index("labels") - 1  # minus self
    head.__class__ = ChunkedLossHead
    head.chunk_size = chunk_size
    head.pending = None
    head.loss = None
    head.hooks = (
        model.register_forward_pre_hook(
            functools.partial(_take_labels, head, labels_index), with_kwargs=True
        ),
        model.register_forward_hook(functools.partial(_put_loss, head), with_kwargs=True, always_call=True),
    )
    return given


def disable_chunked_loss(model: nn.Module) -> nn.Module:
    """Undo `enable_chunked_loss`: the plain head and transformers' loss again (no-op if not
    enabled); returns `model`."""
    given, model = model, _unwrap_peft(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, ChunkedLossHead):
        for handle in head.hooks:
            handle.remove()
        head.__class__ = nn.Linear
        for name in ("chunk_size", "pending", "loss", "hooks"):
            delattr(head, name)
    return given


class _LossRequest(NamedTuple):
    """What transformers' ForCausalLMLoss would have received besides the logits."""

    labels: torch.Tensor
    shift_labels: torch.Tensor | None
    ignore_index: int
    num_items_in_batch: int | torch.Tensor | None


class ChunkedLossHead(nn.Linear):
    """The lm_head under `enable_chunked_loss` (the same module, parameters and hooks; only its
    class changes): when the model's forward received labels, it computes the loss from the
    hidden states, keeps it for the model's forward hook and returns empty logits."""

    chunk_size: int
    pending: _LossRequest | None
    loss: torch.Tensor | None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        request, self.pending = self.pending, None
        if request is None:
            return super().forward(hidden)
        self.loss = _causal_lm_loss(hidden, self.weight, request, self.chunk_size)
        return hidden.new_empty(*hidden.shape[:-1], 0)


def _causal_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, request: _LossRequest, chunk_size: int
) -> torch.Tensor:
    """transformers' ForCausalLMLoss(logits=hidden @ weight.T, ...), without the logits."""
    targets = request.shift_labels
    if targets is None:  # tokens < n predict n; the last position predicts nothing
        targets = nn.functional.pad(request.labels, (0, 1), value=request.ignore_index)[..., 1:]
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(targets.shape)} for hidden states of shape {tuple(hidden.shape[:-1])}: "
            "give one label per input token (and no logits_to_keep with labels)"
        )
    return linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1).to(hidden.device),
        chunk_size=chunk_size,
        ignore_index=request.ignore_index,
        num_items_in_batch=request.num_items_in_batch,
    )


def _take_labels(
    head: ChunkedLossHead, labels_index: int, model: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook of the model: hand the labels to the head, run the model without them."""
    if len(args) > labels_index:  # labels given by position: from there on, pass everything by name
        names = list(inspect.signature(type(model).forward).parameters)[1:]  # without self
        kwargs = {**kwargs, **dict(zip(names[labels_index:], args[labels_index:]))}
        args = args[:labels_index]
    labels = kwargs.get("labels")
    if labels is None:
        return None
    head.pending = _LossRequest(
        labels=labels,
        shift_labels=kwargs.get("shift_labels"),
        ignore_index=kwargs.get("ignore_index", -100),
        num_items_in_batch=kwargs.get("num_items_in_batch"),
    )
    return args, {**kwargs, "labels": None}


def _put_loss(
    head: ChunkedLossHead, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
) -> Any:
    """Forward hook of the model (also run when forward raised): put the head's loss in the output
    in place of the logits."""
    unused, head.pending = head.pending, None
    loss, head.loss = head.loss, None
    if output is None or (loss is None and unused is None):
        return None  # forward raised, or no labels were given
    if loss is None:
        raise RuntimeError(f"{type(model).__name__}.forward received labels but never called its lm_head")
    if isinstance(output, ModelOutput):
        return type(output)(**{**output, "loss": loss, "logits": None})
    return (loss, *output[1:])


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (whose forward calls it as a module)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _check_forward(model: nn.Module) -> None:
    """Raise TypeError unless `model` runs the unmodified forward of a supported transformers class."""
    import transformers

    supported = [getattr(transformers, name) for name in CHUNKED_LOSS_MODELS]
    base = next((cls for cls in supported if isinstance(model, cls)), None)
    if base is None:
        raise TypeError(
            f"enable_chunked_loss supports {', '.join(CHUNKED_LOSS_MODELS)}, not {type(model).__name__}: "
            "other models may transform the logits before the loss (soft-capping, scaling), which a "
            "chunked loss would silently skip"
        )
    forward = inspect.unwrap(getattr(model.forward, "__func__", model.forward))
    if forward is not inspect.unwrap(base.forward) or not forward.__module__.startswith("transformers."):
        raise TypeError(
            f"{type(model).__name__}.forward is {forward.__module__}.{forward.__qualname__}, "
            "not transformers' own. If it is Liger-Kernel's fused linear cross-entropy, it already "
            "avoids the logits: keep it and skip enable_chunked_loss, or undo the patch first"
        )

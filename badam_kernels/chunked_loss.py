"""Exact cross-entropy of a linear LM head, computed a chunk of tokens at a time, so the
(tokens x vocabulary) logits never exist at once.

The plain bf16 head + loss peaks at 12 bytes per logit (the fp32 log-softmax, the fp32 gradient
arriving at it and the one leaving it): with Llama-3's 128,256-token vocabulary, 6.3 GB at 4096
tokens, far more than the rest of a BAdam step. Here the head's matmul and the loss run over
`chunk_size` tokens at a time; the gradients with respect to the hidden states (and the head's
weight, when it trains) are computed in the same pass, from the chunk's logits while they exist,
and kept until backward, which only scales them by the incoming gradient. So the transient memory
is one chunk's logits (6 bytes x chunk_size x vocabulary: an fp32 buffer updated in place and the
bf16 gradient cast from it), the work is the plain head's three matmuls (no recompute), and the
result is the plain computation's up to rounding: the same bf16/fp16 logits upcast to fp32 as
transformers' `ForCausalLMLoss`, the same softmax in fp32, the same gradient cast to the model's
dtype before the two matmuls of backward. Tokens whose target is `ignore_index` are skipped
altogether (their loss and gradient are exactly zero), which also saves their matmuls.

Rounding: the plain path multiplies the fp32 logit gradient by `grad_output / count` before
casting it to bf16. Here `1 / count` is applied there too, and `grad_output` afterwards, to the
bf16 results: an exact multiplication when it is 1 or a power of two (`loss.backward()`, the
Trainer's `1 / gradient_accumulation_steps` for powers of two). fp16 cannot hold the gradient of
a 1e-5 probability divided by thousands of tokens (it underflows; the plain path relies on the
GradScaler's factor for that), so in fp16 `1 / count` is applied after the matmuls with
`grad_output`. The head's weight gradient is summed over chunks in the weight's dtype, as Liger's
kernel does: one rounding per chunk instead of one in all, so use large chunks when the head trains
in bf16 (or train it in fp32).

This is the idea of Liger-Kernel's fused linear cross-entropy and of cut-cross-entropy, written in
plain torch so it runs on every device and dtype.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index)` without
    the logits: at most `chunk_size` tokens' logits exist at a time.

    Args:
        hidden: (tokens, hidden_size) float tensor, the head's input.
        weight: (vocabulary, hidden_size) head weight, same dtype as `hidden` unless autocast runs.
        targets: (tokens,) integer tensor, class indices in [0, vocabulary) or `ignore_index`.
        chunk_size: tokens per chunk (> 0).
        ignore_index: targets to leave out of the loss and of the token count.
        num_items_in_batch: divide the summed loss by this instead of the number of counted
            targets (transformers' gradient accumulation across micro-batches).

    Returns:
        0-dim fp32 loss, differentiable with respect to `hidden` and `weight`.
    """
    check_chunk_size(chunk_size)
    _check_shapes(hidden, weight, targets)
    valid = targets != ignore_index
    out_of_range = valid & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(out_of_range.any()):
        bad = targets[out_of_range][0].item()
        raise ValueError(
            f"target {bad} is outside the vocabulary [0, {weight.shape[0]}) "
            f"and is not ignore_index={ignore_index}"
        )
    rows = valid.nonzero().squeeze(1)
    if num_items_in_batch is None:
        denominator = torch.tensor(float(rows.numel()), device=hidden.device)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, rows, denominator, chunk_size)
    loss_sum, _, _ = _chunked_pass(hidden, weight, targets, rows, chunk_size, None, False, False)
    return loss_sum / denominator


def check_chunk_size(chunk_size: object) -> None:
    """Raise ValueError unless `chunk_size` is a positive int."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}")


def _check_shapes(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (tokens, hidden_size) and weight (vocabulary, hidden_size), got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.is_floating_point() or targets.is_complex():
        raise ValueError(
            f"expected integer targets of shape ({hidden.shape[0]},), "
            f"got {targets.dtype} {tuple(targets.shape)}"
        )
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden, weight and targets must be on one device, got {hidden.device}, {weight.device}, "
            f"{targets.device}"
        )


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute the logits in: autocast's, or the tensors' own."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden is {hidden.dtype} but the head weight is {weight.dtype} (and autocast is off)"
        )
    return weight.dtype


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    chunk_size: int,
    logit_grad_scale: torch.Tensor | None,
    want_hidden_grad: bool,
    want_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed loss over `rows`, and, when asked, the gradients of the sum times `logit_grad_scale`
    with respect to hidden (rows not in `rows` are zero) and weight."""
    dtype = _compute_dtype(hidden, weight)
    w = weight.to(dtype)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if want_hidden_grad else None
    grad_weight = torch.zeros_like(w) if want_weight_grad else None
    # Casts are explicit above and below; autocast must not re-cast the fp32 parts.
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, rows.numel(), chunk_size):
            index = rows[start : start + chunk_size]
            h = hidden.index_select(0, index).to(dtype)
            t = targets.index_select(0, index).unsqueeze(1)
            # One fp32 (chunk x vocabulary) buffer, updated in place: the logits, then
            # exp(logits - row max) (logsumexp would make a second such tensor), then their gradient.
            buffer = torch.mm(h, w.t()).float()  # as transformers: the head's dtype, then fp32
            target_logits = buffer.gather(1, t)
            row_max = buffer.amax(dim=1, keepdim=True)
            row_sum = buffer.sub_(row_max).exp_().sum(dim=1, keepdim=True)
            loss_sum += (row_max + row_sum.log() - target_logits).sum()
            if not (want_hidden_grad or want_weight_grad):
                del buffer  # before the next chunk's
                continue
            # d(loss_sum) / d(logits) = softmax - onehot(target), times logit_grad_scale
            buffer.mul_(logit_grad_scale / row_sum)
            buffer.scatter_add_(1, t, (-logit_grad_scale).expand_as(row_sum))
            grad_logits = buffer.to(dtype)
            del buffer
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, index, torch.mm(grad_logits, w).to(hidden.dtype))
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
            del grad_logits  # before the next chunk's logits
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss_sum, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss in forward with its gradients; backward scales them by `grad_output`."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, denominator, chunk_size):
        # fp16 would underflow (see the module docstring): divide by the count in backward there.
        late_division = _compute_dtype(hidden, weight) == torch.float16
        one = torch.ones((), device=hidden.device)
        logit_grad_scale = one if late_division else 1.0 / denominator
        loss_sum, grad_hidden, grad_weight = _chunked_pass(
            hidden,
            weight,
            targets,
            rows,
            chunk_size,
            logit_grad_scale,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(grad_hidden, grad_weight, 1.0 / denominator if late_division else one)
        ctx.used = False
        return loss_sum / denominator

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError(
                "backward ran twice through the chunked loss (retain_graph=True); its gradients were "
                "computed once, in forward: run the forward again for another backward"
            )
        ctx.used = True
        grad_hidden, grad_weight, late_scale = ctx.saved_tensors
        scale = grad_output.float() * late_scale
        # In place: these gradients live only for this backward (their memory is the point).
        if grad_hidden is not None:
            grad_hidden.mul_(scale)
        if grad_weight is not None:
            grad_weight.mul_(scale)
        return grad_hidden, grad_weight, None, None, None, None

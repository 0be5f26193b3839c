"""linear_cross_entropy (badam_kernels.chunked_loss): the loss and gradients of the plain head +
cross-entropy, without ever holding the (tokens x vocabulary) logits.

Reference: the plain computation in fp64 (`cross_entropy(hidden @ weight.T)` of the same
low-precision inputs). Criterion, as flash-attention judges its kernels: our error against it is at
most twice the error of the plain computation in the low dtype (what transformers runs), plus a
floor far below any defect. Measured on this machine's AVX-512 CPU with (N, H, V) = (45, 32, 301)
and 6 chunks: our error / the plain error is 1.00 for the loss, 0.99-1.15 for the hidden-state
gradient and 0.86-1.31 for the weight gradient (one rounding per chunk in bf16/fp16), so at most
0.59 of the allowed error in fp32, bf16 and fp16. Defects injected on purpose exceed the allowed
error 4x to 10^6x: a denominator off by one token, the last partial chunk skipped, the -1 of the
target left out of the gradient, the weight gradient of the last chunk only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from badam_kernels.chunked_loss import linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKENS, HIDDEN, VOCAB, CHUNK = 45, 32, 301, 8  # 45 valid-or-not tokens: chunks of 8 and a partial one
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
# (dtype, floor of the error criterion): far below the error of any defect tried (>= 1e-2)
DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 1e-4), (torch.float16, 1e-4)]


def _data(dtype, device="cpu", seed=0, ignored=True, tokens=TOKENS, hidden_size=HIDDEN):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=generator) * 2
    weight = torch.randn(VOCAB, hidden_size, generator=generator) * 0.2
    targets = torch.randint(0, VOCAB, (tokens,), generator=generator)
    if ignored:
        targets[::5] = -100
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def _plain(hidden, weight, targets, upcast=True, **kwargs):
    """transformers' head + ForCausalLMLoss on already shifted targets: logits in the inputs' dtype,
    upcast to fp32 for the loss (with upcast=False: all in the inputs' dtype, for fp64)."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float() if upcast else logits, targets, **kwargs)


def _loss_and_grads(loss_fn, hidden, weight, targets, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = loss_fn(hidden, weight, targets, **kwargs)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _chunked(hidden, weight, targets, **kwargs):
    return linear_cross_entropy(hidden, weight, targets, chunk_size=CHUNK, **kwargs)


def _relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_loss_and_gradients_equal_the_plain_head(device, dtype, floor):
    hidden, weight, targets = _data(dtype, device)
    reference = _loss_and_grads(_plain, hidden.double(), weight.double(), targets, upcast=False)
    plain = _loss_and_grads(_plain, hidden, weight, targets)
    chunked = _loss_and_grads(_chunked, hidden, weight, targets)
    assert chunked[0].dtype == torch.float32
    for name, ours, theirs, exact in zip(("loss", "hidden grad", "weight grad"), chunked, plain, reference):
        assert ours.dtype == theirs.dtype, name
        assert _relative_error(ours, exact) <= 2 * _relative_error(theirs, exact) + floor, name
    assert torch.all(chunked[1][targets == -100] == 0)  # ignored tokens get no gradient at all


def test_grad_output_scales_the_gradients():
    """backward(gradient=g) and a loss scaled afterwards (gradient accumulation, GradScaler)."""
    hidden, weight, targets = _data(torch.float32)
    plain = _loss_and_grads(lambda *a: 0.375 * _plain(*a), hidden, weight, targets)
    chunked = _loss_and_grads(lambda *a: 0.375 * _chunked(*a), hidden, weight, targets)
    for ours, theirs in zip(chunked, plain):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_items", [29, torch.tensor(29)])
def test_num_items_in_batch_divides_the_sum(num_items):
    """transformers' gradient accumulation: the summed loss over the tokens of all micro-batches."""
    hidden, weight, targets = _data(torch.float32)
    plain = _loss_and_grads(lambda *a: _plain(*a, reduction="sum") / 29, hidden, weight, targets)
    chunked = _loss_and_grads(_chunked, hidden, weight, targets, num_items_in_batch=num_items)
    for ours, theirs in zip(chunked, plain):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_ignore_index_and_one_chunk_per_token():
    hidden, weight, targets = _data(torch.float32, ignored=False)
    targets[3:9] = 7  # a real class, ignored on request
    plain = _loss_and_grads(_plain, hidden, weight, targets, ignore_index=7)
    chunked = _loss_and_grads(
        lambda *a, **k: linear_cross_entropy(*a, chunk_size=1, **k), hidden, weight, targets, ignore_index=7
    )
    for ours, theirs in zip(chunked, plain):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_every_token_ignored():
    """Like torch's mean over nothing: NaN; with num_items_in_batch the sum is 0 (another
    micro-batch holds the tokens) and so is every gradient."""
    hidden, weight, targets = _data(torch.float32)
    targets.fill_(-100)
    assert torch.isnan(_chunked(hidden, weight, targets)) and torch.isnan(_plain(hidden, weight, targets))
    loss, hidden_grad, weight_grad = _loss_and_grads(_chunked, hidden, weight, targets, num_items_in_batch=10)
    assert loss == 0 and not hidden_grad.any() and not weight_grad.any()


def test_gradient_for_one_input_only():
    hidden, weight, targets = _data(torch.float32)
    _, plain_hidden_grad, plain_weight_grad = _loss_and_grads(_plain, hidden, weight, targets)
    frozen_head = hidden.clone().requires_grad_()
    _chunked(frozen_head, weight, targets).backward()
    torch.testing.assert_close(frozen_head.grad, plain_hidden_grad, rtol=1e-5, atol=1e-7)
    trained_head = weight.clone().requires_grad_()
    _chunked(hidden, trained_head, targets).backward()
    torch.testing.assert_close(trained_head.grad, plain_weight_grad, rtol=1e-5, atol=1e-7)


def test_without_grad_only_the_loss():
    hidden, weight, targets = _data(torch.bfloat16)
    with torch.no_grad():
        loss = _chunked(hidden.requires_grad_(), weight, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _plain(hidden, weight, targets), rtol=1e-5, atol=0)


def test_autocast_computes_like_the_autocast_head():
    """fp32 hidden and weight under bf16 autocast: bf16 logits and matmuls, fp32 gradients."""
    hidden, weight, targets = _data(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = _loss_and_grads(_plain, hidden.double(), weight.double(), targets, upcast=False)
        plain = _loss_and_grads(_plain, hidden, weight, targets)
        chunked = _loss_and_grads(_chunked, hidden, weight, targets)
    for ours, theirs, exact in zip(chunked, plain, reference):
        assert ours.dtype == theirs.dtype == torch.float32
        assert _relative_error(ours, exact) <= 2 * _relative_error(theirs, exact) + 1e-4
    assert _relative_error(plain[1], reference[1]) > 1e-4  # autocast did compute in bf16


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op produced while active (forward and backward run in
    this thread on CPU, so both are seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def test_never_more_than_one_chunk_of_logits():
    # A narrow head, so that a chunk of logits is larger than the weight and the hidden states.
    hidden, weight, targets = _data(torch.bfloat16, tokens=200, hidden_size=4)
    with LargestTensor() as plain:
        _loss_and_grads(_plain, hidden, weight, targets)
    with LargestTensor() as chunked:
        _loss_and_grads(_chunked, hidden, weight, targets)
    assert plain.numel == 200 * VOCAB
    assert chunked.numel == CHUNK * VOCAB


def _peak_live_bytes(fn) -> int:
    """Most bytes of tensors alive at once while fn() runs, above those alive before: the running
    sum of the profiler's allocation and free events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


def test_peak_memory_is_one_chunk_not_all_tokens():
    """The plain bf16 head + loss peaks at 12 bytes per logit (the fp32 log-softmax, the
    gradient flowing into it and the one leaving it). Chunked: 6 bytes per logit of one chunk
    (its fp32 buffer and the bf16 gradient cast from it), the bf16 hidden-state gradient, 16 bytes
    per token of indices and masks, and room for a matmul's copy of the weight. Measured here:
    216,216 bytes against the bound's 231,008; keeping the previous chunk's gradient alive while
    the next chunk's logits are made (a defect this test was checked against) gives 276,416."""
    tokens, hidden_size, chunk = 2000, 4, 100
    hidden, weight, targets = _data(torch.bfloat16, tokens=tokens, hidden_size=hidden_size)
    hidden.requires_grad_()
    plain = _peak_live_bytes(lambda: _plain(hidden, weight, targets).backward())
    chunked = _peak_live_bytes(
        lambda: linear_cross_entropy(hidden, weight, targets, chunk_size=chunk).backward()
    )
    assert plain >= 12 * tokens * VOCAB
    assert chunked <= 6 * chunk * VOCAB + 2 * tokens * hidden_size + 16 * tokens + 2 * VOCAB * hidden_size


@pytest.mark.parametrize("chunk_size", [0, -4, 2.0, True, None])
def test_chunk_size_must_be_a_positive_int(chunk_size):
    hidden, weight, targets = _data(torch.float32)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)


@pytest.mark.parametrize("bad_target", [VOCAB, -1])
def test_targets_outside_the_vocabulary_are_refused(bad_target):
    hidden, weight, targets = _data(torch.float32)
    targets[11] = bad_target
    with pytest.raises(ValueError, match=f"target {bad_target} is outside the vocabulary"):
        _chunked(hidden, weight, targets)


def test_mismatched_shapes_and_dtypes_are_refused():
    hidden, weight, targets = _data(torch.float32)
    with pytest.raises(ValueError, match="expected hidden"):
        _chunked(hidden[:, :-1], weight, targets)
    with pytest.raises(ValueError, match="integer targets"):
        _chunked(hidden, weight, targets[:-1])
    with pytest.raises(TypeError, match="autocast is off"):
        _chunked(hidden.bfloat16(), weight, targets)


def test_a_second_backward_through_the_same_loss_is_refused():
    hidden, weight, targets = _data(torch.float32)
    loss = _chunked(hidden.requires_grad_(), weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()

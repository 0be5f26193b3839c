"""update_in_backward=True: the same iterates as the normal mode, with each gradient freed as soon
as its parameter is updated, so fewer gradient bytes are alive at the peak; clear errors for what
the mode cannot honour.

Iterates are compared bit for bit: both modes run the very same forward and backward ops in the
same order on the same machine, and the fused update is elementwise (which tensors share a call
changes no bit), so both sides round alike on any CPU and a tolerance would only hide a defect."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_models import make_net, net_loss, train

from badam_kernels.optim import BlockAdamW

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIG = dict(lr=1e-2, weight_decay=0.1, switch_every=3, switch_mode="random", verbose=0)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same_weights(a, b):
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_normal_mode_bit_for_bit(dtype):
    normal, in_backward = make_net(dtype=dtype), make_net(dtype=dtype)
    start = _weights(normal)
    opt_normal = BlockAdamW(normal, always_active=["lm_head."], **CONFIG)
    opt_backward = BlockAdamW(in_backward, always_active=["lm_head."], update_in_backward=True, **CONFIG)
    losses_normal = train(normal, opt_normal, steps=14)  # switches at 3, 6, 9, 12
    losses_backward = train(in_backward, opt_backward, steps=14)
    assert losses_normal == losses_backward
    _assert_same_weights(normal, in_backward)
    assert any(not torch.equal(a, b) for a, b in zip(start, in_backward.parameters()))
    assert all(p.grad is None for p in in_backward.parameters())


def test_accumulation_updates_on_the_last_micro_batch():
    steps, micro = 7, 3
    normal, in_backward = make_net(), make_net()
    opt_normal = BlockAdamW(normal, **CONFIG)
    opt_backward = BlockAdamW(
        in_backward, update_in_backward=True, gradient_accumulation_steps=micro, **CONFIG
    )
    for step in range(steps):
        for i in range(micro):
            net_loss(normal, micro * step + i, scale=1 / micro).backward()
            before = _weights(in_backward)
            net_loss(in_backward, micro * step + i, scale=1 / micro).backward()
            changed = any(not torch.equal(a, b) for a, b in zip(before, in_backward.parameters()))
            # Untouched until the window's last backward; the first window is applied by step(),
            # once it has shown that no GradScaler is at work.
            assert changed == (i == micro - 1 and step > 0)
        opt_normal.step()
        opt_backward.step()
    _assert_same_weights(normal, in_backward)


def test_a_short_accumulation_window_is_updated_by_step():
    """Fewer backward passes than gradient_accumulation_steps (the end of an epoch in the HF
    Trainer): step() applies the pending gradients, as the normal mode would."""
    normal, in_backward = make_net(), make_net()
    opt_normal = BlockAdamW(normal, **CONFIG)
    opt_backward = BlockAdamW(in_backward, update_in_backward=True, gradient_accumulation_steps=4, **CONFIG)
    for model, opt in ((normal, opt_normal), (in_backward, opt_backward)):
        for step in range(2):
            net_loss(model, step).backward()
        opt.step()
    _assert_same_weights(normal, in_backward)


def _peak_gradient_bytes(model, opt, steps: int) -> list[int]:
    """For each of `steps` steps, the largest total of `.grad` bytes alive at any gradient
    accumulation.

    The probe hooks are registered before the optimizer's, so each sees the just-accumulated
    gradient before an update-in-backward hook frees it."""
    peaks = []

    def probe(_):
        alive = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        peaks[-1] = max(peaks[-1], alive)

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(probe)
    optimizer = opt(model)
    for step in range(steps):
        peaks.append(0)
        train(model, optimizer, steps=1, start=step)
    return peaks


def test_holds_one_gradient_tensor_at_a_time():
    """After the first step: that one keeps the block's gradients for step(), which must see
    whether a GradScaler is at work before any weight changes (test_refuses_grad_scaler...)."""
    model = make_net(num_layers=2, width=48)
    config = {**CONFIG, "switch_mode": "fixed", "start_block": 1}
    block = [p for name, p in model.named_parameters() if name.startswith("layers.1.")]
    block_bytes = sum(p.numel() * p.element_size() for p in block)
    largest_bytes = max(p.numel() * p.element_size() for p in block)

    normal_peaks = _peak_gradient_bytes(
        make_net(num_layers=2, width=48), lambda m: BlockAdamW(m, **config), steps=3
    )
    backward_peaks = _peak_gradient_bytes(
        make_net(num_layers=2, width=48), lambda m: BlockAdamW(m, update_in_backward=True, **config), steps=3
    )
    assert normal_peaks == [block_bytes] * 3
    assert backward_peaks == [block_bytes, largest_bytes, largest_bytes]
    assert largest_bytes < block_bytes


def test_resume_is_exact():
    reference, resumed = make_net(), make_net()
    train(reference, BlockAdamW(reference, update_in_backward=True, **CONFIG), steps=8)
    first = BlockAdamW(resumed, update_in_backward=True, **CONFIG)
    train(resumed, first, steps=4)  # mid-block: Adam state and schedule position both matter
    checkpoint = copy.deepcopy(first.state_dict())
    del first  # its hooks must not fire any more
    second = BlockAdamW(resumed, update_in_backward=True, **CONFIG)
    second.load_state_dict(checkpoint)
    train(resumed, second, steps=4, start=4)
    _assert_same_weights(reference, resumed)


def test_hooks_leave_with_the_block():
    model = make_net()
    opt = BlockAdamW(
        model,
        update_in_backward=True,
        truncate_backward=False,  # let backward reach the old block below the active one
        **{**CONFIG, "switch_mode": "ascending", "switch_every": 1},
    )
    old_block = [p for name, p in model.named_parameters() if name.startswith("layers.0.")]
    train(model, opt, steps=1)  # switches to block 1
    for p in old_block:
        p.requires_grad_(True)  # an inactive parameter that receives a gradient anyway
    before = [p.detach().clone() for p in old_block]
    net_loss(model, 1).backward()
    assert all(p.grad is not None for p in old_block)  # not consumed by a stale update hook
    assert all(torch.equal(a, p) for a, p in zip(before, old_block))


def test_discarded_optimizer_stops_updating():
    model = make_net()
    BlockAdamW(model, update_in_backward=True, **CONFIG)  # dropped at once
    before = _weights(model)
    net_loss(model, 0).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_refuses_global_norm_clipping():
    with pytest.raises(ValueError, match="max_grad_norm"):
        BlockAdamW(make_net(), update_in_backward=True, max_grad_norm=1.0, **CONFIG)


def test_accumulation_steps_need_the_mode():
    with pytest.raises(ValueError, match="only used with update_in_backward"):
        BlockAdamW(make_net(), gradient_accumulation_steps=2, **CONFIG)
    with pytest.raises(ValueError, match="int >= 1"):
        BlockAdamW(make_net(), update_in_backward=True, gradient_accumulation_steps=0, **CONFIG)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_refuses_grad_scaler_before_changing_any_weight(micro_batches):
    """A GradScaler shows itself only in scaler.step(optimizer), after backward: the first step's
    gradients wait for step(), which refuses the scaler with every weight and state untouched."""
    model = make_net(dtype=torch.float16)
    opt = BlockAdamW(model, update_in_backward=True, gradient_accumulation_steps=micro_batches, **CONFIG)
    before = _weights(model)
    scaler = torch.amp.GradScaler("cpu")
    for micro in range(micro_batches):
        scaler.scale(net_loss(model, micro)).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(RuntimeError, match="GradScaler.*No parameter was changed"):
        scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0


def test_grad_scaler_arriving_later_is_refused_too():
    model = make_net(dtype=torch.float16)
    opt = BlockAdamW(model, update_in_backward=True, **CONFIG)
    train(model, opt, steps=1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(net_loss(model, 1)).backward()
    with pytest.raises(RuntimeError, match="GradScaler.*already updated"):
        scaler.step(opt)


def test_too_many_backward_passes():
    model = make_net()
    opt = BlockAdamW(model, update_in_backward=True, gradient_accumulation_steps=2, **CONFIG)
    net_loss(model, 0).backward()
    net_loss(model, 1).backward()
    with pytest.raises(RuntimeError, match="more backward passes"):
        net_loss(model, 2).backward()
    del opt


def test_step_without_backward():
    opt = BlockAdamW(make_net(), update_in_backward=True, **CONFIG)
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step()

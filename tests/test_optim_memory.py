"""Memory: 8 bytes of Adam state per active parameter plus the master (4 "fp32", 2 "remainder",
0 "none"); nothing held for inactive blocks; no growth over many switches."""

from __future__ import annotations

import weakref

import pytest
import torch
from optim_models import make_net, net_loss

from badam_kernels.optim import BlockAdamW


def _state_tensors(opt):
    return [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


@pytest.mark.parametrize("master_weights, master_bytes", [("remainder", 2), ("fp32", 4), ("none", 0)])
def test_bytes_per_active_parameter(master_weights, master_bytes):
    model = make_net(num_layers=3, width=32)
    opt = BlockAdamW(
        model, lr=1e-3, switch_every=3, switch_mode="ascending", master_weights=master_weights, verbose=0
    )
    net_loss(model, 0).backward()
    opt.step()  # mid-block: the state of block 0 exists now
    active = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in active)
    assert set(opt.state) == set(active)  # nothing for the inactive blocks
    summary = opt.memory_summary()
    assert summary == {
        "state_bytes": 8 * numel,
        "master_bytes": master_bytes * numel,
        "grad_bytes": 0,
        "active_numel": numel,
    }
    held = sum(t.numel() * t.element_size() for t in _state_tensors(opt))
    assert held == (8 + master_bytes) * numel


def test_switch_frees_the_old_block():
    model = make_net()
    opt = BlockAdamW(model, lr=1e-3, switch_every=2, switch_mode="ascending", verbose=0)
    net_loss(model, 0).backward()
    opt.step()
    old = [weakref.ref(t) for t in _state_tensors(opt)]
    assert old and all(ref() is not None for ref in old)
    net_loss(model, 1).backward()
    opt.step()  # switches to block 1
    assert not opt.state and all(ref() is None for ref in old)
    assert all(p.grad is None for p in model.parameters())


def test_long_run_does_not_grow():
    model = make_net(num_layers=4)
    opt = BlockAdamW(model, lr=1e-3, switch_every=2, switch_mode="random", verbose=0)
    largest_block = max(sum(p.numel() for p in block) for block in opt._blocks)
    created = []
    for step in range(80):  # 40 switches, 10 random passes
        net_loss(model, step).backward()
        opt.step()
        created.extend(weakref.ref(t) for t in _state_tensors(opt))
        summary = opt.memory_summary()
        assert summary["state_bytes"] + summary["master_bytes"] <= 10 * largest_block
        assert summary["grad_bytes"] == 0
    alive = len({id(ref()) for ref in created if ref() is not None})
    assert alive == len(_state_tensors(opt))  # everything else was released

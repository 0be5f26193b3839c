"""Against the real `badam` package on a tiny bf16 Llama: swapping the import reproduces badam's
training (same blocks, same switch steps, same grouping), and master weights matter.

lr=1e-5 is far below half a bf16 ulp of the weights (~1e-4), so an update without a master
(master_weights="none") mostly rounds back to the old weight and visibly diverges from badam.
The "remainder" encoding rounds ties away from zero where badam's bf16 cast rounds them to
even, so a few elements may differ by one bf16 ulp; fp32 masters give badam's bits exactly.
"""

from __future__ import annotations

import pytest
import torch
from llama_tiny import build_tiny_llama, causal_lm_loss
from optim_models import make_net

from badam_kernels.badam_compat import BlockOptimizer
from badam_kernels.optim import BlockAdamW

badam = pytest.importorskip("badam")

LR = 1e-5
STEPS = 14
SWITCH = 3
MAX_DIFFERING = 5e-3  # fraction of elements allowed to differ (by less than LR)


def _train(model, opt, steps=STEPS):
    """Losses, and for each step the first parameter that received a gradient (the block)."""
    losses, blocks = [], []
    for step in range(steps):
        loss = causal_lm_loss(model, step)
        loss.backward()
        blocks.append(next(n for n, p in model.named_parameters() if p.grad is not None))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, blocks


def _run_block_optimizer(cls, switch_mode, weight_decay, base=torch.optim.AdamW, **base_kwargs):
    model = build_tiny_llama(attention_bias=True)  # seeds the global RNG (random mode draws from it)
    base_optimizer = base(model.parameters(), lr=LR, weight_decay=weight_decay, **base_kwargs)
    opt = cls(
        base_optimizer,
        list(model.named_parameters()),
        switch_block_every=SWITCH,
        switch_mode=switch_mode,
        verbose=0,
    )
    losses, blocks = _train(model, opt)
    return model, losses, blocks


def _fraction_differing(a, b) -> float:
    """Fraction of the elements of all parameters that differ between models a and b."""
    pairs = list(zip(a.parameters(), b.parameters()))
    return sum((p != q).sum().item() for p, q in pairs) / sum(p.numel() for p, _ in pairs)


def _assert_matches(ours, theirs) -> None:
    """Few elements differ, none by more than one bf16 ulp plus lr (about one update:
    small-gradient elements, e.g. fresh biases, feel a one-ulp difference elsewhere the most)."""
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(
            p.float(), q.float(), rtol=2**-7, atol=LR, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert _fraction_differing(ours, theirs) <= MAX_DIFFERING


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("switch_mode", ["ascending", "descending", "random"])
def test_block_optimizer_reproduces_badam(switch_mode, weight_decay):
    theirs, their_losses, their_blocks = _run_block_optimizer(badam.BlockOptimizer, switch_mode, weight_decay)
    ours, our_losses, our_blocks = _run_block_optimizer(BlockOptimizer, switch_mode, weight_decay)
    assert our_blocks == their_blocks  # same blocks, switched at the same steps
    assert len(set(our_blocks)) >= 4  # several switches happened
    torch.testing.assert_close(our_losses, their_losses, rtol=0, atol=1e-4)
    _assert_matches(ours, theirs)
    initial = build_tiny_llama(attention_bias=True)
    assert _fraction_differing(theirs, initial) > 0.1  # not vacuous: the layers (~20%) moved


def test_generic_path_reproduces_badam_exactly():
    """A non-Adam base optimizer runs badam's generic fp32-copy path: bit-identical results."""
    kwargs = dict(base=torch.optim.SGD, momentum=0.9)
    theirs, their_losses, their_blocks = _run_block_optimizer(
        badam.BlockOptimizer, "ascending", 0.01, **kwargs
    )
    ours, our_losses, our_blocks = _run_block_optimizer(BlockOptimizer, "ascending", 0.01, **kwargs)
    assert our_blocks == their_blocks and our_losses == their_losses
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))


def _run_single_block(make_optimizer):
    """Train only layer 2 of the Llama (no switch within the run)."""
    model = build_tiny_llama()
    losses, _ = _train(model, make_optimizer(model))
    return model, losses


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_block_adamw_master_modes_against_badam(backend):
    block = [["model.layers.2."]]
    theirs, their_losses = _run_single_block(
        lambda m: badam.BlockOptimizer(
            torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0),
            list(m.named_parameters()),
            block_prefix_list=block,
            switch_block_every=1000,
            switch_mode="fixed",
            start_block=0,
            verbose=0,
        )
    )

    def ours(master_weights):
        return _run_single_block(
            lambda m: BlockAdamW(
                m,
                lr=LR,
                blocks=block,
                switch_mode="fixed",
                switch_every=1000,
                master_weights=master_weights,
                backend=backend,
                verbose=0,
            )
        )

    fp32, fp32_losses = ours("fp32")
    remainder, remainder_losses = ours("remainder")
    none, _ = ours("none")
    torch.testing.assert_close(fp32_losses, their_losses, rtol=0, atol=1e-4)
    torch.testing.assert_close(remainder_losses, their_losses, rtol=0, atol=1e-4)
    if backend == "torch":  # the reference computes torch's AdamW op for op: badam's exact bits
        assert all(torch.equal(p, q) for p, q in zip(fp32.parameters(), theirs.parameters()))
    _assert_matches(fp32, theirs)
    _assert_matches(remainder, theirs)
    # Without a master, most of the tiny updates are lost to rounding: far from badam.
    with pytest.raises(AssertionError):
        _assert_matches(none, theirs)
    layer = [n for n, _ in theirs.named_parameters() if n.startswith("model.layers.2.")]
    params_theirs, params_none = dict(theirs.named_parameters()), dict(none.named_parameters())
    differing = sum((params_theirs[n] != params_none[n]).sum().item() for n in layer)
    assert differing > 0.5 * sum(params_theirs[n].numel() for n in layer)


def test_drop_in_trains_frozen_parameters_like_badam():
    """badam sets requires_grad on every parameter of the active block, frozen or not."""
    flags = []
    for cls in (badam.BlockOptimizer, BlockOptimizer):
        model = make_net()
        model.layers[2].fc.weight.requires_grad_(False)
        cls(
            torch.optim.AdamW(model.parameters(), lr=1e-3),
            list(model.named_parameters()),
            switch_mode="ascending",
            start_block=2,
            verbose=0,
        )
        flags.append([p.requires_grad for p in model.parameters()])
    assert flags[0] == flags[1]
    names = [name for name, _ in make_net().named_parameters()]
    assert flags[1][names.index("layers.2.fc.weight")]  # the frozen weight trains in its block

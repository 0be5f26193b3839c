"""load_state_dict only loads into an optimizer with the same parameters (names, shapes, dtypes),
blocks and master form, failing at load time with the first difference; the saved schedule wins
over the constructor's switch_every and seed, with a warning; older state dicts still load."""

from __future__ import annotations

import io

import pytest
import torch
from optim_models import make_net, train

from badam_kernels.optim import BlockAdamW

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTIONS = dict(lr=1e-2, switch_every=3, switch_mode="ascending", start_block=0, verbose=0)


def _saved(**kwargs) -> tuple[torch.nn.Module, BlockAdamW, dict]:
    """A net trained 2 steps into block 0 (its Adam state exists), and a copy of its checkpoint."""
    model = make_net()
    opt = BlockAdamW(model, **{**OPTIONS, **kwargs})
    train(model, opt, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    return model, opt, torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        # The case: same parameters, blocks in another order; it loaded silently.
        (
            make_net,
            dict(blocks=[["layers.2."], ["layers.1."], ["layers.0."]]),
            "its blocks\\[0\\] parameter 0 is 'layers.0.fc.weight', this optimizer's is 'layers.2.fc.weight'",
        ),
        # Another hidden size used to fail only at step().
        (
            lambda: make_net(width=24),
            {},
            "'layers.0.fc.weight' was saved with shape \\[16, 16\\], this optimizer's has \\[24, 24\\]",
        ),
        (
            lambda: make_net(torch.float16),
            {},
            "parameter 'layers.0.fc.weight' was saved with dtype bfloat16, this optimizer's has float16",
        ),
        (
            lambda: make_net(num_layers=4),
            {},
            "its parameter 3 is 'layers.0.fc.bias', this optimizer's is 'layers.3.fc.weight'",
        ),
        (
            make_net,
            dict(always_active=["norm."]),
            "it has 12 parameters, this optimizer 14 \\('norm.weight' is only in this optimizer\\)",
        ),
        (
            make_net,
            dict(blocks=[["layers.0.", "layers.1."], ["layers.2."]]),
            "it has 3 blocks, this optimizer 2",
        ),
        (
            make_net,
            dict(master_weights="fp32"),
            "saved state of 'layers.0.fc.weight' holds .*'remainder'.*master_weights='fp32'",
        ),
    ],
    ids=["block-order", "hidden-size", "dtype", "layers", "always-active", "blocks", "master-form"],
)
def test_mismatch_is_refused_at_load_time(make, kwargs, match):
    _, _, saved = _saved()
    model = make()
    opt = BlockAdamW(model, **{**OPTIONS, **kwargs})
    with pytest.raises(ValueError, match=f"cannot load this state dict: .*({match})"):
        opt.load_state_dict(saved["optimizer"])
    # Nothing was loaded: the optimizer trains on from its fresh state.
    assert not opt.state and opt._schedule.global_step == 0 and opt.active_block == 0
    train(model, opt, 1)


def _continue(saved: dict, steps: int, **kwargs) -> torch.nn.Module:
    model = make_net()
    opt = BlockAdamW(model, **{**OPTIONS, **kwargs})
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    train(model, opt, steps, start=2)
    return model


def test_saved_schedule_wins_over_the_constructor_with_a_warning():
    """Built with switch_every=7 and seed=1, resumed from a run with 3 and 5: the saved values
    win (they used to replace switch_every silently, and the seed was not saved at all, so
    stochastic rounding drew other noise after a resume)."""
    options = dict(
        switch_every=3, seed=5, switch_mode="random", master_weights="none", stochastic_rounding=True
    )
    model, opt, saved = _saved(**options)
    train(model, opt, 7, start=2)  # the uninterrupted run: two switches, a new random pass
    with (
        pytest.warns(
            UserWarning, match="switch_every=3, .* built with switch_every=7: the loaded value 3 wins"
        ),
        pytest.warns(
            UserWarning, match="seed=5, this optimizer was built with seed=1: the loaded value 5 wins"
        ),
    ):
        resumed = _continue(saved, 7, **{**options, "switch_every": 7, "seed": 1})
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


def test_state_dict_saved_without_layout_still_loads():
    """State dicts of the previous release (no block_layout, no saved seed) load with a warning
    and resume exactly; a wrong model is still caught at load time, by the state's shapes."""
    model, opt, saved = _saved()
    train(model, opt, 4, start=2)
    del saved["optimizer"]["block_layout"]
    del saved["optimizer"]["block_schedule"]["seed"]
    with pytest.warns(UserWarning, match="saved without 'block_layout'"):
        resumed = _continue(saved, 4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    wider = BlockAdamW(make_net(width=24), **OPTIONS)
    with (
        pytest.warns(UserWarning, match="saved without 'block_layout'"),
        pytest.raises(ValueError, match="saved exp_avg of 'layers.0.fc.weight' has shape \\(16, 16\\)"),
    ):
        wider.load_state_dict(saved["optimizer"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_checkpoint_without_layout_still_loads(tmp_path):
    """badam_kernels.distributed.load_checkpoint (single process here) on a DCP checkpoint of the
    previous release: DCP used to fail on the missing layout and seed entries."""
    import torch.distributed.checkpoint as dcp

    from badam_kernels.distributed import load_checkpoint

    model, opt, _ = _saved()
    old = opt.state_dict()
    del old["block_layout"]
    del old["block_schedule"]["seed"]
    dcp.save({"model": model.state_dict(), "optimizer": old}, checkpoint_id=str(tmp_path))
    train(model, opt, 4, start=2)
    resumed = make_net()
    resumed_opt = BlockAdamW(resumed, **OPTIONS)
    with pytest.warns(UserWarning, match="saved without 'block_layout'"):
        load_checkpoint(resumed, resumed_opt, str(tmp_path))
    train(resumed, resumed_opt, 4, start=2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))

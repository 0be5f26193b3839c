"""BlockOptimizerRatio against the real `badam.BlockOptimizerRatio` (badam 1.4): same masks,
offsets, switch steps, state resets and update math, so swapping the import reproduces badam's
training; and in bf16 the master weights make the model move where badam's does not.

Two comparisons, because badam's update runs on torch's CPU sqrt, which goes through MKL's vector
math and is not always correctly rounded (one ulp off for ~18% of fp32 inputs on the machine
this was written on), while every backend here rounds sqrt correctly:
  * given gradients (no model, so no matmul rounding): with badam's sqrt made correctly rounded,
    the iterates are badam's bit for bit, on any CPU: every other operation of SparseAdam is an
    IEEE-rounded elementwise op in torch and here;
  * a real backward through a tiny fp32 Llama: equal within a bound measured on both sides.
"""

from __future__ import annotations

import pytest
import torch
from llama_tiny import build_tiny_llama, causal_lm_loss

from badam_kernels import BlockOptimizerRatio

badam = pytest.importorskip("badam")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATIO = 0.1
# Measured (tests/test_ratio_vs_badam.py, test_trains_like_badam, 12 steps of lr 1e-3, switch_every 3,
# on an AMD EPYC with AVX-512, 2026-11-30), as ||w_ours - w_badam|| / ||w_badam - w_initial||:
#   ours vs badam, same process:                     2.2e-6 (adjacent)  2.4e-6 (scatter)
#   ours with ONEDNN_MAX_CPU_ISA=AVX2:               2.2e-6             2.4e-6
#   ours with ATEN_CPU_CAPABILITY=default (+AVX2):   6.4e-6             1.1e-5
#   ours from weights one ulp off everywhere:        6.9e-6             8.1e-6
#   defects: offsets never advance                   1.44               1.41
#            Adam state never reset                  0.76               0.76
#            bias correction one step ahead          0.23               0.25
#            another scatter seed                    -                  1.25
# The bound sits between the two sides, ~90x above the largest benign spread and ~230x below
# the smallest defect. Loss differences: benign <= 1e-6, defects >= 3e-3.
MAX_RELATIVE_DISTANCE = 1e-3
MAX_LOSS_DIFFERENCE = 1e-4


def _optimizer(cls, model, mode, keep_mask, switch_every, **kwargs):
    return cls(
        model.parameters(), list(model.named_parameters()), update_ratio=RATIO, switch_every=switch_every,
        mask_mode=mode, keep_mask=keep_mask, verbose=0, **kwargs,
    )  # fmt: skip


def _exact_sqrt_(self: torch.Tensor) -> torch.Tensor:
    """Correctly rounded in-place sqrt (fp64 then one rounding), for badam's `sqrt_`."""
    return self.copy_(self.double().sqrt().to(self.dtype))


def _train_on_given_gradients(cls, mode, keep_mask, switch_every, steps=10, **kwargs):
    """Train with gradients that are a pure function of the step: the loss sum(p * G) has
    gradient exactly G. Some entries are exactly zero (badam's 1e-9 nudge matters there)."""
    model = build_tiny_llama(dtype=torch.float32)  # also seeds the global RNG badam draws seeds from
    opt = _optimizer(cls, model, mode, keep_mask, switch_every, lr=1e-3, **kwargs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(11)
    for _ in range(steps):
        gradients = [
            torch.randn(p.shape, generator=generator)
            * 1e-2
            * (torch.rand(p.shape, generator=generator) > 0.1)
            for p in trainable
        ]
        sum((p * g).sum() for p, g in zip(trainable, gradients)).backward()
        opt.step()
        opt.zero_grad()
    return model


GIVEN_GRADIENT_CASES = [
    ("adjacent", True, 3, {}),
    ("adjacent", False, 3, {}),
    ("scatter", True, 3, {}),
    ("scatter", False, 3, {}),
    ("scatter", True, 1, {}),
    ("adjacent", True, 2, {"param_update_ratios": {"mlp": 0.3, "o_proj": 1.0}}),
    ("scatter", True, 4, {"param_update_ratios": {"mlp": 0.3, "self_attn": 0.05}}),
    ("scatter", True, 3, {"include_embedding": True, "include_lm_head": True}),
]


@pytest.mark.parametrize(
    ("mode", "keep_mask", "switch_every", "kwargs"),
    GIVEN_GRADIENT_CASES,
    ids=["adjacent", "adjacent-own_masks", "scatter", "scatter-own_masks", "scatter-switch1",
         "adjacent-ratios", "scatter-ratios", "scatter-embedding-head"],
)  # fmt: skip
def test_iterates_are_badams_bit_for_bit_on_given_gradients(
    monkeypatch, mode, keep_mask, switch_every, kwargs
):
    """Masks (including badam's own-mask quirk at each period's last step with keep_mask),
    offsets, 10 steps across several switches, state resets, per-name ratios, ratio-1
    parameters, the nudge of small parameters: all exactly badam's."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "sqrt_", _exact_sqrt_)
        theirs = _train_on_given_gradients(badam.BlockOptimizerRatio, mode, keep_mask, switch_every, **kwargs)
    ours = _train_on_given_gradients(BlockOptimizerRatio, mode, keep_mask, switch_every, **kwargs)
    initial = build_tiny_llama(dtype=torch.float32)
    moved = 0
    for (name, p), q, p0 in zip(ours.named_parameters(), theirs.parameters(), initial.parameters()):
        assert torch.equal(p, q), (
            f"{name}: {(p != q).sum().item()} of {p.numel()} entries differ from badam's"
        )
        moved += (p != p0).sum().item()
    assert moved > RATIO * sum(p.numel() for p in initial.parameters())  # several periods' masks moved


def _train_llama(cls, mode, keep_mask, steps=12, **kwargs):
    model = build_tiny_llama(dtype=torch.float32)
    opt = _optimizer(cls, model, mode, keep_mask, 3, lr=1e-3, **kwargs)
    losses = []
    for step in range(steps):
        loss = causal_lm_loss(model, step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return [p.detach() for p in model.parameters()], losses


def _relative_distance(ours, theirs, initial) -> float:
    diff = sum((a - b).double().square().sum() for a, b in zip(ours, theirs)).sqrt()
    moved = sum((b - c).double().square().sum() for b, c in zip(theirs, initial)).sqrt()
    return (diff / moved).item()


@pytest.mark.parametrize("keep_mask", [True, False], ids=["shared_masks", "own_masks"])
@pytest.mark.parametrize("mode", ["adjacent", "scatter"])
def test_trains_like_badam(mode, keep_mask):
    """A real backward through a tiny fp32 Llama, 12 steps, 4 mask periods: losses and weights
    match badam's within the measured bound (see MAX_RELATIVE_DISTANCE)."""
    theirs, their_losses = _train_llama(badam.BlockOptimizerRatio, mode, keep_mask)
    ours, our_losses = _train_llama(BlockOptimizerRatio, mode, keep_mask)
    initial = [p.detach() for p in build_tiny_llama(dtype=torch.float32).parameters()]
    torch.testing.assert_close(our_losses, their_losses, rtol=0, atol=MAX_LOSS_DIFFERENCE)
    assert _relative_distance(ours, theirs, initial) <= MAX_RELATIVE_DISTANCE
    assert their_losses[-1] < their_losses[0]  # not vacuous: training moved the model


def _displacement_error(dtype, cls, steps=30, **kwargs):
    """||(w - w0) - (w32 - w32_0)|| / ||w32 - w32_0||: how far a run's weight change is from the
    fp32 run's, over one 30-step mask period at lr 1e-5."""

    def train(dtype, cls, **kwargs):
        model = build_tiny_llama(dtype=dtype)
        opt = cls(model.parameters(), list(model.named_parameters()), update_ratio=RATIO, switch_every=steps,
                  lr=1e-5, verbose=0, **kwargs)  # fmt: skip
        for step in range(steps):
            causal_lm_loss(model, step).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().float() for p in model.parameters()]

    def delta(weights, dtype):
        return [w - w0.detach().float() for w, w0 in zip(weights, build_tiny_llama(dtype=dtype).parameters())]

    reference = delta(train(torch.float32, BlockOptimizerRatio), torch.float32)
    change = delta(train(dtype, cls, **kwargs), dtype)
    error = sum((a - b).double().square().sum() for a, b in zip(change, reference)).sqrt()
    return (error / sum(b.double().square().sum() for b in reference).sqrt()).item()


def test_bf16_masters_move_like_fp32_and_badam_does_not():
    """lr 1e-5 is below half a bf16 ulp of most weights (~6e-5 at 0.02): badam's direct bf16
    update rounds most steps away, the remainder master accumulates them. Measured here: ours
    0.20 of the fp32 displacement away, badam 0.94 (its weights moved at 15% of the entries
    the fp32 run moved), master_weights="none" 0.94 as well."""
    assert _displacement_error(torch.bfloat16, BlockOptimizerRatio) < 0.5
    assert _displacement_error(torch.bfloat16, badam.BlockOptimizerRatio) > 0.8
    assert _displacement_error(torch.bfloat16, BlockOptimizerRatio, master_weights="none") > 0.8


def test_clip_grad_norm_reports_badams_norm():
    """opt.clip_grad_norm_ returns the norm badam's clip_grad_norm_old_version (what LLaMA-Factory
    installs on the accelerator) reports for badam's sparse gradients: the norm of the selected
    entries, nudge included, over several steps (max_norm large enough not to clip: badam's
    function then scales `g.detach()`, which for a sparse COO gradient is a copy, so measured
    with torch 2.13 badam's gradients are never actually clipped; ours are, as max_grad_norm
    asks: tests/test_ratio.py checks it)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(distributed_type=DistributedType.NO, unscale_gradients=lambda: None)

    def norms(cls, clip):
        model = build_tiny_llama(dtype=torch.float32)
        opt = _optimizer(cls, model, "scatter", True, 2, lr=1e-3)
        out = []
        for step in range(3):
            causal_lm_loss(model, step).backward()
            out.append(clip(opt, model).item())
            opt.step()
            opt.zero_grad()
        return out

    theirs = norms(
        badam.BlockOptimizerRatio,
        lambda opt, model: badam.clip_grad_norm_old_version(accelerator, model.parameters(), 1e3),
    )
    ours = norms(BlockOptimizerRatio, lambda opt, model: opt.clip_grad_norm_(1e3))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)

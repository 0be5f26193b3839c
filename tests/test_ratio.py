"""BlockOptimizerRatio on its own: exact resume, gradient memory during backward, gradient
accumulation, LLaMA-Factory's way of calling it, maximize, memory_summary and bad arguments.
(Agreement with the real badam package is in test_ratio_vs_badam.py.)"""

from __future__ import annotations

import io

import pytest
import torch
from llama_tiny import build_tiny_llama, causal_lm_loss
from optim_models import make_net

from badam_kernels import BlockOptimizerRatio

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _optimizer(model, **kwargs):
    args = {"update_ratio": 0.1, "switch_every": 3, "lr": 1e-3, "verbose": 0, **kwargs}
    return BlockOptimizerRatio(model.parameters(), list(model.named_parameters()), **args)


def _given_gradients(model, steps, seed=3):
    """Per step, one gradient per trainable parameter, a pure function of (seed, step)."""
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [[torch.randn(p.shape, generator=generator) * 1e-2 for p in trainable] for _ in range(steps)]


def _backward_given(model, gradients) -> None:
    """backward() of sum(p * G): the gradient of p is exactly G."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    sum((p * g.to(p.dtype)).sum() for p, g in zip(trainable, gradients)).backward()


def _train(model, opt, first, last):
    losses = []
    for step in range(first, last):
        loss = causal_lm_loss(model, step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("stop", [4, 6], ids=["mid_period", "at_switch"])
@pytest.mark.parametrize("mode", ["adjacent", "scatter"])
def test_resume_is_bit_identical(mode, stop):
    """bf16 Llama with remainder masters: save after `stop` steps (switch_every 3: step 4 is one
    step into a period, 6 ends one), load into a fresh model and optimizer built after the global
    RNG moved on (so badam-style seed draws differ), continue: the same bits as never stopping."""
    steps = 8
    reference = build_tiny_llama(dtype=torch.bfloat16)
    losses = _train(reference, _optimizer(reference, mask_mode=mode), 0, steps)

    model = build_tiny_llama(dtype=torch.bfloat16)
    opt = _optimizer(model, mask_mode=mode)
    resumed_losses = _train(model, opt, 0, stop)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    torch.manual_seed(12345)
    resumed = build_tiny_llama(seed=7, dtype=torch.bfloat16)
    resumed.load_state_dict(saved["model"])
    torch.manual_seed(54321)
    resumed_opt = _optimizer(resumed, mask_mode=mode)
    resumed_opt.load_state_dict(saved["optimizer"])
    assert resumed_opt.state_dict()["ratio_schedule"] == saved["optimizer"]["ratio_schedule"]
    resumed_losses += _train(resumed, resumed_opt, stop, steps)
    assert resumed_losses == losses
    for (name, p), q in zip(resumed.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), f"{name} differs after resuming"
    if stop % 3:  # mid-period: the masters (remainders) were carried over
        assert any("remainder" in s for s in saved["optimizer"]["state"].values())


def test_dense_gradients_are_freed_during_backward():
    """Each dense gradient is reduced to its selected entries and freed in its own hook, so at
    most one dense gradient exists at a time; what remains after backward is the compact
    selection, ratio * 2 bytes per bf16 parameter (badam keeps COO tensors: values and int64
    indices, over 8x more here)."""
    model = build_tiny_llama(dtype=torch.bfloat16)
    params = list(model.parameters())
    live_dense = []

    def record(_):
        live_dense.append(sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    for p in params:  # registered before the optimizer's hooks, so they run first
        p.register_post_accumulate_grad_hook(record)
    opt = _optimizer(model, mask_mode="scatter")
    causal_lm_loss(model, 0).backward()

    trainable = [p for p in params if p.requires_grad]
    largest = max(p.numel() * p.element_size() for p in trainable)
    assert len(live_dense) == len(trainable)
    assert max(live_dense) == largest  # the gradient being taken, and no other
    assert all(p.grad is None for p in params)
    summary = opt.memory_summary()
    assert summary["grad_bytes"] == 2 * summary["selected_numel"]
    assert summary["selected_numel"] == sum(int(p.numel() * 0.1) for p in trainable)

    badam = pytest.importorskip("badam")
    theirs = build_tiny_llama(dtype=torch.bfloat16)
    badam.BlockOptimizerRatio(theirs.parameters(), list(theirs.named_parameters()), update_ratio=0.1,
                              mask_mode="scatter", verbose=0)  # fmt: skip
    causal_lm_loss(theirs, 0).backward()
    held = sum(
        p.grad._values().numel() * p.grad.element_size() + p.grad._indices().numel() * 8
        for p in theirs.parameters()
        if p.grad is not None
    )
    assert held > 8 * summary["grad_bytes"]


def test_gradient_accumulation_sums_micro_batches_and_advances_once():
    """Two backward passes per step give the iterates of one backward with the summed gradient,
    across several mask periods (offsets advance once per step, not per micro-batch). No 1e-9
    nudge here (preserve_threshold=0): it is added per backward pass, as badam adds it."""
    steps = 7
    accumulated = make_net(dtype=torch.float32)
    single = make_net(dtype=torch.float32)
    opts = [
        _optimizer(m, mask_mode="adjacent", switch_every=2, preserve_threshold=0)
        for m in (accumulated, single)
    ]
    halves = _given_gradients(accumulated, 2 * steps)
    for step in range(steps):
        first, second = halves[2 * step], halves[2 * step + 1]
        _backward_given(accumulated, first)
        _backward_given(accumulated, second)
        _backward_given(single, [a + b for a, b in zip(first, second)])
        for opt in opts:
            opt.step()
    for p, q in zip(accumulated.parameters(), single.parameters()):
        assert torch.equal(p, q)


def test_llamafactory_call_with_groups_and_fused_kwargs():
    """LLaMA-Factory passes decay/no-decay groups and transformers' adamw_torch_fused kwargs
    (fused=True, which badam rejects): accepted; the groups' weight_decay is ignored as in
    badam; the embedding and lm_head stay frozen."""

    def run(weight_decay):
        model = make_net(dtype=torch.bfloat16)
        named = list(model.named_parameters())
        groups = [
            {"params": [p for n, p in named if "bias" in n or "norm" in n], "weight_decay": 0.0},
            {
                "params": [p for n, p in named if not ("bias" in n or "norm" in n)],
                "weight_decay": weight_decay,
            },
        ]
        opt = BlockOptimizerRatio(
            param_groups=groups, named_parameters_list=named, update_ratio=0.25, mask_mode="scatter",
            verbose=0, include_embedding=False, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True,
        )  # fmt: skip
        for gradients in _given_gradients(model, 4):
            _backward_given(model, gradients)
            opt.step()
            opt.zero_grad()
        return model

    initial = make_net(dtype=torch.bfloat16)
    decayed, undecayed = run(0.1), run(0.0)
    for (name, p), q, p0 in zip(decayed.named_parameters(), undecayed.parameters(), initial.parameters()):
        assert torch.equal(p, q), name
        frozen = name in ("embed_tokens.weight", "lm_head.weight")
        assert torch.equal(p, p0) == frozen, name


def test_maximize_ascends():
    """A group with maximize=True steps along +gradient: the iterates of minimising -G (without
    badam's 1e-9 nudge, which is added before the sign flip)."""
    up, down = make_net(dtype=torch.float32), make_net(dtype=torch.float32)
    opt_up = BlockOptimizerRatio([{"params": up.parameters(), "maximize": True}], list(up.named_parameters()),
                                 switch_every=2, preserve_threshold=0, lr=1e-3, verbose=0)  # fmt: skip
    opt_down = _optimizer(down, switch_every=2, preserve_threshold=0)
    for gradients in _given_gradients(up, 5):
        _backward_given(up, gradients)
        _backward_given(down, [-g for g in gradients])
        opt_up.step()
        opt_down.step()
    for p, q in zip(up.parameters(), down.parameters()):
        assert torch.equal(p, q)


def test_clip_grad_norm_scales_the_selected_gradients():
    """clip_grad_norm_ returns the L2 norm of the selected gradient entries (the first
    int(numel * ratio) entries of each parameter in the first adjacent period, computed here in
    fp64) and the step then applies min(1, max_norm / (norm + 1e-6)) times the gradient: the
    iterates of training on the gradients scaled beforehand."""
    ratio, max_norm = 0.25, 0.05
    clipped, prescaled = make_net(dtype=torch.float32), make_net(dtype=torch.float32)
    opt_clipped, opt_prescaled = (
        _optimizer(m, update_ratio=ratio, mask_mode="adjacent", preserve_threshold=0)
        for m in (clipped, prescaled)
    )
    (gradients,) = _given_gradients(clipped, 1)
    selected = torch.cat([g.reshape(-1)[: int(g.numel() * ratio)] for g in gradients])
    expected_norm = selected.double().norm()
    factor = min(1.0, max_norm / (expected_norm.item() + 1e-6))
    assert factor < 0.5  # clipping is active

    _backward_given(clipped, gradients)
    norm = opt_clipped.clip_grad_norm_(max_norm)
    torch.testing.assert_close(norm.double(), expected_norm, rtol=1e-6, atol=0)
    opt_clipped.step()
    _backward_given(prescaled, [g * factor for g in gradients])
    opt_prescaled.step()
    for p, q, p0 in zip(
        clipped.parameters(), prescaled.parameters(), make_net(dtype=torch.float32).parameters()
    ):
        torch.testing.assert_close(p - p0, q - p0, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    ("dtype", "master_bytes"),
    [(torch.bfloat16, 2), (torch.float16, 4), (torch.float32, 0)],
    ids=["bf16-remainder", "fp16-fp32_master", "fp32-no_master"],
)
@pytest.mark.parametrize(("mode", "keep_mask"), [("adjacent", True), ("scatter", True), ("scatter", False)])
def test_memory_summary(mode, keep_mask, dtype, master_bytes):
    """master_weights="auto": an int16 remainder per selected bf16 entry, an fp32 master per fp16
    entry, none for fp32."""
    model = build_tiny_llama(dtype=dtype)
    opt = _optimizer(model, mask_mode=mode, keep_mask=keep_mask)
    causal_lm_loss(model, 0).backward()
    opt.step()
    summary = opt.memory_summary()
    selected = summary["selected_numel"]
    assert summary["state_bytes"] == 8 * selected  # fp32 exp_avg and exp_avg_sq per selected entry
    assert summary["master_bytes"] == master_bytes * selected
    assert summary["grad_bytes"] == 0  # applied by step()
    if mode == "adjacent":
        assert summary["index_bytes"] == 0  # runs need no index
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        masks = (
            {(p.shape, p.numel()) for p in trainable}
            if keep_mask
            else [(p.shape, p.numel()) for p in trainable]
        )
        assert summary["index_bytes"] == sum(4 * int(numel * 0.1) for _, numel in masks)  # int32


def test_zero_grad_before_step_discards_taken_gradients():
    model = make_net(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt = _optimizer(model)
    _backward_given(model, _given_gradients(model, 1)[0])
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="found no gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ---- bad arguments and misuse -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"update_ratio": 0.0}, ValueError, r"update_ratio must be a float in \(0, 1\], got 0.0"),
        ({"update_ratio": 1.5}, ValueError, "update_ratio must be a float in"),
        ({"update_ratio": True}, ValueError, "update_ratio must be a float in"),
        ({"mask_mode": "random"}, ValueError, "mask_mode must be one of"),
        ({"switch_every": 0}, ValueError, "switch_every must be an int >= 1, got 0"),
        ({"preserve_threshold": -1}, ValueError, "preserve_threshold must be an int >= 0"),
        ({"param_update_ratios": {"fc": 2.0}}, ValueError, r"param_update_ratios\['fc'\] must be a float"),
        ({"param_update_ratios": [("fc", 0.5)]}, TypeError, "param_update_ratios must be a mapping"),
        ({"keep_mask": "yes"}, TypeError, "keep_mask must be a bool"),
        ({"fused": "yes"}, TypeError, "fused must be a bool or None"),
        ({"master_weights": "fp16"}, ValueError, "master_weights must be one of"),
        ({"backend": "gpu"}, ValueError, "backend must be one of"),
        ({"lr": -1.0}, ValueError, r"lr must be in \[0\.0, inf\)"),
        ({"optimizer_defaults": {"lr": 1e-3}}, ValueError, "param group 0 has no betas, eps"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    model = make_net()
    with pytest.raises(error, match=match):
        _optimizer(model, **kwargs)


def test_parameter_missing_from_the_names_is_refused():
    model = make_net()
    named = [(n, p) for n, p in model.named_parameters() if n != "layers.0.fc.weight"]
    with pytest.raises(
        ValueError, match=r"trainable parameter of shape \(16, 16\) is in param_groups but not"
    ):
        BlockOptimizerRatio(model.parameters(), named, verbose=0)


def test_no_embedding_name_warns():
    model = make_net()
    named = [(n.replace("embed_tokens", "wte"), p) for n, p in model.named_parameters()]
    with pytest.warns(UserWarning, match="include_embedding=False but no parameter name contains 'embed'"):
        BlockOptimizerRatio(model.parameters(), named, verbose=0)


def test_misuse_is_explained():
    model = make_net()
    opt = _optimizer(model)
    with pytest.raises(RuntimeError, match="call loss.backward"):
        opt.step()
    with pytest.raises(RuntimeError, match="clip_grad_norm_ found no gradient"):
        opt.clip_grad_norm_(1.0)
    with pytest.raises(RuntimeError, match="does not support add_param_group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    _backward_given(model, _given_gradients(model, 1)[0])
    with pytest.raises(ValueError, match="only the L2 norm"):
        opt.clip_grad_norm_(1.0, norm_type=float("inf"))
    with pytest.raises(RuntimeError, match="between backward\\(\\) and step\\(\\)"):
        opt.state_dict()
    opt.step()
    model.embed_tokens.weight.requires_grad_(True)  # frozen at construction: nobody takes its gradient
    _backward_given(model, _given_gradients(model, 1)[0])
    with pytest.raises(RuntimeError, match="parameter embed_tokens.weight has a dense gradient"):
        opt.step()
    with pytest.raises(ValueError, match="no 'ratio_schedule'"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())

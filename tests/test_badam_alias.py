"""The `badam` names LLaMA-Factory imports, served by badam_kernels (badam_alias), and the
temporary `badam` package of `python -m badam_kernels.llamafactory`; no LLaMA-Factory needed
(tests/test_llamafactory.py runs LLaMA-Factory itself)."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import subprocess
import sys
from types import MethodType, SimpleNamespace

import pytest
import torch
from llama_tiny import build_tiny_llama, text_batch

from badam_kernels import llamafactory
from badam_kernels.badam_alias import RATIO_FP16, BAdamCallback, clip_grad_norm_old_version
from badam_kernels.badam_compat import BlockOptimizer, BlockOptimizerRatio

accelerate = pytest.importorskip("accelerate")

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*fp32.*:UserWarning"),  # tiny fp32 models
    pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning"),
]

# Run in a child started from the served environment: what LLaMA-Factory's startup check and
# imports see, and whether a grandchild (torchrun's workers) sees the same.
CHILD = """
import importlib.metadata, json, subprocess, sys
import badam, badam_kernels
from transformers.utils.versions import require_version
require_version("badam>=1.2.1")  # what LLaMA-Factory's check_version runs
from badam import BAdamCallback, BlockOptimizer, BlockOptimizerRatio, clip_grad_norm_old_version
grandchild = subprocess.run(
    [sys.executable, "-c", "import importlib.metadata as m; print(m.version('badam'))"],
    capture_output=True, text=True, check=True).stdout.strip()
print(json.dumps({"version": importlib.metadata.version("badam"), "module": badam.__name__,
                  "same_class": BlockOptimizer is badam_kernels.BlockOptimizer
                  and BlockOptimizerRatio is badam_kernels.BlockOptimizerRatio,
                  "grandchild_version": grandchild}))
"""


def test_served_badam_reaches_child_processes_and_passes_the_version_check(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "badam", raising=False)  # as in a fresh process (other tests import it)
    outside_version = _badam_version()
    with llamafactory.badam_served_by_badam_kernels():
        result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
    assert seen == {
        "version": llamafactory.SERVED_VERSION,
        "module": "badam_kernels.badam_alias",
        "same_class": True,
        "grandchild_version": llamafactory.SERVED_VERSION,
    }
    assert llamafactory.SERVED_VERSION.startswith("1.4+badamkernels.")
    # Nothing stays behind: this process sees the environment's own badam (or none) again.
    assert _badam_version() == outside_version != llamafactory.SERVED_VERSION
    assert "badam" not in sys.modules
    assert not any("badam_kernels_llamafactory_" in p for p in sys.path)
    assert "badam_kernels_llamafactory_" not in os.environ.get("PYTHONPATH", "")


def _badam_version() -> str | None:
    try:
        return importlib.metadata.version("badam")
    except importlib.metadata.PackageNotFoundError:
        return None


def test_refuses_to_serve_badam_once_the_real_one_is_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "badam", SimpleNamespace(__file__="/site-packages/badam/__init__.py"))
    with pytest.raises(RuntimeError, match="already imported"):
        with llamafactory.badam_served_by_badam_kernels():
            pass


def test_main_without_llamafactory_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(llamafactory.importlib.util, "find_spec", lambda name: None)
    assert llamafactory.main(["train", "config.yaml"]) == 2
    err = capsys.readouterr().err
    assert "LLaMA-Factory is not installed" in err and "pip install llamafactory==0.9.5" in err


# ---- verbose: LLaMA-Factory's badam_verbose levels ------------------------------------------


@pytest.mark.parametrize("verbose", [0, 1, 2])
def test_verbose_levels_print_switch_messages(verbose, capsys):
    model = build_tiny_llama(dtype=torch.float32)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = BlockOptimizer(
        base, list(model.named_parameters()), switch_block_every=2, switch_mode="ascending", verbose=verbose
    )
    for step in range(5):  # first block 1 step (badam's quirk), then 2 each: blocks 0, 1, 2, 3
        tokens = text_batch(step, batch_size=1, seq_len=16)
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
    lines = capsys.readouterr().out.splitlines()
    switches = [line for line in lines if "training block" in line]
    names = [line for line in lines if "trainable parameters" in line]
    assert len(lines) == len(switches) + len(names)
    assert len(switches) == (4 if verbose >= 1 else 0)
    assert [s.split("training block ")[1].split()[0] for s in switches] == ["0", "1", "2", "3"][
        : len(switches)
    ]
    assert len(names) == (4 if verbose == 2 else 0)
    if names:
        assert "model.layers.3.mlp.down_proj.weight" in names[-1]


def test_log_fn_replaces_printing(capsys):
    model = build_tiny_llama(dtype=torch.float32)
    logged = []
    BlockOptimizer(
        torch.optim.AdamW(model.parameters()), list(model.named_parameters()), log_fn=logged.append
    )
    assert capsys.readouterr().out == "" and len(logged) == 1


def test_reloading_the_state_logs_only_a_block_that_changes():
    """accelerate's prepare() reloads the optimizer's own state dict: no second "training block"
    line. A state dict from another block (a resumed run) makes that block train, and says so."""
    model = build_tiny_llama(dtype=torch.float32)
    logged = []
    opt = BlockOptimizer(
        torch.optim.AdamW(model.parameters()),
        list(model.named_parameters()),
        switch_block_every=1,
        switch_mode="ascending",
        log_fn=logged.append,
    )
    assert logged == ["BAdam: training block 0 of 4"]
    at_block_0 = opt.state_dict()
    opt.load_state_dict(opt.state_dict())
    assert logged == ["BAdam: training block 0 of 4"]
    tokens = text_batch(0, batch_size=1, seq_len=16)
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()  # badam's first block trains switch_block_every - 1 steps: a switch here
    assert logged[1:] == ["BAdam: training block 1 of 4"]
    opt.load_state_dict(at_block_0)
    assert logged[2:] == ["BAdam: training block 0 of 4"]
    assert opt.active_parameter_names()[0].startswith("model.layers.0.")


# ---- BAdamCallback -------------------------------------------------------------------------

LAYERS, ACTIVE = 4, 1


def _q_proj_calls(model) -> list[int]:
    """q_proj forward calls per layer: a checkpointed layer that backward reaches runs twice."""
    calls = [0] * LAYERS
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _block_optimizer(model):
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return BlockOptimizer(
        base, list(model.named_parameters()), switch_mode="fixed", start_block=ACTIVE, verbose=0
    )


def _gradients(callback: bool, checkpointing: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    model = build_tiny_llama(dtype=torch.float32, num_layers=LAYERS)
    model.train()
    if checkpointing != "none":
        kwargs = {"use_reentrant": checkpointing == "reentrant"}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()  # the case badam's callback exists for
    opt = _block_optimizer(model)
    if callback:
        # As the Trainer calls it, with the optimizer in accelerate's wrapper (`.optimizer`).
        wrapped = SimpleNamespace(optimizer=opt)
        BAdamCallback().on_train_begin(None, None, None, model=model, optimizer=wrapped)
    calls = _q_proj_calls(model)
    tokens = text_batch(0, batch_size=2, seq_len=32)
    model(input_ids=tokens, labels=tokens).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_callback_keeps_the_active_block_gradients(checkpointing):
    reference, _ = _gradients(callback=False, checkpointing="none")
    grads, _ = _gradients(callback=True, checkpointing=checkpointing)
    assert set(grads) == set(reference) == {n for n in reference if n.startswith(f"model.layers.{ACTIVE}.")}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=0, atol=0, msg=name)


def test_callback_stops_backward_at_the_active_block():
    """Non-reentrant checkpoints: the frozen layers below the block are no longer recomputed.
    (Under reentrant ones the cut leaves their checkpoint nodes in the graph with no gradient to
    carry; torch 2.13 skips them, torch 2.9 still recomputes them with zero gradients.)"""
    _, calls_without = _gradients(callback=False, checkpointing="non_reentrant")
    _, calls = _gradients(callback=True, checkpointing="non_reentrant")
    assert calls_without == [2] * LAYERS  # backward recomputes every frozen layer below the block
    assert calls == [1] * ACTIVE + [2] * (LAYERS - ACTIVE)  # with the callback: none of them


def test_callback_leaves_other_optimizers_alone():
    model = build_tiny_llama(dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters())
    BAdamCallback().on_train_begin(None, None, None, model=model, optimizer=opt)
    assert all(not m._forward_pre_hooks for m in model.modules())


# ---- clip_grad_norm_old_version ----------------------------------------------------------------


def _accelerator_as_in_llamafactory():
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.clip_grad_norm_ = MethodType(clip_grad_norm_old_version, accelerator)  # as LLaMA-Factory
    return accelerator


def _parameters() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in [(7, 5), (3,), (11, 4)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape, generator=generator)
        params.append(p)
    params.append(torch.nn.Parameter(torch.ones(2)))  # no gradient: skipped
    return params


def _reference_clip(params, max_norm: float, norm_type: float):
    """fp64: the total norm of all gradients and the clipped gradients."""
    grads = [p.grad.double() for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    total = (
        flat.abs().max() if norm_type == float("inf") else flat.abs().pow(norm_type).sum() ** (1 / norm_type)
    )
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    return total, [g * coef for g in grads]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipping, and not
def test_clip_grad_norm_old_version_in_layer_mode_is_accelerates(max_norm, norm_type):
    accelerator = _accelerator_as_in_llamafactory()
    params = _parameters()
    total, clipped = _reference_clip(params, max_norm, norm_type)
    returned = accelerator.clip_grad_norm_(iter(params), max_norm, norm_type=norm_type)
    torch.testing.assert_close(returned.double(), total, rtol=1e-6, atol=0)
    for grad, expected in zip([p.grad for p in params if p.grad is not None], clipped):
        torch.testing.assert_close(grad.double(), expected, rtol=1e-6, atol=1e-7)


RATIO, LR, EPS, BETA2 = 0.1, 1e-3, 1e-8, 0.999


def _ratio_model_and_optimizer(accelerator):
    """A tiny fp32 Llama, a copy made before the optimizer hooks into it, and its
    BlockOptimizerRatio as LLaMA-Factory builds it, prepared by `accelerator`."""
    model = build_tiny_llama(dtype=torch.float32)
    reference = copy.deepcopy(model)
    opt = BlockOptimizerRatio(
        model.parameters(), list(model.named_parameters()), update_ratio=RATIO, lr=LR, eps=EPS, verbose=0
    )
    return model, reference, accelerator.prepare(opt)


def _selected_reference_gradients(reference, tokens) -> dict[str, torch.Tensor]:
    """fp64 gradients of the entries the first step updates: badam's adjacent mask at offset 0 (the
    first int(numel * ratio) entries; the embedding and lm_head frozen), with badam's 1e-9 nudge on
    parameters of fewer than 100 entries."""
    reference(input_ids=tokens, labels=tokens).loss.backward()
    selected = {}
    for name, p in reference.named_parameters():
        if "embed" in name or "lm_head" in name:
            continue
        g = p.grad.double().flatten()[: int(p.numel() * RATIO)]
        selected[name] = g + 1e-9 if p.numel() < 100 else g
    return selected


@pytest.mark.parametrize("max_norm", [1e-4, 1e3])  # clipping, and not
def test_clip_grad_norm_old_version_in_ratio_mode_clips_what_the_optimizer_holds(max_norm):
    """The Trainer's call, `clip_grad_norm_(model.parameters(), max_grad_norm)`, sees parameters
    whose dense gradients BlockOptimizerRatio has already taken: it must still return the norm of
    the selected gradient entries and clip them. Checked against fp64 gradients of a copy of the
    model: the norm, and the first SparseAdam step from the clipped gradient c * g, which moves each
    selected entry by lr * c * g / (|c * g| + eps / sqrt(1 - beta2)) (bias corrections folded in);
    at max_norm 1e-4 the clipped entries are near eps, so an unclipped step would be far off."""
    accelerator = _accelerator_as_in_llamafactory()
    model, reference, opt = _ratio_model_and_optimizer(accelerator)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens = text_batch(0, batch_size=2, seq_len=32)
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert all(p.grad is None for p in model.parameters())  # nothing for a plain clip to see
    selected = _selected_reference_gradients(reference, tokens)
    total = torch.cat(list(selected.values())).norm()

    returned = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    torch.testing.assert_close(returned.double(), total, rtol=1e-5, atol=0)
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    assert (coef < 1e-3) == (max_norm < 1)
    opt.step()

    eps_hat = EPS / (1 - BETA2) ** 0.5
    for name, p in model.named_parameters():
        moved = (p.detach() - initial[name]).double().flatten()
        expected = torch.zeros_like(moved)
        if name in selected:
            g = selected[name] * coef
            expected[: g.numel()] = -LR * g / (g.abs() + eps_hat)
        # atol: new weights near 1 (the norms) are rounded to fp32's spacing there, 1.2e-7
        torch.testing.assert_close(
            moved, expected, rtol=0, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_clip_grad_norm_old_version_in_ratio_mode_refuses_gradients_it_cannot_clip():
    accelerator = _accelerator_as_in_llamafactory()
    model, _, _ = _ratio_model_and_optimizer(accelerator)
    tokens = text_batch(0, batch_size=1, seq_len=16)
    model(input_ids=tokens, labels=tokens).loss.backward()
    stray = torch.nn.Parameter(torch.zeros(3))
    stray.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="1 of the parameters to clip have dense gradients"):
        accelerator.clip_grad_norm_([*model.parameters(), stray], 1.0)
    # Two live optimizers on the two halves of the model (each took its half over from the first
    # one, which the clip then ignores): one global clip over both is refused.
    named = list(model.named_parameters())
    for part in (named[: len(named) // 2], named[len(named) // 2 :]):
        with pytest.warns(UserWarning, match="takes over"):
            accelerator.prepare(BlockOptimizerRatio([p for _, p in part], part, include_embedding=True))
    with pytest.raises(RuntimeError, match="2 BlockOptimizerRatio instances train these parameters"):
        accelerator.clip_grad_norm_(model.parameters(), 1.0)


def test_callback_refuses_fp16_in_ratio_mode():
    """fp16's GradScaler finds no gradient to unscale (BlockOptimizerRatio took them during
    backward) and would fail at the first step with an assertion; the callback says why first."""
    accelerator = _accelerator_as_in_llamafactory()
    model, _, opt = _ratio_model_and_optimizer(accelerator)
    BAdamCallback().on_train_begin(SimpleNamespace(fp16=False), None, None, model=model, optimizer=opt)
    with pytest.raises(ValueError, match="badam_mode: ratio with fp16") as error:
        BAdamCallback().on_train_begin(SimpleNamespace(fp16=True), None, None, model=model, optimizer=opt)
    assert str(error.value) == RATIO_FP16

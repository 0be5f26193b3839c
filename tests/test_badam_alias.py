"""The `badam` names LLaMA-Factory imports, served by badam_kernels (badam_alias), and the
temporary `badam` package of `python -m badam_kernels.llamafactory`; no LLaMA-Factory needed
(tests/test_llamafactory.py runs LLaMA-Factory itself)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from types import MethodType, SimpleNamespace

import pytest
import torch
from llama_tiny import build_tiny_llama, text_batch

import badam_kernels
from badam_kernels import llamafactory
from badam_kernels.badam_alias import BAdamCallback, clip_grad_norm_old_version
from badam_kernels.badam_compat import BlockOptimizer

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
from badam import BAdamCallback, BlockOptimizer, clip_grad_norm_old_version
grandchild = subprocess.run(
    [sys.executable, "-c", "import importlib.metadata as m; print(m.version('badam'))"],
    capture_output=True, text=True, check=True).stdout.strip()
print(json.dumps({"version": importlib.metadata.version("badam"), "module": badam.__name__,
                  "same_class": BlockOptimizer is badam_kernels.BlockOptimizer,
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


def test_ratio_mode_without_block_optimizer_ratio_fails_clearly(monkeypatch):
    monkeypatch.delattr(badam_kernels, "BlockOptimizerRatio", raising=False)
    with pytest.raises(
        NotImplementedError, match="badam_mode: ratio needs badam_kernels.BlockOptimizerRatio"
    ):
        from badam_kernels.badam_alias import BlockOptimizerRatio  # noqa: F401
    with pytest.raises(AttributeError):
        badam_kernels.badam_alias.NoSuchName  # noqa: B018


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


def _parameters(sparse: bool) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in [(7, 5), (3,), (11, 4)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        grad = torch.randn(shape, generator=generator)
        if sparse and len(shape) == 2:  # rows of an embedding-like tensor, as badam's ratio mode leaves
            grad[::2] = 0
            grad = grad.to_sparse()
        p.grad = grad
        params.append(p)
    params.append(torch.nn.Parameter(torch.ones(2)))  # no gradient: skipped
    return params


def _reference_clip(params, max_norm: float, norm_type: float):
    """fp64: the total norm of all gradients and the clipped gradients, dense."""
    grads = [p.grad.to_dense().double() for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    total = (
        flat.abs().max() if norm_type == float("inf") else flat.abs().pow(norm_type).sum() ** (1 / norm_type)
    )
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    return total, [g * coef for g in grads]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipping, and not
@pytest.mark.parametrize("sparse", [False, True])
def test_clip_grad_norm_old_version_bound_like_llamafactory(sparse, max_norm, norm_type):
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.clip_grad_norm_ = MethodType(clip_grad_norm_old_version, accelerator)  # as LLaMA-Factory
    params = _parameters(sparse)
    total, clipped = _reference_clip(params, max_norm, norm_type)
    returned = accelerator.clip_grad_norm_(iter(params), max_norm, norm_type=norm_type)
    torch.testing.assert_close(returned.double(), total, rtol=1e-6, atol=0)
    grads = [p.grad for p in params if p.grad is not None]
    assert [g.is_sparse for g in grads] == [sparse, False, sparse]
    for grad, expected in zip(grads, clipped):
        torch.testing.assert_close(grad.to_dense().double(), expected, rtol=1e-6, atol=1e-7)

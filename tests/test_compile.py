"""torch.compile with BlockAdamW: compile_layers (regional compilation) compiles a bounded number of
graphs over a full pass of block switches, never falls back to eager and trains as eager does; a
whole-model compile is warned about. Graphs are compiled with torch's "aot_eager" backend (AOT
autograd traces the joint forward-backward graph, as inductor does, where a graph reused for a
block it was not traced for would drop gradients; no code generation, to keep the tests fast: the
real inductor runs in bench/bench_compile.py), counted with dynamo's counters, and a fallback
past the recompile limit is made an error (fail_on_recompile_limit_hit)."""

from __future__ import annotations

import warnings

import pytest
import torch
from llama_tiny import text_batch
from torch._dynamo.utils import counters

from badam_kernels import BlockAdamW, compile_layers

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning"),
]
LAYERS = 12
# Dynamo graphs compiled over the first steps, measured (torch 2.11 and 2.13, transformers 5.17 and
# 5.23, two sequence lengths): 3-4 without checkpointing (a frozen layer below the active block,
# the active layer, a frozen layer above it; dynamic-shape variants), 6-13 under checkpointing
# (recompute and resumed graphs). Then none for the rest of the run: the count must not grow with
# the number of blocks.
MAX_GRAPHS = 16
GRAPHS_COMPLETE_AFTER_STEPS = 3


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _llama(num_layers: int = LAYERS):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16).train()


def _train(model, passes: int, after_step=lambda: None, seq_lens=(16, 24)) -> list[float]:
    """`passes` passes over every block (embedding first, head last), one step each."""
    opt = BlockAdamW(
        model, lr=1e-2, switch_every=1, switch_mode="ascending", include_embedding=True,
        include_lm_head=True, verbose=0,
    )  # fmt: skip
    losses = []
    for step in range(passes * opt.num_blocks):
        tokens = text_batch(step, batch_size=2, seq_len=seq_lens[step % len(seq_lens)])
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
        after_step()
    return losses


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def _compiled_non_reentrant_call_checkpoint_fails() -> bool:
    """torch < 2.13 with a transformers that checkpoints a layer's whole __call__ (before 5.23):
    a compiled layer under a non-reentrant checkpoint fails in backward (CheckpointError) once
    requires_grad changes, with or without BlockAdamW (measured: torch 2.11 + transformers 5.17
    fails at the third step of a plain requires_grad toggle; 2.11 + 5.23 and 2.13 + 5.17 pass)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    old_torch = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)
    return old_torch and GradientCheckpointingLayer.__call__ is not torch.nn.Module.__call__


@pytest.mark.parametrize("checkpointing", ["none", "reentrant", "non_reentrant"])
def test_compiled_layers_serve_every_block(fresh_dynamo, checkpointing):
    eager = _llama()
    compiled = _llama()
    if checkpointing != "none":
        for model in (eager, compiled):
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
            )
    assert compile_layers(compiled, backend="aot_eager") == [f"model.layers.{i}" for i in range(LAYERS)]
    if checkpointing == "non_reentrant" and _compiled_non_reentrant_call_checkpoint_fails():
        # Refused at the first forward with a layer block active (after the embedding block's
        # step), before that layer's backward or update.
        layers = compiled.model.layers
        before = [p.detach().clone() for p in layers.parameters()]
        with pytest.raises(RuntimeError, match="use_reentrant': True"):
            _train(compiled, passes=1)
        assert all(torch.equal(a, p) for a, p in zip(before, layers.parameters()))
        return
    graphs_after_step = []
    losses = _train(compiled, passes=2, after_step=lambda: graphs_after_step.append(_graphs()))
    # Two passes over 14 blocks (embedding, 12 layers, head): 27 block switches, and every graph
    # exists after the first few steps.
    assert 2 <= graphs_after_step[-1] <= MAX_GRAPHS
    assert graphs_after_step[GRAPHS_COMPLETE_AFTER_STEPS - 1] == graphs_after_step[-1], graphs_after_step
    eager_losses = _train(eager, passes=2)
    # Measured equal to the last bit here (aot_eager runs the same CPU kernels); the tolerance
    # leaves room for decompositions that round differently elsewhere. A graph traced for another
    # block would leave the active block without gradient (step() raises) or train the wrong
    # one: the losses move by ~0.05 per step at this lr (0.45 over the run).
    torch.testing.assert_close(losses, eager_losses, rtol=0, atol=1e-3)


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_whole_model_compile_is_warned_about_at_construction(fresh_dynamo, how):
    """Dynamo specializes on which parameters require grad: a whole-model compile recompiles
    the whole model at each block switch (torch 2.13), or reuses a graph traced for another
    block, which then gets no gradient (torch 2.11); see bench/RESULTS.md."""
    model = _llama(num_layers=2)
    if how == "model.compile()":
        model.compile(backend="aot_eager")
    else:
        model = torch.compile(model, backend="aot_eager")
    with pytest.warns(UserWarning, match="compile_layers"):
        BlockAdamW(model, lr=1e-3, verbose=0)


def test_compiled_wrapper_of_the_model_is_warned_about_at_the_first_forward(fresh_dynamo):
    """torch.compile(model) after the optimizer was built on `model`: the first forward traces
    the model's hooks, and the cut's hook says so."""
    model = _llama(num_layers=2)
    opt = BlockAdamW(model, lr=1e-3, switch_mode="fixed", start_block=1, verbose=0)  # noqa: F841
    compiled = torch.compile(model, backend="eager")
    tokens = text_batch(0, batch_size=2, seq_len=16)
    with pytest.warns(UserWarning, match="whole-model torch.compile"):
        compiled(input_ids=tokens, labels=tokens)


def test_regionally_compiled_model_is_not_warned_about(fresh_dynamo):
    model = _llama(num_layers=2)
    compile_layers(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = BlockAdamW(model, lr=1e-3, verbose=0)
        tokens = text_batch(0, batch_size=2, seq_len=16)
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()


def test_compile_layers_refuses_what_it_cannot_do():
    model = _llama(num_layers=2)
    with pytest.raises(ValueError, match="compiled as a whole"):
        compile_layers(torch.compile(model, backend="eager"))
    with pytest.raises(ValueError, match="no transformer layers"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    model.config.use_cache = True
    with pytest.warns(UserWarning, match="use_cache"):
        compile_layers(model, backend="eager")

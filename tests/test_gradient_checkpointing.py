"""Gradient checkpointing with BlockAdamW: the active block gets the gradients it gets without
checkpointing (reentrant and non-reentrant), and backward does no work below it: Hugging Face
layers under both ways transformers wraps them (the layer's forward from 5.23, its whole __call__
in 5.17: run this file in both), checkpointing enabled after the optimizer was built, GPT-2, and a
custom model that calls torch.utils.checkpoint itself.

Gradients and iterates are compared bit for bit: checkpointing recomputes the same ops on the same
inputs, and the active block's gradients come from the same ops with or without the cut, so both
sides round alike on any CPU (torch's CPU kernels give the same bits for the same shapes, inputs
and thread count); a tolerance would hide a recomputation that differs."""

from __future__ import annotations

import gc

import pytest
import torch
from llama_tiny import build_tiny_llama, text_batch
from optim_models import TinyNet, net_loss

from badam_kernels.optim import BlockAdamW

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*fp32.*:UserWarning"),  # tiny fp32 model: exact comparisons
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning"),
    # Reentrant checkpoints of the frozen layers below the active one say so; nothing is lost.
    pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning"),
]
LAYERS, ACTIVE = 4, 2
MODES = ["none", "reentrant", "non_reentrant"]


def _model(mode: str, frozen_input: bool = False):
    model = build_tiny_llama(dtype=torch.float32, num_layers=LAYERS)
    model.train()
    if mode != "none":
        # transformers also makes the embedding output require grad here (enable_input_require_grads)
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"}
        )
        if frozen_input:
            model.disable_input_require_grads()
    return model


def _optimizer(model, **kwargs):
    return BlockAdamW(model, lr=1e-3, switch_mode="fixed", start_block=ACTIVE, verbose=0, **kwargs)


def _loss(model):
    tokens = text_batch(0, batch_size=2, seq_len=32)
    return model(input_ids=tokens, labels=tokens).loss


def _reference_grads() -> dict[str, torch.Tensor]:
    """Plain autograd, every parameter trainable, no checkpointing, no optimizer."""
    model = _model("none")
    _loss(model).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _probe(model):
    """Count q_proj calls per layer (a checkpointed layer runs again in backward, a layer that
    backward never reaches runs once) and gradients arriving at the embedding output."""
    calls = [0] * LAYERS
    embedding_grads = []
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    def watch_embedding(module, args, output):
        if output.requires_grad:
            output.register_hook(embedding_grads.append)

    model.model.embed_tokens.register_forward_hook(watch_embedding)
    return calls, embedding_grads


@pytest.mark.parametrize("frozen_input", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_active_block_gets_the_same_gradients(mode, frozen_input):
    reference = _reference_grads()
    model = _model(mode, frozen_input)
    opt = _optimizer(model)  # noqa: F841 (the cut lives as long as the optimizer)
    _loss(model).backward()
    for name, p in model.named_parameters():
        if name.startswith(f"model.layers.{ACTIVE}."):
            torch.testing.assert_close(p.grad, reference[name], rtol=0, atol=0, msg=name)
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_backward_stops_at_the_active_block(mode):
    model = _model(mode)
    opt = _optimizer(model)  # noqa: F841 (the cut lives as long as the optimizer)
    calls, embedding_grads = _probe(model)
    _loss(model).backward()
    assert calls == [1] * ACTIVE + [2] * (LAYERS - ACTIVE)  # nothing below ACTIVE is recomputed
    assert embedding_grads == []


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_without_the_cut_backward_runs_through_the_frozen_layers(mode):
    """What truncate_backward saves: transformers' checkpointing makes the embedding output
    require grad, so backward recomputes every frozen layer below the active one."""
    model = _model(mode)
    opt = _optimizer(model, truncate_backward=False)  # noqa: F841
    calls, embedding_grads = _probe(model)
    _loss(model).backward()
    assert calls == [2] * LAYERS
    assert len(embedding_grads) == 1


def test_cut_follows_the_block_switches():
    model = _model("reentrant", frozen_input=True)
    opt = BlockAdamW(model, lr=1e-3, switch_every=1, switch_mode="descending", verbose=0)
    for _ in range(LAYERS):
        block = opt.active_block
        calls, _ = _probe(model)
        _loss(model).backward()
        assert calls == [1] * block + [2] * (LAYERS - block)
        opt.step()


def test_reentrant_without_the_cut_trains_nothing_loudly():
    """The configuration the cut repairs: reentrant checkpoints, nothing below requires grad.
    torch warns and the active block gets no gradient; with only the block trainable the loss
    has no graph at all."""
    model = _model("reentrant", frozen_input=True)
    opt = _optimizer(model, truncate_backward=False)  # noqa: F841
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        loss = _loss(model)
    assert not loss.requires_grad


def test_cut_stays_off_when_the_embedding_trains():
    model = _model("reentrant")
    opt = BlockAdamW(model, lr=1e-3, switch_mode="fixed", include_embedding=True, start_block=0, verbose=0)
    assert opt._backward_cut.cut_module is None
    _loss(model).backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_head_block_needs_no_backward_through_the_layers():
    model = _model("non_reentrant")
    opt = BlockAdamW(model, lr=1e-3, switch_mode="fixed", include_lm_head=True, start_block=LAYERS, verbose=0)
    assert opt._backward_cut.cut_module == "model.norm"
    calls, embedding_grads = _probe(model)
    _loss(model).backward()
    assert calls == [1] * LAYERS and embedding_grads == []
    assert model.lm_head.weight.grad is not None and model.model.norm.weight.grad is not None


def _train(mode: str, update_in_backward: bool) -> list[torch.Tensor]:
    model = _model(mode)
    opt = BlockAdamW(model, lr=1e-3, switch_every=2, update_in_backward=update_in_backward, verbose=0)
    for step in range(6):  # three blocks
        tokens = text_batch(step, batch_size=2, seq_len=32)
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("update_in_backward", [False, True])
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_training_under_checkpointing_matches_plain_training(mode, update_in_backward):
    for a, b in zip(_train("none", update_in_backward=False), _train(mode, update_in_backward)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointing_enabled_after_the_optimizer(mode):
    """The Trainer enables checkpointing inside train(), after the optimizer was built: the cut
    must reach the checkpoint function set then (transformers 5.17 checkpoints the layer's
    whole __call__, so only a cut made before the checkpoint call works there)."""
    reference = _reference_grads()
    model = _model("none")
    opt = _optimizer(model)  # noqa: F841
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    model.disable_input_require_grads()
    calls, embedding_grads = _probe(model)
    _loss(model).backward()
    assert calls == [1] * ACTIVE + [2] * (LAYERS - ACTIVE)
    assert embedding_grads == []
    for name, p in model.named_parameters():
        if name.startswith(f"model.layers.{ACTIVE}."):
            torch.testing.assert_close(p.grad, reference[name], rtol=0, atol=0, msg=name)


def test_discarded_optimizer_leaves_the_model_as_it_was():
    model = _model("reentrant")
    layer = model.model.layers[ACTIVE]
    checkpoint_function = layer._gradient_checkpointing_func
    opt = _optimizer(model)
    _loss(model)  # installs the cut in front of the checkpoint
    assert layer._gradient_checkpointing_func is not checkpoint_function
    del opt
    gc.collect()
    assert layer._gradient_checkpointing_func is checkpoint_function
    assert not layer._forward_pre_hooks and not model._forward_pre_hooks and not model._forward_hooks
    calls, embedding_grads = _probe(model)
    _loss(model).backward()
    assert calls == [2] * LAYERS and len(embedding_grads) == 1  # transformers' own behaviour again


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=LAYERS, n_head=2)
    return GPT2LMHeadModel(config).train()


def test_gpt2_under_reentrant_checkpointing_with_frozen_inputs():
    reference_model = _tiny_gpt2()
    tokens = text_batch(0, batch_size=2, seq_len=32)
    reference_model(input_ids=tokens, labels=tokens).loss.backward()
    model = _tiny_gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    opt = BlockAdamW(model, lr=1e-3, switch_mode="fixed", start_block=ACTIVE, verbose=0)  # noqa: F841
    calls = [0] * LAYERS
    for i, block in enumerate(model.transformer.h):
        block.attn.c_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert calls == [1] * ACTIVE + [2] * (LAYERS - ACTIVE)
    for (name, p), (_, q) in zip(model.named_parameters(), reference_model.named_parameters()):
        if name.startswith(f"transformer.h.{ACTIVE}."):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
        else:
            assert p.grad is None, name


# ---- a custom model that calls torch.utils.checkpoint itself ---------------------------------------


class ManuallyCheckpointedNet(TinyNet):
    """TinyNet whose forward checkpoints every layer with torch.utils.checkpoint."""

    def __init__(self, use_reentrant: bool, input_requires_grad: bool = False) -> None:
        super().__init__(num_layers=LAYERS)
        self.use_reentrant = use_reentrant
        self.input_requires_grad = input_requires_grad

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        if self.input_requires_grad:
            h.requires_grad_()
        for layer in self.layers:
            h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=self.use_reentrant)
        return self.lm_head(self.norm(h))


def _manual_run(use_reentrant: bool, input_requires_grad: bool = False, **options):
    """(layer calls, gradients of the active block) of one backward under BlockAdamW."""
    torch.manual_seed(0)
    model = ManuallyCheckpointedNet(use_reentrant, input_requires_grad).train()
    opt = BlockAdamW(model, lr=1e-3, switch_mode="fixed", start_block=ACTIVE, verbose=0, **options)
    calls = [0] * LAYERS
    for i, layer in enumerate(model.layers):
        layer.fc.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    net_loss(model, 0).backward()
    return calls, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, opt


def _manual_reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyNet(num_layers=LAYERS)
    net_loss(model, 0).backward()
    return {name: p.grad for name, p in model.named_parameters() if name.startswith(f"layers.{ACTIVE}.")}


def test_manual_non_reentrant_checkpoint_trains_the_block_and_stops_there():
    calls, grads, _ = _manual_run(use_reentrant=False)
    assert calls == [1] * ACTIVE + [2] * (LAYERS - ACTIVE)
    reference = _manual_reference()
    assert grads.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=0, atol=0, msg=name)


def test_manual_reentrant_checkpoint_with_input_that_requires_grad_is_correct_but_recomputes_all():
    """What the cut cannot reach: the model's own checkpoint call takes h before any hook runs,
    so backward recomputes the frozen layers below (documented), but the gradients are right."""
    calls, grads, _ = _manual_run(use_reentrant=True, input_requires_grad=True)
    assert calls == [2] * LAYERS
    reference = _manual_reference()
    assert grads.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=0, atol=0, msg=name)


def test_manual_reentrant_checkpoint_with_frozen_input_fails_in_forward_with_the_fix():
    torch.manual_seed(0)
    model = ManuallyCheckpointedNet(use_reentrant=True).train()
    opt = BlockAdamW(model, lr=1e-3, switch_mode="fixed", start_block=ACTIVE, verbose=0)  # noqa: F841
    expected = r"active layer 'layers.2' ran with gradients disabled.*use_reentrant=False"
    with pytest.raises(RuntimeError, match=expected):
        net_loss(model, 0)
    with torch.no_grad():  # an evaluation forward in training mode is not a training forward
        net_loss(model, 0)


def test_manual_reentrant_checkpoint_with_frozen_input_and_a_trained_head_fails_in_step():
    """With an always-active head the loss has a graph, so forward cannot tell; step() finds the
    block without gradient and says why."""
    calls, grads, opt = _manual_run(use_reentrant=True, always_active=["lm_head."])
    assert set(grads) == {"lm_head.weight"}
    expected = r"no gradient.*Seen in the last forward.*'layers.2' ran with grad"
    with pytest.raises(RuntimeError, match=expected):
        opt.step()

"""enable_chunked_loss (badam_kernels.hf) on transformers models: the same loss and gradients as
the plain model for every supported family, transformers' label conventions, the outputs a user
sees, clear refusals, and training (BlockAdamW with gradient checkpointing, the backward cut and
update_in_backward; the Trainer with gradient accumulation) that follows the plain run.

Single forward/backward comparisons in fp32 use assert_close at rtol 1e-5 (the two paths differ by
summation order only). bf16 uses the fp64-relative criterion of test_chunked_loss.py.
"""

from __future__ import annotations

import types

import pytest
import torch
import transformers
from llama_tiny import build_tiny_llama, text_batch
from test_hf_trainer import ByteWindows
from test_hf_trainer import _args as trainer_arguments
from transformers import Trainer, TrainerCallback

from badam_kernels.hf import BlockAdamWCallback, ChunkedLossHead, disable_chunked_loss, enable_chunked_loss
from badam_kernels.optim import BlockAdamW

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*fp32.*:UserWarning"),  # BlockAdamW on fp32 test models
    pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
]
CHUNK = 7  # 3 x 33 tokens, some ignored: many chunks and a partial one
FAMILIES = {
    "llama": lambda: build_tiny_llama(dtype=torch.float32),
    "mistral": lambda: _tiny("MistralConfig", "MistralForCausalLM"),
    "qwen2": lambda: _tiny("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": lambda: _tiny("Qwen3Config", "Qwen3ForCausalLM", head_dim=16),
    "gpt2": lambda: _tiny("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "llama-tied": lambda: _tiny("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True),
}


def _tiny(config_name: str, model_name: str, **overrides):
    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    if config_name == "GPT2Config":
        settings = dict(
            vocab_size=256, bos_token_id=0, eos_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
        )
    config = getattr(transformers, config_name)(**{**settings, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).float()


def _batch(seq_len: int = 33):
    tokens = text_batch(0, batch_size=3, seq_len=seq_len)
    labels = tokens.clone()
    labels[0, :10] = -100  # a prompt that is not trained on
    labels[2, -4:] = -100  # padding
    return tokens, labels


def _pair(build):
    plain, chunked = build(), build()
    chunked.load_state_dict(plain.state_dict())
    return plain, enable_chunked_loss(chunked, chunk_size=CHUNK)


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(plain, chunked, rtol=1e-5, atol=1e-7):
    expected, actual = _grads(plain), _grads(chunked)
    assert set(actual) == set(expected) and expected
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_loss_and_gradients_as_the_plain_model(family):
    plain, chunked = _pair(FAMILIES[family])
    assert isinstance(chunked.lm_head, ChunkedLossHead)
    tokens, labels = _batch()
    expected = plain(input_ids=tokens, labels=labels).loss
    loss = chunked(input_ids=tokens, labels=labels).loss
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    expected.backward()
    loss.backward()
    _assert_same_grads(plain, chunked)


def _relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


def test_bf16_model_within_the_plain_model_rounding():
    """Each gradient's error against the fp64 model is at most twice the plain bf16 model's."""
    tokens, labels = _batch()
    errors = {}
    for name, dtype, chunk_size in (
        ("exact", torch.float64, None),
        ("plain", torch.bfloat16, None),
        ("chunked", torch.bfloat16, CHUNK),
    ):
        model = build_tiny_llama(dtype=torch.float32).to(dtype)
        if chunk_size:
            enable_chunked_loss(model, chunk_size=chunk_size)
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        errors[name] = {"loss": loss.detach(), **_grads(model)}
    exact = errors.pop("exact")
    for key in exact:
        plain = _relative_error(errors["plain"][key], exact[key])
        ours = _relative_error(errors["chunked"][key], exact[key])
        assert ours <= 2 * plain + 1e-4, (key, ours, plain)


def test_transformers_loss_arguments():
    """shift_labels, ignore_index and num_items_in_batch mean what they mean to ForCausalLMLoss."""
    plain, chunked = _pair(FAMILIES["llama"])
    tokens, labels = _batch()
    shifted = torch.roll(labels, -1, dims=1)
    shifted[:, -1] = -100
    for kwargs in (
        dict(labels=labels, num_items_in_batch=torch.tensor(150)),
        dict(labels=labels, num_items_in_batch=150),
        dict(labels=labels, shift_labels=shifted.flip(1)),  # shift_labels wins over labels
        dict(labels=tokens, ignore_index=int(tokens[0, 5])),
    ):
        expected = plain(input_ids=tokens, **kwargs).loss
        loss = chunked(input_ids=tokens, **kwargs).loss
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0, msg=str(kwargs.keys()))
        expected.backward()
        loss.backward()
        _assert_same_grads(plain, chunked)


def test_outputs_without_logits_only_when_labels_are_given():
    plain, chunked = _pair(FAMILIES["llama"])
    tokens, labels = _batch()
    out = chunked(input_ids=tokens, labels=labels)
    assert out.logits is None and "logits" not in out.keys()
    # labels and use_cache=False by position; a tuple without logits (and without a cache)
    as_tuple = chunked(tokens, None, None, None, None, labels, False, return_dict=False)
    assert len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(chunked(input_ids=tokens).logits, plain(input_ids=tokens).logits)


def test_enable_twice_changes_the_chunk_size_and_disable_restores():
    model = enable_chunked_loss(build_tiny_llama(dtype=torch.float32), chunk_size=5)
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    assert enable_chunked_loss(model, chunk_size=9) is model
    assert (
        model.lm_head.chunk_size == 9 and (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    )
    tokens, labels = _batch()
    chunked_loss = model(input_ids=tokens, labels=labels).loss
    disable_chunked_loss(model)
    assert (
        type(model.lm_head) is torch.nn.Linear and not model._forward_pre_hooks and not model._forward_hooks
    )
    out = model(input_ids=tokens, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, chunked_loss, rtol=1e-6, atol=0)
    assert set(model.state_dict()) == set(build_tiny_llama(dtype=torch.float32).state_dict())


def test_a_failed_forward_leaves_no_labels_behind():
    model = enable_chunked_loss(build_tiny_llama(dtype=torch.float32))
    tokens, labels = _batch()
    with pytest.raises(ValueError, match="labels of shape"):
        model(input_ids=tokens, labels=labels[:, :-1])
    assert model.lm_head.pending is None
    assert model(input_ids=tokens).logits.shape == (3, 33, 256)


def test_peft_lora_model():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    plain = get_peft_model(build_tiny_llama(dtype=torch.float32), lora)
    chunked = get_peft_model(build_tiny_llama(dtype=torch.float32), lora)
    chunked.load_state_dict(plain.state_dict())
    assert enable_chunked_loss(chunked, chunk_size=CHUNK) is chunked
    tokens, labels = _batch()
    expected, loss = (
        plain(input_ids=tokens, labels=labels).loss,
        chunked(input_ids=tokens, labels=labels).loss,
    )
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    expected.backward()
    loss.backward()
    _assert_same_grads(plain, chunked)
    assert chunked(input_ids=tokens, labels=labels).logits is None


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, "64"])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        enable_chunked_loss(build_tiny_llama(dtype=torch.float32), chunk_size=chunk_size)


def test_model_without_lm_head_is_refused():
    model = build_tiny_llama(dtype=torch.float32).model  # LlamaModel: hidden states only
    with pytest.raises(TypeError, match="no lm_head"):
        enable_chunked_loss(model)


def test_model_that_changes_its_logits_is_refused():
    config = transformers.Gemma2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        final_logit_softcapping=30.0,
    )
    with pytest.raises(TypeError, match="not Gemma2ForCausalLM.*soft-capping"):
        enable_chunked_loss(transformers.Gemma2ForCausalLM(config))


def test_replaced_forward_is_refused():
    """Liger-Kernel patches forward (on the class or the instance) with its own fused loss."""
    model = build_tiny_llama(dtype=torch.float32)
    model.forward = types.MethodType(lambda self, **kwargs: None, model)
    with pytest.raises(TypeError, match="not transformers' own.*Liger"):
        enable_chunked_loss(model)


def _training_model(chunked: bool, checkpointing: str | None = "non_reentrant"):
    """The tiny fp32 Llama in training mode, with gradient checkpointing and the chunked loss."""
    model = build_tiny_llama(dtype=torch.float32)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
    if chunked:
        enable_chunked_loss(model, chunk_size=CHUNK)
    return model


def _assert_same_run(losses, weights, plain_losses, plain_weights) -> None:
    """Losses within rtol 1e-5; final weights within 1e-3 of the distance the plain run moved
    them from the common start."""
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-5, atol=0)
    start = [p.detach() for p in build_tiny_llama(dtype=torch.float32).parameters()]
    moved = torch.cat([(w - s).flatten() for w, s in zip(plain_weights, start)]).norm()
    distance = torch.cat([(a - b).flatten() for a, b in zip(weights, plain_weights)]).norm()
    assert moved > 0.05 and distance <= 1e-3 * moved


def _train_blocks(chunked: bool, checkpointing: str | None, update_in_backward: bool, steps: int = 10):
    """BlockAdamW through every block (4 layers, then the head: include_lm_head), one step each,
    two passes. Returns the losses and the final weights."""
    model = _training_model(chunked, checkpointing)
    optimizer = BlockAdamW(
        model,
        lr=1e-3,
        switch_every=1,
        switch_mode="ascending",
        include_lm_head=True,
        update_in_backward=update_in_backward,
        verbose=0,
    )
    losses = []
    for step in range(steps):
        tokens = text_batch(step, batch_size=2, seq_len=33)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize(
    "checkpointing, update_in_backward", [(None, False), ("reentrant", True), ("non_reentrant", True)]
)
def test_block_training_follows_the_plain_model(checkpointing, update_in_backward):
    """Criterion (_assert_same_run): the runs differ by fp32 summation order, which Adam's
    normalisation amplifies where a gradient is near zero. Measured here: losses 1.9e-7 apart
    (relative), weights 1.5e-5 of the movement. Defects fail: a denominator off by one token
    shifts the losses by 1.5e-2 (Adam's invariance to a gradient's scale hides it in the weights:
    1.6e-4), a dropped head weight gradient by 1.1e-2 and the weights by 0.45 of the movement."""
    plain = _train_blocks(False, checkpointing, update_in_backward)
    _assert_same_run(*_train_blocks(True, checkpointing, update_in_backward), *plain)


def test_head_block_backward_stays_in_the_head():
    """With the head block active, BlockAdamW's cut keeps backward out of the layers, chunked
    loss or not: under checkpointing no layer runs a second time."""
    model = _training_model(chunked=True)
    optimizer = BlockAdamW(
        model, lr=1e-3, switch_mode="fixed", include_lm_head=True, start_block=4, verbose=0
    )
    calls = []
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda *_: calls.append(1))
    tokens, labels = _batch()
    model(input_ids=tokens, labels=labels).loss.backward()
    assert len(calls) == 4  # forward only
    assert (
        set(_grads(model))
        == set(optimizer.active_parameter_names())
        == {"lm_head.weight", "model.norm.weight"}
    )


class RecordLossArguments(TrainerCallback):
    """The num_items_in_batch the Trainer hands the model (gradient accumulation)."""

    def __init__(self) -> None:
        self.num_items = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(
            lambda module, a, kw: self.num_items.append(kw.get("num_items_in_batch")),
            with_kwargs=True,
            prepend=True,
        )


def test_trainer_run_equals_the_plain_run(tmp_path):
    """The Trainer with gradient accumulation (it passes num_items_in_batch), checkpointing and
    update_in_backward: the same logged losses and weights as without the chunked loss
    (_assert_same_run).
    Measured: losses 8.7e-8 apart, weights 4.4e-6 of the movement; dividing by the micro-batch's
    own token count instead of num_items_in_batch puts the losses 1.0 apart, and a count off by
    one token 8e-3."""
    runs = {}
    for chunked in (False, True):
        model = _training_model(chunked)
        optimizer = BlockAdamW(
            model,
            lr=1e-3,
            switch_every=2,
            switch_mode="random",
            include_lm_head=True,
            update_in_backward=True,
            gradient_accumulation_steps=2,
            verbose=0,
        )
        probe = RecordLossArguments()
        args = trainer_arguments(tmp_path / str(chunked), max_steps=8, max_grad_norm=0.0)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=ByteWindows(32),
            optimizers=(optimizer, None),
            callbacks=[BlockAdamWCallback(), probe],
        )
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[chunked] = losses, [p.detach() for p in model.parameters()], probe.num_items
    (plain_losses, plain_weights, _), (losses, weights, num_items) = runs[False], runs[True]
    assert len(losses) == 8 and all(torch.is_tensor(n) and n > 0 for n in num_items)
    _assert_same_run(losses, weights, plain_losses, plain_weights)

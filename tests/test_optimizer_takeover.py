"""One model, one optimizer acting on it: a new BlockAdamW (or BlockOptimizer) built on parameters
of an older one that is still alive (an LR scheduler holds it) takes over. The old one's backward
cut, update-in-backward hooks and gradient-sync hooks leave the model, it warns, and the old
optimizer refuses to step. References are plain autograd gradients and single-optimizer runs."""

from __future__ import annotations

import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
from llama_tiny import text_batch
from optim_models import make_net, train

from badam_kernels import BlockAdamW, BlockOptimizer, BlockOptimizerRatio

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*fp32.*:UserWarning"),  # fp32 models: exact gradients
]
CONFIG = dict(lr=1e-2, switch_mode="fixed", verbose=0)
TAKE_OVER = "takes over"
REPLACED = "replaced by a newer optimizer"


def _tied_llama(num_layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def _llama_loss(model):
    tokens = text_batch(0, batch_size=2, seq_len=16)
    return model(input_ids=tokens, labels=tokens).loss


def _reference_grads(model_fn) -> dict[str, torch.Tensor]:
    model = model_fn()
    _llama_loss(model).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_tied_embedding_gets_its_whole_gradient_after_a_new_optimizer():
    """The issue's case: the old optimizer's cut at layer 2 withheld the gradient that reaches the
    tied embedding through the layers (norm 0.722 instead of 1.111)."""
    reference = _reference_grads(_tied_llama)
    model = _tied_llama()
    old = BlockAdamW(model, start_block=2, **CONFIG)
    scheduler = torch.optim.lr_scheduler.LambdaLR(old, lambda step: 1.0)  # keeps `old` alive
    with pytest.warns(UserWarning, match=TAKE_OVER):
        new = BlockAdamW(model, include_embedding=True, start_block=0, **CONFIG)
    assert new.active_parameter_names() == ["model.embed_tokens.weight"]
    _llama_loss(model).backward()
    embedding = model.model.embed_tokens.weight
    assert embedding is model.lm_head.weight  # tied
    torch.testing.assert_close(embedding.grad, reference["model.embed_tokens.weight"], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=REPLACED):
        old.step()
    new.step()
    del scheduler


def test_new_active_layer_below_the_old_cut_gets_its_gradient():
    reference = _reference_grads(_tied_llama)
    model = _tied_llama()
    old = BlockAdamW(model, start_block=2, **CONFIG)
    with pytest.warns(UserWarning, match=TAKE_OVER):
        new = BlockAdamW(model, start_block=0, **CONFIG)
    _llama_loss(model).backward()
    for name, p in model.named_parameters():
        if name.startswith("model.layers.0."):
            torch.testing.assert_close(p.grad, reference[name], rtol=0, atol=0, msg=name)
        else:
            assert p.grad is None, name
    new.step()
    del old


def test_replaced_optimizer_does_not_touch_the_model_any_more():
    """load_state_dict would switch blocks (requires_grad) under the new optimizer's feet."""
    model = make_net(dtype=torch.float32)
    old = BlockAdamW(model, start_block=1, **CONFIG)
    saved = old.state_dict()
    with pytest.warns(UserWarning, match=TAKE_OVER):
        BlockAdamW(model, start_block=0, **CONFIG)
    requires_grad = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match=REPLACED):
        old.load_state_dict(saved)
    assert [p.requires_grad for p in model.parameters()] == requires_grad


def test_old_update_in_backward_hooks_leave_the_parameters():
    """The live old optimizer's hooks would update the parameters from the new one's gradients
    and free them before the new one's step()."""
    options = dict(CONFIG, switch_mode="ascending", switch_every=2)
    expected = make_net()
    train(expected, BlockAdamW(expected, **options), steps=5)
    model = make_net()
    old = BlockAdamW(model, update_in_backward=True, **options)
    with pytest.warns(UserWarning, match=TAKE_OVER):
        new = BlockAdamW(model, **options)
    train(model, new, steps=5)
    for a, b in zip(expected.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(old.state) == 0


def test_drop_in_block_optimizer_takes_over_too():
    model = make_net(dtype=torch.float32)
    old = BlockAdamW(model, start_block=2, **CONFIG)
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match=TAKE_OVER):
        BlockOptimizer(base, list(model.named_parameters()), switch_mode="ascending", verbose=0)
    assert old._backward_cut is None and not any(layer._forward_pre_hooks for layer in model.layers)
    with pytest.raises(RuntimeError, match=REPLACED):
        old.step()


def test_a_discarded_optimizer_is_not_reported():
    model = make_net()
    BlockAdamW(model, **CONFIG)  # dropped at once: its hooks are gone with it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BlockAdamW(model, **CONFIG)


def test_optimizers_on_separate_models_are_independent():
    first, second = make_net(), make_net()
    opt = BlockAdamW(first, **CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BlockAdamW(second, **CONFIG)
    train(first, opt, steps=1)


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_old_gradient_sync_hooks_leave_the_parameters(tmp_path):
    """A one-process gloo group: the old optimizer's all-reduce hooks must not fire any more."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    try:
        model = make_net()
        old = BlockAdamW(model, process_group=dist.group.WORLD, **CONFIG)
        with pytest.warns(UserWarning, match=TAKE_OVER):
            new = BlockAdamW(model, process_group=dist.group.WORLD, **CONFIG)
        train(model, new, steps=2)
        assert new.gradient_sync.bytes_total > 0
        assert old.gradient_sync.bytes_total == 0
    finally:
        dist.destroy_process_group()


def _ratio(model):
    named = list(model.named_parameters())
    return BlockOptimizerRatio(
        [p for _, p in named], named, update_ratio=0.5, lr=1e-2, verbose=0, include_embedding=True,
        include_lm_head=True,
    )  # fmt: skip


def test_ratio_and_block_optimizers_take_each_other_over():
    """BlockOptimizerRatio hooks every parameter to take its gradient: a live one would consume
    (and free) the gradients a BlockAdamW built after it needs, and a BlockAdamW's cut would
    withhold gradients from a ratio optimizer built after it. Either way round the newer one takes
    over; the reference is a fresh optimizer of the same kind on the same model."""
    model = make_net()
    old_ratio = _ratio(model)
    with pytest.warns(UserWarning, match=TAKE_OVER) as record:
        new = BlockAdamW(model, **CONFIG)
    assert [w.filename for w in record if TAKE_OVER in str(w.message)] == [__file__]  # the user's line
    train(model, new, steps=2)  # gets its gradients: the ratio hooks are gone
    with pytest.raises(RuntimeError, match=REPLACED):
        old_ratio.step()

    model = make_net()
    old_block = BlockAdamW(model, start_block=2, **CONFIG)
    # The old optimizer froze its inactive blocks; the ratio optimizer, like badam's, trains what
    # requires grad when it is built.
    model.requires_grad_(True)
    with pytest.warns(UserWarning, match=TAKE_OVER) as record:
        new_ratio = _ratio(model)
    assert [w.filename for w in record if TAKE_OVER in str(w.message)] == [__file__]
    with pytest.raises(RuntimeError, match=REPLACED):
        old_block.step()
    reference_model = make_net()
    reference = _ratio(reference_model)
    for net, opt in ((model, new_ratio), (reference_model, reference)):
        train(net, opt, steps=2)
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

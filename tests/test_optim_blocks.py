"""Which parameters BlockAdamW trains, and in which block: frozen parameters stay frozen, prefixes
select whole name components, the embedding is found by module structure, tied weights train
where the user asked; the badam drop-in keeps badam's rules, and infers blocks where badam finds
none (GPT-2, T5). Tiny models built from configs, nothing downloaded."""

from __future__ import annotations

import pytest
import torch
from llama_tiny import build_tiny_llama, causal_lm_loss
from optim_models import make_net, net_loss
from torch import nn

from badam_kernels.badam_compat import BlockOptimizer
from badam_kernels.optim import BlockAdamW

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTIONS = dict(lr=1e-2, switch_mode="ascending", verbose=0)


def _block_names(opt) -> list[list[str]]:
    return [[opt._names[p] for p in block] for block in opt._blocks]


# ---- frozen stays frozen ---------------------------------------------------------------


def test_frozen_parameters_stay_frozen_through_every_block():
    model = make_net()
    model.layers[1].fc.weight.requires_grad_(False)
    for p in model.layers[2].parameters():
        p.requires_grad_(False)
    frozen = {"layers.1.fc.weight": model.layers[1].fc.weight.clone()}
    frozen.update({f"layers.2.{n}": p.clone() for n, p in model.layers[2].named_parameters()})
    opt = BlockAdamW(model, switch_every=1, **OPTIONS)
    assert opt.num_blocks == 2  # layer 2 is wholly frozen: no block for it
    assert "layers.1.fc.weight" not in _block_names(opt)[1]
    params = dict(model.named_parameters())
    for step in range(4):  # two passes over the blocks
        assert not any(params[name].requires_grad for name in frozen)
        net_loss(model, step).backward()
        assert all(params[name].grad is None for name in frozen)
        opt.step()
    assert all(torch.equal(params[name], value) for name, value in frozen.items())
    assert not torch.equal(params["layers.1.fc.bias"], make_net().layers[1].fc.bias)  # its block trained


def test_explicit_prefix_of_frozen_parameters_is_refused():
    model = make_net()
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(
        ValueError, match="always_active prefix 'lm_head' selects only frozen.*requires_grad_"
    ):
        BlockAdamW(model, always_active=["lm_head"], **OPTIONS)
    with pytest.raises(ValueError, match="'lm_head.' of blocks\\[1\\] selects only frozen"):
        BlockAdamW(model, blocks=[["layers.0."], ["lm_head."]], **OPTIONS)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter is frozen"):
        BlockAdamW(model, **OPTIONS)


def test_frozen_embedding_and_head_are_left_out_of_the_blocks_asked_for():
    model = make_net()
    model.embed_tokens.weight.requires_grad_(False)
    model.norm.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="'embed_tokens.weight', 'norm.weight' would join .* stay frozen"):
        opt = BlockAdamW(model, include_embedding=True, include_lm_head=True, **OPTIONS)
    assert _block_names(opt)[-1] == ["norm.bias", "lm_head.weight"] and opt.num_blocks == 4
    model = make_net()
    model.layers.requires_grad_(False)
    with pytest.raises(ValueError, match="every transformer layer is frozen"):
        BlockAdamW(model, **OPTIONS)


def test_second_optimizer_on_the_same_model_sees_every_block():
    """A BlockAdamW turns off requires_grad of its inactive blocks; that is not the user freezing
    them, so an optimizer built later on the model still finds every layer (and the head)."""
    model = make_net()
    first = BlockAdamW(model, **OPTIONS)
    assert not model.layers[2].fc.weight.requires_grad and not model.lm_head.weight.requires_grad
    with pytest.warns(UserWarning, match="takes over"):  # `first` is still alive
        second = BlockAdamW(model, include_lm_head=True, **OPTIONS)
    assert second.num_blocks == 4 and _block_names(second)[:3] == _block_names(first)


# ---- prefixes match whole name components ------------------------------------------------


def test_prefix_without_trailing_dot_selects_only_its_layer():
    model = make_net(num_layers=12)
    opt = BlockAdamW(model, blocks=[["layers.1"], ["layers.0."]], always_active=["layers.11"], **OPTIONS)
    assert _block_names(opt)[0] == [
        f"layers.1.{n}" for n in ("fc.weight", "fc.bias", "norm.weight", "norm.bias")
    ]
    assert [opt._names[p] for p in opt._always_active] == [
        f"layers.11.{n}" for n in ("fc.weight", "fc.bias", "norm.weight", "norm.bias")
    ]


def test_prefix_ending_inside_a_component_is_refused_with_a_hint():
    with pytest.raises(
        ValueError, match="'layers.1.f' of blocks\\[0\\] matches no.*whole name components.*'layers.1.fc"
    ):
        BlockAdamW(make_net(), blocks=[["layers.1.f"]], **OPTIONS)


def test_drop_in_keeps_badams_substring_rule():
    model = make_net(num_layers=12)
    opt = BlockOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        list(model.named_parameters()),
        block_prefix_list=[["layers.1"]],
        verbose=0,
    )
    assert {name.split(".")[1] for name in _block_names(opt)[0]} == {"1", "10", "11"}


# ---- embedding and head found by module structure ------------------------------------------


class CustomModel(nn.Module):
    """No "embed" in any name: the embedding is only recognisable by its module type."""

    def __init__(self, vocab: int = 32, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        h = self.emb(tokens)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.out(self.norm(h))


class InputEmbeddingsModel(CustomModel):
    """The input embedding is a custom module, known only through get_input_embeddings()."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.ModuleDict({"table": nn.Linear(32, 16, bias=False)})

    def get_input_embeddings(self) -> nn.Module:
        return self.tokens


def test_embedding_found_by_module_type():
    opt = BlockAdamW(CustomModel().bfloat16(), include_embedding=True, include_lm_head=True, **OPTIONS)
    assert _block_names(opt) == [
        ["emb.weight"],
        ["blocks.0.weight", "blocks.0.bias"],
        ["blocks.1.weight", "blocks.1.bias"],
        ["norm.weight", "norm.bias", "out.weight"],
    ]
    # Given only the names, "emb" is not recognisable: it lands in the head block.
    named = BlockAdamW(list(CustomModel().bfloat16().named_parameters()), include_lm_head=True, **OPTIONS)
    assert "emb.weight" in _block_names(named)[-1]


def test_embedding_found_by_get_input_embeddings():
    opt = BlockAdamW(InputEmbeddingsModel().bfloat16(), include_embedding=True, **OPTIONS)
    assert _block_names(opt)[0] == ["emb.weight", "tokens.table.weight"]


# ---- tied embeddings --------------------------------------------------------------------


def _tied_llama():
    model = build_tiny_llama(num_layers=2, hidden=32, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_tied_head_trains_in_the_head_block():
    model = _tied_llama()
    with pytest.warns(UserWarning, match="'lm_head.weight' is tied to 'model.embed_tokens.weight'"):
        opt = BlockAdamW(
            model, include_lm_head=True, start_block=2, switch_every=100, **{**OPTIONS, "lr": 1e-3}
        )
    assert opt.active_parameter_names() == ["model.embed_tokens.weight", "model.norm.weight"]
    # Its gradient is the full one, from both of its uses (plain autograd on an untouched copy).
    reference = _tied_llama()
    expected = torch.autograd.grad(causal_lm_loss(reference, 0), reference.lm_head.weight)[0]
    causal_lm_loss(model, 0).backward()
    torch.testing.assert_close(model.lm_head.weight.grad, expected, rtol=0, atol=0)
    before = model.lm_head.weight.detach().clone()
    opt.step()
    assert (model.lm_head.weight != before).float().mean() > 0.5


def test_tied_weight_with_embedding_and_head_blocks_trains_in_the_embedding_block():
    opt = BlockAdamW(_tied_llama(), include_embedding=True, include_lm_head=True, **OPTIONS)
    assert _block_names(opt)[0] == ["model.embed_tokens.weight"] and _block_names(opt)[-1] == [
        "model.norm.weight"
    ]


@pytest.mark.parametrize(
    "kwargs", [dict(always_active=["lm_head"]), dict(blocks=[["lm_head."], ["model.layers.0."]])]
)
def test_tied_head_named_explicitly(kwargs):
    with pytest.warns(UserWarning, match="'lm_head.weight' is tied to 'model.embed_tokens.weight'"):
        opt = BlockAdamW(_tied_llama(), start_block=0, **kwargs, **OPTIONS)
    assert "model.embed_tokens.weight" in opt.active_parameter_names()


def test_tied_weight_in_two_blocks_names_the_tie():
    with pytest.raises(
        ValueError, match="'model.embed_tokens.weight' \\(tied: also named 'lm_head.weight'\\) is in"
    ):
        BlockAdamW(_tied_llama(), blocks=[["model.embed_tokens."], ["lm_head"]], **OPTIONS)
    named = list(_tied_llama().named_parameters())
    with pytest.raises(ValueError, match="'lm_head' matches no parameter name.*tied.*pass the model itself"):
        BlockAdamW(named, always_active=["lm_head"], **OPTIONS)


# ---- the drop-in where badam's rule finds no layers --------------------------------------


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).bfloat16()


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=256)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).bfloat16()


@pytest.mark.parametrize(
    "build, layers",
    [
        (_gpt2, ["transformer.h.0.", "transformer.h.1."]),
        (_t5, ["encoder.block.0.", "encoder.block.1.", "decoder.block.0.", "decoder.block.1."]),
    ],
    ids=["gpt2", "t5"],
)
def test_drop_in_infers_layers_badam_cannot_find(build, layers):
    """badam 1.4's rule looks for "layers.N." only: on these names it returns no block and then
    fails on the empty list (IndexError). The drop-in infers one block per layer instead."""
    model = build()
    opt = BlockOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        list(model.named_parameters()),
        switch_block_every=2,
        switch_mode="ascending",
        verbose=0,
    )
    assert opt.num_blocks == len(layers)
    assert all(all(n.startswith(prefix) for n in block) for block, prefix in zip(_block_names(opt), layers))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": tokens} if "decoder.block.0." in layers else {}
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(4):
        model(input_ids=tokens, labels=tokens, **extra).loss.backward()
        opt.step()
    changed = {n for (n, p), b in zip(model.named_parameters(), before) if not torch.equal(p, b)}
    assert any(n.startswith(layers[0]) for n in changed)
    assert all(any(n.startswith(layer) for layer in layers) for n in changed)

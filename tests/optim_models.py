"""A small layered network with Llama-style parameter names, for fast optimizer tests."""

from __future__ import annotations

import torch
from torch import nn


class Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)  # has a bias: exercises the no-decay group
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class TinyNet(nn.Module):
    """Names: embed_tokens.weight, layers.N.fc.{weight,bias}, layers.N.norm.{weight,bias},
    norm.{weight,bias}, lm_head.weight."""

    def __init__(self, num_layers: int = 3, width: int = 16, vocab: int = 32) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Layer(width) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def make_net(dtype: torch.dtype = torch.bfloat16, seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs).to(dtype)


def net_loss(model: TinyNet, step: int, scale: float = 1.0) -> torch.Tensor:
    """Cross-entropy on a batch that is a pure function of `step`."""
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, model.lm_head.out_features, (4, 8), generator=generator)
    logits = model(tokens).float()
    return scale * nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def train(model: TinyNet, opt, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        loss = net_loss(model, step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses

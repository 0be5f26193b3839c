"""A tiny Llama and byte-level text batches, for optimizer tests (and later demos/benchmarks).

The text is Python's own standard-library source, so no download and no tokenizer are needed:
tokens are bytes (vocab 256).
"""

from __future__ import annotations

import os
import sysconfig

import torch


def build_tiny_llama(
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    num_layers: int = 4,
    hidden: int = 64,
    attention_bias: bool = False,
    tie_word_embeddings: bool = False,
):
    """A randomly initialised LlamaForCausalLM (vocab 256) in `dtype`, the same for the same seed;
    with tie_word_embeddings, lm_head.weight is model.embed_tokens.weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_bias=attention_bias,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def _stdlib_bytes(limit: int = 1 << 20) -> bytes:
    stdlib = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for name in sorted(os.listdir(stdlib)):
        if name.endswith(".py"):
            with open(os.path.join(stdlib, name), "rb") as f:
                data = f.read()
            chunks.append(data)
            total += len(data)
            if total >= limit:
                break
    return b"".join(chunks)


def text_batch(step: int, batch_size: int = 4, seq_len: int = 64) -> torch.Tensor:
    """The token batch for `step`: (batch_size, seq_len) int64, a pure function of the step."""
    data = torch.frombuffer(bytearray(_cached_text()), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()]).long()


_TEXT: bytes | None = None


def _cached_text() -> bytes:
    global _TEXT
    if _TEXT is None:
        _TEXT = _stdlib_bytes()
    return _TEXT


def causal_lm_loss(model, step: int) -> torch.Tensor:
    """Language-model loss of `model` on the batch for `step`."""
    tokens = text_batch(step)
    return model(input_ids=tokens, labels=tokens).loss

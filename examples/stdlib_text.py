"""Real text without a download: Python's standard-library sources as byte-level tokens.

Every machine with Python has several MB of its own source code, and bytes need no tokenizer
(vocabulary 256). Train and eval are split by FILE, so evaluation text is never seen in training
(a split inside the byte stream would share files, and so identifiers and docstrings, across it).

    >>> train, held_out = split_by_file(stdlib_sources("*.py", max_bytes=4 << 20), eval_every=20)
    >>> x = fixed_batches(as_tokens(train), batch_size=8, seq_len=128, count=100, seed=0)[0]
    >>> x.shape, x.dtype
    (torch.Size([8, 128]), torch.int64)
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

VOCAB_SIZE = 256  # tokens are bytes


@dataclass(frozen=True)
class SourceFile:
    """One source file: its path relative to the stdlib directory, and its bytes."""

    path: str
    data: bytes


def stdlib_sources(pattern: str = "*.py", max_bytes: int | None = None) -> list[SourceFile]:
    """The stdlib files matching `pattern` (a glob relative to the stdlib directory, e.g. "*.py"
    or "test/test_*.py"), in sorted order, stopping once `max_bytes` are collected."""
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(stdlib, pattern)))
    if not paths:
        raise FileNotFoundError(f"no standard-library file matches {pattern!r} under {stdlib}")
    sources, total = [], 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        sources.append(SourceFile(os.path.relpath(path, stdlib), data))
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return sources


def split_by_file(
    sources: Sequence[SourceFile], eval_every: int
) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, eval): every `eval_every`-th file (spread over the alphabet) is held out."""
    if eval_every < 2:
        raise ValueError(f"eval_every must be >= 2 (some files must remain for training), got {eval_every}")
    if len(sources) < eval_every:
        raise ValueError(f"{len(sources)} files cannot hold out one in every {eval_every}")
    held_out = [s for i, s in enumerate(sources) if i % eval_every == eval_every // 2]
    train = [s for i, s in enumerate(sources) if i % eval_every != eval_every // 2]
    return train, held_out


def as_tokens(sources: Sequence[SourceFile]) -> torch.Tensor:
    """The files concatenated into one uint8 token stream."""
    return torch.frombuffer(bytearray(b"".join(s.data for s in sources)), dtype=torch.uint8)


def batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, count: int, seed: int
) -> Iterator[torch.Tensor]:
    """`count` batches of random windows, (batch_size, seq_len) int64 each; the same for the same
    arguments (their own generator, independent of torch's global RNG)."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for windows of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()


def fixed_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, count: int, seed: int
) -> list[torch.Tensor]:
    """`batches` materialised, for reuse across runs that must see the same tokens."""
    return list(batches(tokens, batch_size, seq_len, count, seed))


def byte_llama(layers: int, hidden: int, max_seq_len: int, seed: int):
    """A randomly initialised LlamaForCausalLM over byte tokens (fp32), the same for the same
    arguments: heads of 64 dims, the usual 8/3 MLP ratio, untied embedding and head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % 64:
        raise ValueError(f"hidden must be a multiple of 64 (the head size), got {hidden}")
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=max_seq_len, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def bf16_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Cast the parameters to bf16 and keep fp32 buffers, as from_pretrained(torch_dtype=torch.bfloat16)
    does: model.to(torch.bfloat16) would also round RoPE's inv_freq, a different (worse) model."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model

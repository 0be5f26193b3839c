"""Which parameters form which block, and which of them get weight decay.

A block is a list of name prefixes (badam's `block_prefix_list` form). The default is one block
per transformer layer, found from the parameter names; the embedding and the head (lm_head,
final norm and anything else outside the layers) form one extra block each, only when asked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

# The leading part of a name up to and including the first "<layers>.<N>." component:
# Llama/Mistral/Qwen `model.layers.N.`, GPT-2 `transformer.h.N.`, BERT `encoder.layer.N.`,
# T5 `encoder.block.N.`. Non-greedy, so T5's `encoder.block.0.layer.1.` stops at the block.
LAYER_PREFIX = re.compile(r"^((?:.*?\.)?(?:layers|layer|h|block|blocks)\.\d+\.)")
EMBEDDING_PARTS = ("wte", "wpe", "shared")

# badam's own rules (badam/block_optim.py, infer_param_groups), kept verbatim in meaning so
# BlockOptimizer infers exactly badam's blocks; note the unescaped "." before the layer index.
BADAM_LAYER_PATTERN = re.compile(r".*layers.[^.]*\.")
BADAM_EMBED_PATTERN = re.compile(r".*embed[^.]*\.")

Matcher = Callable[[str, str], bool]


def startswith(name: str, prefix: str) -> bool:
    """BlockAdamW's rule: a prefix selects the names that begin with it."""
    return name.startswith(prefix)


def contains(name: str, prefix: str) -> bool:
    """badam's rule: a "prefix" selects every name that contains it anywhere."""
    return prefix in name


def _is_embedding(name: str) -> bool:
    parts = name.split(".")[:-1]
    return any("embed" in part or part in EMBEDDING_PARTS for part in parts)


def infer_blocks(names: Sequence[str], include_embedding: bool, include_lm_head: bool) -> list[list[str]]:
    """One block per transformer layer, in order of first appearance; then optionally the
    embedding block (first) and the head block (last: every other name, e.g. lm_head, final norm).

    Example: Llama names give [["model.layers.0."], ["model.layers.1."], ...].
    """
    layers: dict[str, None] = {}
    embedding, head = [], []
    for name in names:
        match = LAYER_PREFIX.match(name)
        if match:
            layers.setdefault(match.group(1))
        elif _is_embedding(name):
            embedding.append(name)
        else:
            head.append(name)
    if not layers:
        raise ValueError(
            "could not infer transformer layers from the parameter names (looked for Llama "
            "'model.layers.N.', GPT-2 'transformer.h.N.', BERT 'encoder.layer.N.', T5 'block.N.'); "
            "pass blocks=[[prefix, ...], ...] explicitly"
        )
    blocks = [[prefix] for prefix in layers]
    if include_embedding and embedding:
        blocks.insert(0, embedding)
    if include_lm_head and head:
        blocks.append(head)
    return blocks


def infer_blocks_like_badam(
    names: Sequence[str], include_embedding: bool, include_lm_head: bool
) -> list[list[str]]:
    """badam's inference, reproduced so the drop-in BlockOptimizer gets the very same blocks.

    Quirk kept on purpose: without include_embedding the embedding lands in the head block."""
    blocks: list[list[str]] = []
    head = []
    for name in names:
        if any(block[0] in name for block in blocks):
            continue
        if BADAM_LAYER_PATTERN.findall(name):
            blocks.append(BADAM_LAYER_PATTERN.findall(name))
        elif include_embedding and BADAM_EMBED_PATTERN.findall(name):
            blocks.append(BADAM_EMBED_PATTERN.findall(name))
        else:
            head.append(name)
    if include_lm_head:
        blocks.append(head)
    return blocks


def _normalise_prefixes(what: str, prefixes) -> list[str]:
    if isinstance(prefixes, str):
        return [prefixes]
    if not isinstance(prefixes, Sequence) or not all(isinstance(p, str) for p in prefixes):
        raise TypeError(f"{what} must be a list of name prefixes (strings), got {prefixes!r}")
    return list(prefixes)


def assign_blocks(
    names: Sequence[str],
    blocks: Sequence[Sequence[str]],
    always_active: Sequence[str] = (),
    *,
    match: Matcher = startswith,
) -> tuple[list[list[int]], list[int]]:
    """Map each block (a list of prefixes) to the indices of the names it selects.

    Returns (block_members, always_active_members). Names selected by `always_active` are trained
    throughout and left out of every block. Raises ValueError for an empty block list, a prefix
    that selects nothing, a block left empty, or a name selected by two blocks.
    """
    if isinstance(blocks, str) or not isinstance(blocks, Sequence) or len(blocks) == 0:
        raise ValueError(f"blocks must be a non-empty list of lists of name prefixes, got {blocks!r}")
    always = _normalise_prefixes("always_active", always_active)
    for prefix in always:
        if not any(match(name, prefix) for name in names):
            raise ValueError(f"always_active prefix {prefix!r} matches no parameter name")
    always_members = [i for i, name in enumerate(names) if any(match(name, p) for p in always)]
    owner: dict[int, int] = {}
    members: list[list[int]] = []
    for b, block in enumerate(blocks):
        prefixes = _normalise_prefixes(f"blocks[{b}]", block)
        if not prefixes:
            raise ValueError(f"blocks[{b}] is empty")
        chosen = []
        for prefix in prefixes:
            hits = [i for i, name in enumerate(names) if match(name, prefix)]
            if not hits:
                raise ValueError(f"prefix {prefix!r} of blocks[{b}] matches no parameter name")
            chosen.extend(i for i in hits if i not in chosen)
        for i in chosen:
            if i in owner and i not in always_members:
                raise ValueError(f"parameter {names[i]!r} is in blocks[{owner[i]}] and blocks[{b}]")
            owner[i] = b
        block_members = [i for i in sorted(chosen) if i not in always_members]
        if not block_members:
            raise ValueError(f"blocks[{b}] holds only always_active parameters")
        members.append(block_members)
    return members, always_members


def no_decay_names(model: nn.Module | None, names: Sequence[str]) -> set[str]:
    """Names that get no weight decay: biases and the weights of normalisation layers.

    With a model, norm layers are found by type (LayerNorm, GroupNorm, ... and any class whose
    name contains "Norm", e.g. LlamaRMSNorm); without one, by name ("norm" or GPT-2's "ln_").
    """
    no_decay = {name for name in names if name.split(".")[-1] == "bias"}
    if model is not None:
        for module_name, module in model.named_modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__:
                for param_name, _ in module.named_parameters(prefix=module_name, recurse=False):
                    no_decay.add(param_name)
    else:
        for name in names:
            owner = name.split(".")[-2] if "." in name else ""
            if "norm" in owner.lower() or owner.startswith("ln_"):
                no_decay.add(name)
    return no_decay & set(names)


def named_parameters_of(model_or_named_params) -> tuple[nn.Module | None, list[tuple[str, torch.Tensor]]]:
    """Accept a module or an iterable of (name, parameter); return (module or None, the list)."""
    if isinstance(model_or_named_params, nn.Module):
        return model_or_named_params, list(model_or_named_params.named_parameters())
    try:
        named = list(model_or_named_params)
    except TypeError:
        raise TypeError(
            f"expected an nn.Module or (name, parameter) pairs, got {type(model_or_named_params).__name__}"
        ) from None
    for item in named:
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        ):
            raise TypeError(f"expected (name, parameter) pairs, got {item!r:.80}")
    if not named:
        raise ValueError("no parameters given")
    if len({name for name, _ in named}) != len(named):
        raise ValueError("parameter names must be unique")
    if len({id(p) for _, p in named}) != len(named):
        raise ValueError("a parameter appears twice under different names (tied weights?); pass it once")
    return None, named

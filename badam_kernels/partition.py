"""Which parameters form which block, and which of them get weight decay.

A block is a list of name prefixes (badam's `block_prefix_list` form). The default is one block
per transformer layer, found from the parameter names; the embedding and the head (lm_head,
final norm and anything else outside the layers) form one extra block each, only when asked.
When the model itself is given, its structure refines the names: the embedding is whatever
`get_input_embeddings()` returns and every nn.Embedding (so `self.emb = nn.Embedding(...)`
counts), and tied weights (`tie_word_embeddings`), which named_parameters() lists once under
the embedding's name, are also found under their other names (`lm_head.weight`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence

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


def matches_components(name: str, prefix: str) -> bool:
    """BlockAdamW's rule: a prefix selects the names that begin with it in whole dot-separated
    components, so "model.layers.1" (with or without the trailing dot) selects
    "model.layers.1.mlp.up_proj.weight" but not "model.layers.10.mlp.up_proj.weight"."""
    if not name.startswith(prefix):
        return False
    return prefix.endswith(".") or len(name) == len(prefix) or name[len(prefix)] == "."


def contains(name: str, prefix: str) -> bool:
    """badam's rule: a "prefix" selects every name that contains it anywhere."""
    return prefix in name


def _is_embedding(name: str) -> bool:
    parts = name.split(".")[:-1]
    return any("embed" in part or part in EMBEDDING_PARTS for part in parts)


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """The other names of tied parameters: {name in named_parameters(): [further names]}.

    Example: a Llama with tie_word_embeddings gives {"model.embed_tokens.weight": ["lm_head.weight"]}.
    """
    first_name: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first_name:
            aliases.setdefault(first_name[id(p)], []).append(name)
        else:
            first_name[id(p)] = name
    return aliases


def embedding_modules(model: nn.Module) -> set[str]:
    """Names of the modules holding the embedding: `get_input_embeddings()` (Hugging Face models)
    and every nn.Embedding, except the output embeddings. Those inside transformer layers (T5's
    relative position bias) still belong to their layer's block."""

    def module_or_none(getter_name: str) -> nn.Module | None:
        getter = getattr(model, getter_name, None)
        try:
            module = getter() if callable(getter) else None
        except (NotImplementedError, AttributeError):  # transformers raises when a model has none
            return None
        return module if isinstance(module, nn.Module) else None

    input_embeddings = module_or_none("get_input_embeddings")
    output_embeddings = module_or_none("get_output_embeddings")
    return {
        name
        for name, module in model.named_modules(remove_duplicate=False)  # shared modules under each name
        if (module is input_embeddings or isinstance(module, nn.Embedding))
        and module is not output_embeddings
    }


def _role(name: str, embeddings: Collection[str]) -> str:
    """Where a parameter name belongs: "layer", "embedding" or "head" (anything else)."""
    if LAYER_PREFIX.match(name):
        return "layer"
    if any(name.startswith(module + ".") for module in embeddings) or _is_embedding(name):
        return "embedding"
    return "head"


def infer_blocks(
    names: Sequence[str],
    include_embedding: bool,
    include_lm_head: bool,
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    embeddings: Collection[str] = (),
    frozen: Collection[str] = (),
) -> list[list[str]]:
    """One block per transformer layer, in order of first appearance; then optionally the
    embedding block (first) and the head block (last: every other name, e.g. lm_head, final norm).

    `aliases` (from tied_aliases) and `embeddings` (module names, from embedding_modules) come
    from the model when it is given. A weight tied between the embedding and the head trains
    in the embedding block with include_embedding, else in the head block with include_lm_head,
    listed there under its head name (lm_head.weight). Names in `frozen` join no block (a layer
    frozen whole has none), with a warning where include_embedding/include_lm_head asked for them.

    Example: Llama names give [["model.layers.0."], ["model.layers.1."], ...].
    """
    layers: dict[str, bool] = {}  # layer prefix -> whether any of its parameters is trainable
    embedding, head, left_frozen = [], [], []
    for name in names:
        match = LAYER_PREFIX.match(name)
        if match:
            layers[match.group(1)] = layers.get(match.group(1), False) or name not in frozen
            continue
        roles = {}
        for each in (name, *(aliases or {}).get(name, ())):
            roles.setdefault(_role(each, embeddings), each)
        in_embedding = "embedding" in roles and (include_embedding or "head" not in roles)
        if name in frozen:
            if include_embedding if in_embedding else include_lm_head:
                left_frozen.append(name)
        elif in_embedding:
            embedding.append(roles["embedding"])
        else:
            head.append(roles["head"])
    if not layers:
        raise ValueError(
            "could not infer transformer layers from the parameter names (looked for Llama "
            "'model.layers.N.', GPT-2 'transformer.h.N.', BERT 'encoder.layer.N.', T5 'block.N.'); "
            "pass the blocks explicitly as lists of name prefixes (BlockAdamW's blocks=[[prefix, ...], ...], "
            "BlockOptimizer's block_prefix_list)"
        )
    if left_frozen:
        warnings.warn(
            f"{', '.join(map(repr, left_frozen))} would join the embedding or head block you asked for, but "
            "had requires_grad=False when the optimizer was built: frozen parameters stay frozen",
            stacklevel=3,
        )
    blocks = [[prefix] for prefix, trainable in layers.items() if trainable]
    if include_embedding and embedding:
        blocks.insert(0, embedding)
    if include_lm_head and head:
        blocks.append(head)
    if not blocks:
        raise ValueError(
            "every transformer layer is frozen (requires_grad=False), so no block is left; unfreeze "
            "parameters, or ask for the embedding or head block (include_embedding, include_lm_head)"
        )
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


class _Selector:
    """Resolves one prefix to parameter indices, through tied names, skipping frozen parameters,
    and explains a prefix that selects nothing."""

    def __init__(self, names, aliases, frozen, match) -> None:
        self.names = names
        self.aliases = aliases
        self.all_names = [(name, *(aliases or {}).get(name, ())) for name in names]
        self.frozen = frozen
        self.match = match
        self.tied_notes: list[str] = []  # warned about once the whole assignment is valid

    def __call__(self, prefix: str, where: str) -> list[int]:
        hits = [i for i, each in enumerate(self.all_names) if any(self.match(n, prefix) for n in each)]
        if not hits:
            raise ValueError(f"{where} matches no parameter name{self._hint(prefix)}")
        trainable = [i for i in hits if self.names[i] not in self.frozen]
        if not trainable:
            raise ValueError(
                f"{where} selects only frozen parameters (requires_grad=False when the optimizer was "
                f"built, e.g. {self.names[hits[0]]!r}); frozen parameters stay frozen: call "
                "requires_grad_(True) on them before building the optimizer to train them"
            )
        for i in trainable:
            if not self.match(self.names[i], prefix):
                alias = next(n for n in self.all_names[i] if self.match(n, prefix))
                self.tied_notes.append(
                    f"{alias!r} is tied to {self.names[i]!r} (one tensor, listed by named_parameters() "
                    f"under {self.names[i]!r}): {where} trains it, so both uses of the weight change"
                )
        return trainable

    def _hint(self, prefix: str) -> str:
        near = next((n for each in self.all_names for n in each if n.startswith(prefix)), None)
        if near is not None:
            return (
                f"; prefixes select whole name components, and {near!r} only begins with it inside a "
                "component (end the prefix at a '.')"
            )
        if self.aliases is None:
            return (
                "; if it names a tied weight (e.g. lm_head with tie_word_embeddings), named_parameters() "
                "lists it once, under the name of the parameter it is tied to: use that name, or pass "
                "the model itself so tied names are resolved"
            )
        return ""


def assign_blocks(
    names: Sequence[str],
    blocks: Sequence[Sequence[str]],
    always_active: Sequence[str] = (),
    *,
    match: Matcher = matches_components,
    aliases: Mapping[str, Sequence[str]] | None = None,
    frozen: Collection[str] = (),
) -> tuple[list[list[int]], list[int]]:
    """Map each block (a list of prefixes) to the indices of the names it selects.

    Returns (block_members, always_active_members). Names selected by `always_active` are trained
    throughout and left out of every block. A prefix also selects a parameter through the other
    names of a tied weight (`aliases`, from tied_aliases; None when unknown). Names in `frozen`
    are never selected. Raises ValueError for an empty block list, a prefix that selects nothing
    (or only frozen parameters), a block left empty, or a name selected by two blocks.
    """
    if isinstance(blocks, str) or not isinstance(blocks, Sequence) or len(blocks) == 0:
        raise ValueError(f"blocks must be a non-empty list of lists of name prefixes, got {blocks!r}")
    select = _Selector(names, aliases, set(frozen), match)
    always_members: list[int] = []
    for prefix in _normalise_prefixes("always_active", always_active):
        always_members.extend(select(prefix, f"always_active prefix {prefix!r}"))
    always_members = sorted(set(always_members))
    owner: dict[int, int] = {}
    members: list[list[int]] = []
    for b, block in enumerate(blocks):
        prefixes = _normalise_prefixes(f"blocks[{b}]", block)
        if not prefixes:
            raise ValueError(f"blocks[{b}] is empty")
        chosen: list[int] = []
        for prefix in prefixes:
            chosen.extend(i for i in select(prefix, f"prefix {prefix!r} of blocks[{b}]") if i not in chosen)
        for i in chosen:
            if i in owner and i not in always_members:
                tied = select.all_names[i][1:]
                also = f" (tied: also named {', '.join(map(repr, tied))})" if tied else ""
                raise ValueError(f"parameter {names[i]!r}{also} is in blocks[{owner[i]}] and blocks[{b}]")
            owner[i] = b
        block_members = [i for i in sorted(chosen) if i not in always_members]
        if not block_members:
            raise ValueError(f"blocks[{b}] holds only always_active parameters")
        members.append(block_members)
    for note in select.tied_notes:
        warnings.warn(note, stacklevel=3)
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

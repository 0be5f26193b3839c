"""torch.compile with BlockAdamW: compile the layers, not the whole model.

Whether a parameter requires grad is part of what dynamo specializes a graph on (autograd records
another graph), and BAdam changes it at every block switch. A whole-model `torch.compile(model)`
therefore traces and compiles the whole model again for each block, and after
`torch._dynamo.config.recompile_limit` (8) blocks it stops compiling and runs the model eagerly,
with a log line only (measured in bench/RESULTS.md).

Compiled one layer at a time (regional compilation, `compile_layers`), the layers share one code
object and their graph has few variants whatever block is active: a frozen layer below the
active one (input without grad), the active layer (trainable, its input the backward cut), a
frozen layer above it (input requires grad). Those serve every block, so a pass over all blocks
compiles a bounded number of graphs (3; 4 when the sequence length varies, as dynamo then
compiles one dynamic-shape graph; a few more under gradient checkpointing), and the compile cost
is that of a few layers, not of the model once per block.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from badam_kernels.partition import LAYER_PREFIX

WHOLE_MODEL_COMPILE_MESSAGE = (
    "BlockAdamW with a whole-model torch.compile: which parameters require grad changes at every block "
    "switch and dynamo specializes on it, so it compiles the whole model again for each block and, after "
    "torch._dynamo.config.recompile_limit (8) blocks, runs the model eagerly (torch 2.11 reuses the graph "
    "of another block instead, whose parameters then get no gradient). Compile the layers instead: "
    "badam_kernels.compile_layers(model) on the model itself (not torch.compile(model), not "
    "model.compile()); a few variants of one layer graph then serve every block."
)
USE_CACHE_MESSAGE = (
    "compile_layers: model.config.use_cache is True, so a training forward builds a KV cache, and each "
    "layer's cache update makes dynamo compile one graph per layer (past recompile_limit, 8, the other "
    "layers run eagerly). Set model.config.use_cache = False for training (the Hugging Face Trainer "
    "does), or pass use_cache=False to the model."
)


COMPILED_CHECKPOINT_MESSAGE = (
    "{layer} is compiled and checkpointed non-reentrantly around its whole __call__ (transformers before "
    "5.23 does so; transformers' default use_reentrant=False). With torch {torch} such a layer fails in "
    "backward with torch.utils.checkpoint.CheckpointError once another block's parameters require grad "
    "(a torch issue, reproduced without BlockAdamW with torch 2.11 and transformers 5.17; torch 2.13 and "
    "transformers 5.23 each work). Enable checkpointing with "
    "gradient_checkpointing_kwargs={{'use_reentrant': True}}, or upgrade torch or transformers, or do "
    "not compile the layers."
)


_TORCH_BEFORE_2_13 = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)


def refuse_compiled_checkpoint_of_call(layer_name: str, layer: nn.Module) -> None:
    """Raise before a training forward that would fail in backward: a compiled layer whose whole
    `__call__` transformers checkpoints non-reentrantly, under torch < 2.13 (see the message)."""
    if not _TORCH_BEFORE_2_13:
        return
    checkpoints_its_call = type(layer).__call__ is not nn.Module.__call__
    if not (checkpoints_its_call and getattr(layer, "gradient_checkpointing", False)):
        return
    if getattr(layer, "_compiled_call_impl", None) is None:
        return
    function = layer.__dict__.get("_gradient_checkpointing_func")
    function = getattr(function, "checkpoint", function)  # under the backward cut's wrapper
    if getattr(function, "keywords", {}).get("use_reentrant", True) is False:
        raise RuntimeError(COMPILED_CHECKPOINT_MESSAGE.format(layer=layer_name, torch=torch.__version__))


def layer_names(model: nn.Module) -> list[str]:
    """Names of the transformer layers of `model` (`model.layers.N`, `transformer.h.N`, ...: the
    modules BlockAdamW infers its blocks from)."""
    names = []
    for name, _ in model.named_modules():
        match = LAYER_PREFIX.match(name + ".")
        if match and match.group(1) == name + ".":
            names.append(name)
    return names


def compile_layers(model: nn.Module, **compile_kwargs: Any) -> list[str]:
    """Compile each transformer layer of `model` in place (`layer.compile(**compile_kwargs)`, i.e.
    `torch.compile` of the layer's call), the way to use torch.compile with BlockAdamW.

    Call it on the model you train and give BlockAdamW that same model; the embedding, final norm
    and head stay eager. `compile_kwargs` go to torch.compile (backend, mode, dynamic, ...).
    Returns the names of the compiled layers.

    Example:
        >>> model.config.use_cache = False  # training: no KV cache (one graph per layer otherwise)
        >>> badam_kernels.compile_layers(model)
        >>> optimizer = BlockAdamW(model, lr=1e-5, switch_every=50)
    """
    if is_whole_model_compiled(model):
        raise ValueError(
            "compile_layers: the model is compiled as a whole already (torch.compile(model) or "
            "model.compile()); give compile_layers the uncompiled model"
        )
    names = layer_names(model)
    if not names:
        raise ValueError(
            "compile_layers found no transformer layers (modules named like 'model.layers.N', "
            "'transformer.h.N', 'encoder.layer.N' or 'block.N'); compile your layers with "
            "layer.compile() yourself"
        )
    if getattr(getattr(model, "config", None), "use_cache", False):
        warnings.warn(USE_CACHE_MESSAGE, stacklevel=2)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].compile(**compile_kwargs)
    return names


def is_whole_model_compiled(model: nn.Module) -> bool:
    """Whether `model` is a `torch.compile(...)` wrapper, or `.compile()` was called on it or on a
    module holding its layers (the case BlockAdamW warns about)."""
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return True
    layers = layer_names(model)
    for name, module in model.named_modules():
        holds_layers = any(layer.startswith(name + ".") for layer in layers) if name else bool(layers)
        if holds_layers and getattr(module, "_compiled_call_impl", None) is not None:
            return True
    return False

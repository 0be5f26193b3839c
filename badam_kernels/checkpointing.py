"""Stop backward at the active block: the BAdam backward saving, kept under gradient checkpointing.

With only one block trainable, backward has nothing to do below the lowest active layer: the
frozen layers there need no gradient. Plain autograd already stops there, because the embedding
output does not require grad, so no graph is recorded below the active block. Two things break
that under gradient checkpointing:

- Hugging Face's `gradient_checkpointing_enable()` calls `enable_input_require_grads()`, making the
  embedding output require grad: backward then runs (and recomputes) every frozen layer below the
  active block, only to produce gradients nobody uses.
- Reentrant checkpoints (`use_reentrant=True`) record a layer only if one of its tensor inputs
  requires grad; with frozen embeddings none does, so the active layer gets no gradient at all.

`BackwardCut` fixes both with one forward pre-hook on the lowest active layer: the layer's hidden
state input is replaced by a detached copy that requires grad. Backward ends at that tensor (one
activation-sized gradient, for the layer's input projections), and a reentrant checkpoint of the
layer sees an input that requires grad. BlockAdamW moves the hook at every block switch.

Assumptions, checked where cheap: layers are the modules named like `model.layers.N` (see
partition.LAYER_PREFIX), they run in the order the model registers them, and their first
positional argument (or `hidden_states=`) is the hidden state. Parameters outside the layers that
come first (an active embedding) need the full backward, so no cut is made then.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from badam_kernels.partition import LAYER_PREFIX


class BackwardCut:
    """Keeps backward from running below the lowest active layer of `model`.

    Args:
        model: the model whose parameters the optimizer trains.

    Example:
        >>> cut = BackwardCut(model)
        >>> cut.move_to(["model.layers.5.mlp.up_proj.weight"])  # backward now stops at layer 5
        >>> cut.remove()
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = dict(model.named_modules())
        self._position = {name: index for index, name in enumerate(self._modules)}
        # Modules registered after every layer (final norm, lm_head) take the last hidden state.
        in_layers = [self._position[name] for name in self._modules if LAYER_PREFIX.match(name + ".")]
        self._after_layers = max(in_layers, default=-1)
        self._remove_hook: weakref.finalize | None = None
        self.cut_module: str | None = None  # the module backward stops at; None: no cut

    def move_to(self, active_names: Iterable[str]) -> None:
        """Put the cut at the input of the lowest module holding one of `active_names`
        (parameter names): a layer, or a head module after all layers. No cut when an active
        parameter lives outside the layers before them (the embedding)."""
        self.remove()
        lowest: tuple[int, str | None] | None = None
        for name in active_names:
            match = LAYER_PREFIX.match(name)
            module_name = match.group(1)[:-1] if match else name.rpartition(".")[0]
            if module_name not in self._position:
                raise ValueError(f"parameter {name!r} belongs to no module of the model given")
            position = self._position[module_name]
            cuttable = match is not None or position > self._after_layers
            if lowest is None or position < lowest[0]:
                lowest = (position, module_name if cuttable else None)
        if lowest is None or lowest[1] is None:
            return
        self.cut_module = lowest[1]
        handle = self._modules[self.cut_module].register_forward_pre_hook(
            _detach_hidden_input, with_kwargs=True
        )
        # When the optimizer owning this cut is discarded, the model must not stay cut.
        self._remove_hook = weakref.finalize(self, handle.remove)

    def remove(self) -> None:
        """Let backward run through the whole model again."""
        if self._remove_hook is not None:
            self._remove_hook()
        self._remove_hook = None
        self.cut_module = None


def _detach_hidden_input(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook: feed the module a detached copy of its hidden state that requires grad."""
    if args:
        hidden = args[0]
    elif "hidden_states" in kwargs:
        hidden = kwargs["hidden_states"]
    else:
        return None
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or not torch.is_grad_enabled():
        return None
    # Only Hugging Face layers set `gradient_checkpointing`; a reentrant checkpoint of the layer
    # needs an input that requires grad, else the active layer receives no gradient.
    checkpointed = module.training and getattr(module, "gradient_checkpointing", False)
    if not (hidden.requires_grad or checkpointed):
        return None  # no graph below already, and the layer's own parameters record one
    cut = hidden.detach().requires_grad_()
    if args:
        return (cut, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": cut}

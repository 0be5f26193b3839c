"""Stop backward at the active block: the BAdam backward saving, kept under gradient checkpointing.

With only one block trainable, backward has nothing to do below the lowest active layer: the
frozen layers there need no gradient. Plain autograd already stops there, because the embedding
output does not require grad, so no graph is recorded below the active block. Two things break
that under gradient checkpointing:

- Hugging Face's `gradient_checkpointing_enable()` calls `enable_input_require_grads()`, making the
  embedding output require grad: backward then runs (and recomputes) every frozen layer below the
  active block, only to produce gradients nobody uses.
- Reentrant checkpoints (`use_reentrant=True`) record a layer only if one of their tensor inputs
  requires grad; with frozen embeddings none does, so the active layer gets no gradient at all.

`BackwardCut` hands the lowest active layer a detached copy of its hidden-state input that
requires grad. Backward ends at that tensor (one activation-sized gradient, for the layer's
input projections), and a checkpoint of the layer sees an input that requires grad. The copy
must be made before the checkpoint takes its inputs, and the layer's own hooks do not always run
before that:

- a forward pre-hook on the layer serves layers that are not checkpointed, transformers >= 5.23
  (which checkpoints `forward`, inside the module's hooks) and non-reentrant checkpoints (whose
  forward runs with grad on);
- transformers 5.17 checkpoints the layer's whole `__call__`, hooks included, so a reentrant
  checkpoint runs the pre-hook with grad off, too late. For Hugging Face layers (those with a
  `_gradient_checkpointing_func`) the cut therefore also wraps that function on the cut layer,
  which both versions call with the hidden state first, outside the checkpoint. The wrapper is
  (re)installed before every forward of the model, so checkpointing enabled after the optimizer
  was built (the Trainer does so in train()) is covered too.

Under torch.compile the cut stays outside the graphs. A regionally compiled layer
(compile.compile_layers) runs its hooks eagerly and traces its forward; when that calls the
checkpoint wrapper (transformers >= 5.23), the pre-hook has made the cut already, and the wrapper
leaves the graph whole. A whole-model compile traces the model's hooks too: the pre-hook is
kept out of the graph (torch.compiler.disable: dynamo can neither create a leaf that requires
grad inside a graph nor read a tensor's grad_fn), and the model's pre-hook notes the compile so
that the cut warns (compile.WHOLE_MODEL_COMPILE_MESSAGE).

A manual `torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=True)` in a custom model
cannot be reached: the checkpoint takes `h` before any hook of ours runs. Such a checkpoint
trains correctly when `h` requires grad (backward then also recomputes the frozen layers below);
when it does not, the layer records no graph. The cut notices (its pre-hook runs with grad off
inside a training forward) and the model's forward raises `RuntimeError` with the fix when
nothing in the output requires grad, as does `step()` when the block received no gradient.

Assumptions, checked where cheap: layers are the modules named like `model.layers.N` (see
partition.LAYER_PREFIX), they run in the order the model registers them, and their first
positional argument (or `hidden_states=`) is the hidden state. Parameters outside the layers that
come first (an active embedding) need the full backward, so no cut is made then.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from badam_kernels.compile import WHOLE_MODEL_COMPILE_MESSAGE, refuse_compiled_checkpoint_of_call
from badam_kernels.partition import LAYER_PREFIX

REENTRANT_WITHOUT_GRAD_MESSAGE = (
    "the active layer {layer!r} ran with gradients disabled inside a training forward, with no input "
    "that requires grad: a reentrant checkpoint (torch.utils.checkpoint.checkpoint(..., "
    "use_reentrant=True)) called by the model itself, which records no graph then, so the active "
    "block gets no gradient. BlockAdamW's backward cut reaches Hugging Face's gradient checkpointing "
    "(gradient_checkpointing_enable) but not a checkpoint call inside your model's forward. Use "
    "use_reentrant=False there (recommended: backward then stops at the active layer), or make the "
    "layers' input require grad (e.g. `hidden.requires_grad_()` on the embedding output), which "
    "also recomputes the frozen layers below in backward."
)


@dataclass
class _ForwardWatch:
    """What the hooks share (not the BackwardCut itself, so that the model's hooks do not keep
    the cut, and through it the optimizer, alive)."""

    layer_name: str | None = None  # the module the cut is at
    layer: nn.Module | None = None
    training_forward: bool = False  # the model's forward runs in training mode with grad on
    layer_without_grad: str | None = None  # the cut layer ran with grad off in such a forward
    whole_model_compiled: bool = False  # dynamo traced the model's forward
    warned_whole_model_compiled: bool = False


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
        self._watch = _ForwardWatch()
        model_hooks = (
            model.register_forward_pre_hook(_model_pre_hook(self._watch)),
            model.register_forward_hook(_model_hook(self._watch)),
        )
        # When the optimizer owning this cut is discarded, the model must not stay cut.
        self._remove_model_hooks = weakref.finalize(self, _undo_all, model_hooks)
        self._remove_layer_cut: weakref.finalize | None = None

    @property
    def cut_module(self) -> str | None:
        """The name of the module backward stops at; None: no cut."""
        return self._watch.layer_name

    def move_to(self, active_names: Iterable[str]) -> None:
        """Put the cut at the input of the lowest module holding one of `active_names`
        (parameter names): a layer, or a head module after all layers. No cut when an active
        parameter lives outside the layers before them (the embedding)."""
        self._remove_layer_cut_now()
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
        layer = self._modules[lowest[1]]
        self._watch.layer_name, self._watch.layer = lowest[1], layer
        handle = layer.register_forward_pre_hook(_layer_pre_hook(self._watch), with_kwargs=True)
        _wrap_checkpoint_function(layer)
        self._remove_layer_cut = weakref.finalize(self, _undo_all, (handle, _UnwrapCheckpoint(layer)))

    def remove(self) -> None:
        """Let backward run through the whole model again, for good (the hooks on the model go
        too; this cut cannot be moved any more)."""
        self._remove_layer_cut_now()
        self._remove_model_hooks()

    def no_gradient_cause(self) -> str | None:
        """Why the active layer may have received no gradient, if the cut saw a cause (a reentrant
        checkpoint without grad, a whole-model torch.compile); else None."""
        if self._watch.layer_without_grad is not None:
            return REENTRANT_WITHOUT_GRAD_MESSAGE.format(layer=self._watch.layer_without_grad)
        if self._watch.whole_model_compiled:
            return WHOLE_MODEL_COMPILE_MESSAGE
        return None

    def _remove_layer_cut_now(self) -> None:
        if self._remove_layer_cut is not None:
            self._remove_layer_cut()
        self._remove_layer_cut = None
        self._watch.layer_name = self._watch.layer = None


def _undo_all(undo: Iterable[Any]) -> None:
    for item in undo:
        item.remove()


def _detached_leaf(hidden: torch.Tensor) -> torch.Tensor:
    """The cut itself: the same values, no history below, requiring grad."""
    return hidden.detach().requires_grad_()


def _is_hidden_state(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _any_requires_grad(value: Any) -> bool:
    """Whether a tensor inside `value` (tensors, tuples, lists, dicts, ModelOutputs) requires grad."""
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, Mapping):
        return any(_any_requires_grad(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_any_requires_grad(v) for v in value)
    return False


def _model_pre_hook(watch: _ForwardWatch) -> Callable[..., None]:
    def hook(model: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling():
            # dynamo traces the whole model (the case compile.py warns about): only note it, in
            # a way dynamo replays without a graph break; the cut layer's hook (eager) warns.
            watch.whole_model_compiled = True
            return
        watch.training_forward = model.training and torch.is_grad_enabled()
        watch.layer_without_grad = None
        if watch.layer is not None:
            _wrap_checkpoint_function(watch.layer)  # checkpointing may have been enabled since
            if watch.training_forward:
                refuse_compiled_checkpoint_of_call(watch.layer_name, watch.layer)

    return hook


def _model_hook(watch: _ForwardWatch) -> Callable[..., None]:
    def hook(model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if watch.layer_without_grad is not None and watch.training_forward and not _any_requires_grad(output):
            raise RuntimeError(
                "BlockAdamW: " + REENTRANT_WITHOUT_GRAD_MESSAGE.format(layer=watch.layer_without_grad)
            )

    return hook


def _layer_pre_hook(watch: _ForwardWatch) -> Callable[..., Any]:
    """Forward pre-hook on the cut layer: feed it a detached copy of a hidden state that has
    history below; note when it runs with grad off inside a training forward. Kept out of dynamo's
    graphs (a whole-model compile traces the layers' hooks): dynamo can neither create a leaf that
    requires grad inside a graph nor read a tensor's grad_fn."""

    @torch.compiler.disable
    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if watch.whole_model_compiled and not watch.warned_whole_model_compiled:
            watch.warned_whole_model_compiled = True
            warnings.warn(WHOLE_MODEL_COMPILE_MESSAGE, stacklevel=2)
        if args:
            hidden = args[0]
        elif "hidden_states" in kwargs:
            hidden = kwargs["hidden_states"]
        else:
            return None
        if not _is_hidden_state(hidden):
            return None
        if not torch.is_grad_enabled():
            # Inside a reentrant checkpoint's forward (grad off although the model's forward has it
            # on): the checkpoint records the layer only if one of its inputs requires grad.
            if watch.training_forward and module.training and not _any_requires_grad((args, kwargs)):
                watch.layer_without_grad = watch.layer_name
            return None
        if hidden.grad_fn is None:
            return None  # no graph below to cut off (the layer's parameters start its own)
        if args:
            return (_detached_leaf(hidden), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _detached_leaf(hidden)}

    return hook


class _CutBeforeCheckpoint:
    """Stands in for a Hugging Face layer's `_gradient_checkpointing_func` while the layer holds
    the cut: the checkpoint gets a hidden state that requires grad and has no history below."""

    def __init__(self, checkpoint: Callable[..., Any]) -> None:
        self.checkpoint = checkpoint

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # Traced as part of a compiled layer's forward (transformers >= 5.23 calls this from
            # `forward`): the layer's pre-hook has run before, outside the graph, and made the cut,
            # and dynamo turns either kind of checkpoint into one that needs no input to require
            # grad. A cut here would only split the graph.
            return self.checkpoint(function, *args, **kwargs)
        if args and _is_hidden_state(args[0]) and torch.is_grad_enabled():
            hidden = args[0]
            if not (hidden.requires_grad and hidden.grad_fn is None):  # else cut already
                args = (_detached_leaf(hidden), *args[1:])
        return self.checkpoint(function, *args, **kwargs)


def _wrap_checkpoint_function(layer: nn.Module) -> None:
    function = layer.__dict__.get("_gradient_checkpointing_func")
    if function is not None and not isinstance(function, _CutBeforeCheckpoint):
        layer._gradient_checkpointing_func = _CutBeforeCheckpoint(function)


class _UnwrapCheckpoint:
    """Gives `layer` its own checkpoint function back (unless it was replaced since)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def remove(self) -> None:
        function = self.layer.__dict__.get("_gradient_checkpointing_func")
        if isinstance(function, _CutBeforeCheckpoint):
            self.layer._gradient_checkpointing_func = function.checkpoint

"""Parameter hooks that do not keep their owner alive, and one owner per parameter.

Parameters outlive optimizers: a hook holding a strong reference would keep a discarded
optimizer (and its Adam state) alive and let it go on acting on the model, updating parameters
or launching collectives. These hooks look their owner up through a weak reference and do
nothing once it is gone. An optimizer that is still alive (an LR scheduler holds it) is another
matter: `take_over` tells a new optimizer which older ones must remove their hooks, and
`SoleOwner` is how both optimizers (BlockAdamW, BlockOptimizerRatio) take over and hand over.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

REPLACED_MESSAGE = (
    "this {cls} was replaced by a newer optimizer built on the same parameters (e.g. {name!r}), which "
    "took over the backward cut and the hooks on them; it no longer steps or switches blocks. Step the "
    "new optimizer, and rebuild what still holds this one (an LR scheduler, a Trainer) on the new one."
)
TAKE_OVER_MESSAGE = (
    "{cls}: an older {old} on the same parameters (e.g. {name!r}) is still alive (an LR scheduler or "
    "another reference holds it). This optimizer takes over: the old one's backward cut and hooks are "
    "removed, and its step() now raises. Rebuild anything bound to the old optimizer (an LR scheduler) "
    "on this one."
)


def weak_method_hook(owner: Any, method_name: str) -> Callable[[torch.Tensor], None]:
    """A hook `hook(p)` that calls `owner.<method_name>(p)` while `owner` is alive."""
    reference = weakref.ref(owner)

    def hook(p: torch.Tensor) -> None:
        target = reference()
        if target is not None:
            getattr(target, method_name)(p)

    return hook


# id(parameter) -> (the parameter, the optimizer acting on it), both weakly referenced.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def take_over(owner: Any, params: Iterable[torch.Tensor]) -> list[tuple[Any, torch.Tensor]]:
    """Record `owner` as the one optimizer acting on `params`, and return the other live
    optimizers that acted on any of them (each once, with one parameter they shared): they must
    remove their hooks (`old._hand_over(to=owner, name=...)`).

    Two optimizers with hooks on the same parameters would both act on them: a backward cut left
    by the old one withholds gradients from the new one's block, and its update-in-backward,
    gradient-taking or gradient-sync hooks consume or send gradients that are not its own."""
    for key in [key for key, (p, o) in _OWNERS.items() if p() is None or o() is None]:
        del _OWNERS[key]
    displaced: dict[int, tuple[Any, torch.Tensor]] = {}
    for p in params:
        entry = _OWNERS.get(id(p))
        previous = entry[1]() if entry is not None and entry[0]() is p else None
        if previous is not None and previous is not owner:
            displaced.setdefault(id(previous), (previous, p))
        _OWNERS[id(p)] = (weakref.ref(p), weakref.ref(owner))
    return list(displaced.values())


class SoleOwner:
    """What BlockAdamW and BlockOptimizerRatio share to be the one optimizer acting on their
    parameters: `_take_over(names)` once their hooks are in place displaces older live ones (each
    warns, calls its `_remove_hooks()` and from then on fails `_check_in_charge()`)."""

    _replaced_for: str | None = None  # a parameter name, once a newer optimizer took over

    def _take_over(self, names: Mapping[torch.Tensor, str]) -> None:
        for old, p in take_over(self, names):
            old._hand_over(to=self, name=names[p])

    def _hand_over(self, to: Any, name: str) -> None:
        warnings.warn(
            TAKE_OVER_MESSAGE.format(cls=type(to).__name__, old=type(self).__name__, name=name),
            stacklevel=_stacklevel_outside_package(),  # the user's constructor call
        )
        self._remove_hooks()
        self._replaced_for = name

    def _remove_hooks(self) -> None:
        raise NotImplementedError

    def _check_in_charge(self) -> None:
        if self._replaced_for is not None:
            raise RuntimeError(REPLACED_MESSAGE.format(cls=type(self).__name__, name=self._replaced_for))


def _stacklevel_outside_package() -> int:
    """The `stacklevel` for a warning raised by this function's caller that points at the first
    frame outside badam_kernels (the constructors reach _hand_over through different depths)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level

"""Parameter hooks that do not keep their owner alive, and one owner per parameter.

Parameters outlive optimizers: a hook holding a strong reference would keep a discarded
optimizer (and its Adam state) alive and let it go on acting on the model, updating parameters
or launching collectives. These hooks look their owner up through a weak reference and do
nothing once it is gone. An optimizer that is still alive (an LR scheduler holds it) is another
matter: `take_over` tells a new optimizer which older ones must remove their hooks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch


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

"""Parameter hooks that do not keep their owner alive.

Parameters outlive optimizers: a hook holding a strong reference would keep a discarded
optimizer (and its Adam state) alive and let it go on acting on the model, updating parameters
or launching collectives. These hooks look their owner up through a weak reference and do
nothing once it is gone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
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

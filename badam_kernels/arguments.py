"""Checks for the scalar arguments of the public constructors: one rule for every int, float and
flag, so numpy scalars (np.int64 from arithmetic on dataset sizes, np.float32) are accepted like
Python numbers and a wrong type is a clear error naming the argument, not a TypeError from deep
inside a later step."""

from __future__ import annotations

import math
import numbers


def as_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int, for any integral number but a bool; ValueError outside [low, high).

    Example: as_int("switch_every", np.int64(5), low=1) == 5.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r:.40}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value >= high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be an int {bounds}, got {value}")
    return value


def as_float(name: str, value, low: float = 0.0, high: float = math.inf) -> float:
    """`value` as a float, for any real number but a bool; ValueError if NaN or outside [low, high)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r:.40}")
    value = float(value)
    if math.isnan(value) or not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return value


def as_bool(name: str, value) -> bool:
    """`value` as a bool: True, False, or the integers 1 and 0."""
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.40}")

"""The values distlr's choice arguments allow, and how a wrong one is refused.

A leaf module: it imports nothing from distlr, so every layer may use it. Each choice is a
``Literal`` type, and the tuple of its allowed values is read from that type, so the two can
never drift apart.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, Literal, get_args

StepMode = Literal["exp", "linear"]
"""LR ladder spacing: even in log space, or even in LR."""
AmpMode = Literal["no", "bf16", "fp16"]
"""Mixed precision: none, bf16 autocast, fp16 autocast with a GradScaler."""
SnapshotMode = Literal["memory", "disk"]
"""Where the pre-sweep state is kept."""
DistBackend = Literal["auto", "nccl", "gloo"]
"""The process group backend when distlr creates the group."""
SuggestionMethod = Literal["steepest_gradient", "valley", "minimum"]
"""The rule that picks ``optimal_lr`` (``distlr.suggest.SUGGESTION_RULES``; the first is the default)."""
OptimizerName = Literal["adamw", "adam", "sgd"]
"""The optimizers the CLI builds."""
TokenDtype = Literal["uint16", "uint32", "int32", "int64"]
"""The integer type of raw ``.bin`` token files."""

STEP_MODES: tuple[str, ...] = get_args(StepMode)
AMP_MODES: tuple[str, ...] = get_args(AmpMode)
SNAPSHOT_MODES: tuple[str, ...] = get_args(SnapshotMode)
DIST_BACKENDS: tuple[str, ...] = get_args(DistBackend)
SUGGESTION_METHODS: tuple[str, ...] = get_args(SuggestionMethod)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
TOKEN_DTYPES: tuple[str, ...] = get_args(TokenDtype)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name`` (for "did you mean ...?"), or None if none is close.

    The cutoff is lower than difflib's default so that long misspellings such as
    ``max_learning_rate`` still find ``max_lr``.

    Example:
        >>> closest("valey", SUGGESTION_METHODS)
        'valley'
    """
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.4)
    return found[0] if found else None


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``, suggesting the closest name.

    Example:
        >>> check_choice("step_mode", "log", STEP_MODES)
        Traceback (most recent call last):
        ...
        ValueError: step_mode='log' is not supported; allowed: 'exp', 'linear'
    """
    allowed = list(allowed)
    if value in allowed:
        return
    close = closest(str(value), allowed)
    hint = f" (did you mean {close!r}?)" if close else ""
    raise ValueError(f"{name}={value!r} is not supported{hint}; allowed: {', '.join(map(repr, allowed))}")

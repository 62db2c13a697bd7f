"""``SweepArgs``: the arguments of one range test, checked once, the same on every rank.

Pure: no torch, no I/O. ``LRFinder.find()`` builds one from its keywords, the CLI's
``RunConfig`` embeds one, and the ranks of a job compare theirs before the first step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from distlr.choices import (AMP_MODES, STEP_MODES, SUGGESTION_METHODS, AmpMode, StepMode, SuggestionMethod,
                            check_choice)


def is_real(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_lr(name: str, value: Any) -> None:
    if not is_real(value):
        raise TypeError(f"{name}={value!r} must be a number (a float > 0), got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be a finite number > 0")


@dataclass(frozen=True, kw_only=True)
class SweepArgs:
    """The arguments of one range test (``LRFinder.find``'s), validated on construction.

    Raises:
        TypeError: a value of the wrong type (``num_steps=10.5``).
        ValueError: a value out of range; the message names the argument, the value and what
            is allowed.

    Example:
        >>> SweepArgs(num_steps=50).num_steps
        50
        >>> SweepArgs(min_lr=1e-2, max_lr=1e-3)
        Traceback (most recent call last):
        ...
        ValueError: max_lr=0.001 must be greater than min_lr=0.01; please decrease min_lr or increase max_lr
    """

    min_lr: float = 1e-8
    """LR of the first step."""
    max_lr: float = 1e-1
    """LR of the last step."""
    num_steps: int = 100
    """Number of optimizer steps (points on the curve)."""
    smooth_factor: float = 0.98
    """Weight on history of the bias-corrected EMA of the loss; 0 disables smoothing."""
    divergence_threshold: float = 4.0
    """Stop when the smoothed loss exceeds this times the best smoothed loss."""
    suggestion_method: SuggestionMethod = "steepest_gradient"
    """Rule that picks the suggested LR: steepest_gradient, valley or minimum."""
    step_mode: StepMode = "exp"
    """LR ladder spacing: exp (even in log space) or linear."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step; the ladder advances per optimizer step."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this before each step (unset: no clipping)."""
    amp: AmpMode = "no"
    """Mixed precision: no, bf16 (autocast) or fp16 (autocast + GradScaler, CUDA only)."""
    total_steps: int | None = None
    """Optimizer steps of your real training run, filled into the schedule recommendation."""
    extend_range: bool = True
    """When the loss has not turned up by max_lr, go on up the same ladder until it does or diverges (at most num_steps more steps, up to 1000 x max_lr); false: stop at max_lr."""
    val_every: int = 2
    """With a val_loader: record the validation loss every this many steps."""
    val_batches: int = 4
    """With a val_loader: the validation loss is the mean over this many of its batches, the same ones every time."""

    def __post_init__(self) -> None:
        _check_lr("min_lr", self.min_lr)
        _check_lr("max_lr", self.max_lr)
        if self.max_lr <= self.min_lr:
            raise ValueError(f"max_lr={self.max_lr!r} must be greater than min_lr={self.min_lr!r}; "
                             "please decrease min_lr or increase max_lr")
        for name, least in (("num_steps", 2), ("accumulation_steps", 1), ("val_every", 1), ("val_batches", 1)):
            value = getattr(self, name)
            if not is_int(value):
                raise TypeError(f"{name}={value!r} must be an int >= {least}, got {type(value).__name__}")
            if value < least:
                raise ValueError(f"{name}={value!r} is too small; allowed: an int >= {least}")
        if not is_real(self.smooth_factor) or not 0 <= self.smooth_factor < 1:
            raise ValueError(f"smooth_factor={self.smooth_factor!r} is not allowed; it is the weight on history and "
                             "must be in [0, 1) (0 disables smoothing; 0.98 is the default)")
        threshold = self.divergence_threshold
        if not is_real(threshold) or math.isnan(threshold) or threshold <= 1:
            raise ValueError(f"divergence_threshold={threshold!r} is not allowed; it must be a number > 1 "
                             "(stop when the smoothed loss exceeds threshold x the best loss; inf never stops)")
        check_choice("suggestion_method", self.suggestion_method, SUGGESTION_METHODS)
        check_choice("step_mode", self.step_mode, STEP_MODES)
        check_choice("amp", self.amp, AMP_MODES)
        norm = self.max_grad_norm
        if norm is not None and (not is_real(norm) or not math.isfinite(norm) or norm <= 0):
            raise ValueError(f"max_grad_norm={norm!r} is not allowed; use None (no clipping) or a number > 0")
        if not isinstance(self.extend_range, bool):
            raise TypeError(f"extend_range={self.extend_range!r} must be True or False")
        total = self.total_steps
        if total is not None and (not is_int(total) or total < 1):
            raise ValueError(f"total_steps={total!r} is not allowed; use None or an int >= 1")

    def as_dict(self) -> dict[str, Any]:
        """Every argument by name."""
        return dataclasses.asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The argument names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))


DEFAULTS = SweepArgs()
"""The defaults, which ``LRFinder.find()``'s signature reads: one place for each."""

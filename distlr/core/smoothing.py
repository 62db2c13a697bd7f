"""Loss smoothing and the divergence rule: the decision every rank takes alike after every step.

Pure math: no torch, no I/O. ``Ema`` is the one bias-corrected moving average distlr computes
(``ema`` runs it over a whole curve, for the rules' resampling); ``LossTracker`` is fed the
global mean loss of each step and says whether the range test must stop.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


class StopReason(str, enum.Enum):
    """Why a range test ended. A ``str``, so results compare and serialise as the plain words."""

    COMPLETED = "completed"
    """Every step of the ladder ran."""
    DIVERGED = "diverged"
    """The smoothed loss rose past ``divergence_threshold`` x its best."""
    NON_FINITE = "non_finite"
    """A loss was NaN or inf on some rank."""


@dataclass
class Ema:
    """The bias-corrected exponential moving average: ``avg = beta * avg + (1 - beta) * x``,
    reported as ``avg / (1 - beta ** n)`` so the first points are not dragged towards zero;
    ``beta`` is the weight on history (``smooth_factor``), 0 disables smoothing.

    Example:
        >>> e = Ema(0.5)
        >>> [e.update(x) for x in (4.0, 2.0)]
        [4.0, 2.6666666666666665]
    """

    beta: float
    _avg: float = 0.0
    _n: int = 0

    def update(self, x: float) -> float:
        self._avg = self.beta * self._avg + (1.0 - self.beta) * x
        self._n += 1
        return self._avg / (1.0 - self.beta ** self._n)


def ema(losses: Sequence[float], smooth_factor: float) -> np.ndarray:
    """``Ema`` over a whole curve: the numbers ``LossTracker`` records for these losses."""
    e = Ema(float(smooth_factor))
    return np.fromiter((e.update(float(x)) for x in losses), dtype=np.float64, count=len(losses))


WARMUP_STEPS = 5
"""The best smoothed loss is taken, and the divergence rule applied, from this step on: the
bias-corrected EMA of the first few batches is their noise alone (on the suggestion benchmark a
fine-tuned classifier whose batches' losses ranged over 0.05-1.5 "diverged" at step 2 against
its first batch, and at step 6 against the best of its first five). A loss that is not finite
stops the range test at any step. keras_lr_finder waits for batch > 5 alike."""


@dataclass
class LossTracker:
    """The smoothed loss (``Ema`` with weight ``smooth_factor`` on history), plus the divergence check.

    The range test diverges when a loss is not finite, or when the smoothed loss rises above
    ``divergence_threshold`` times the best smoothed loss from step ``WARMUP_STEPS`` on. For a
    negative best loss the rule is read as "rose by more than (threshold - 1) x |best|", which is
    the same test for a positive best and keeps a negative loss from stopping at once.

    Example:
        >>> t = LossTracker(smooth_factor=0.0, divergence_threshold=4.0)
        >>> [t.update(loss) for loss in (0.1, 5.0, 0.6, 0.5, 0.5, 2.5)]
        [False, False, False, False, False, True]
    """

    smooth_factor: float
    divergence_threshold: float
    smoothed: list[float] = field(default_factory=list)
    best: float = math.inf
    _ema: Ema = field(init=False)

    def __post_init__(self) -> None:
        self._ema = Ema(self.smooth_factor)

    def update(self, loss: float) -> bool:
        """Record one step's loss; return True when the range test has diverged at this step."""
        if not math.isfinite(loss):
            self.smoothed.append(math.nan)
            return True
        smoothed = self._ema.update(loss)
        self.smoothed.append(smoothed)
        if len(self.smoothed) < WARMUP_STEPS:
            return False
        if smoothed < self.best:
            self.best = smoothed
            return False
        return smoothed - self.best > (self.divergence_threshold - 1.0) * abs(self.best)

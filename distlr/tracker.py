"""Loss smoothing and the divergence rule: the decision every rank takes alike after every step.

Pure math: no torch, no I/O. ``LossTracker`` is fed the global mean loss of each step and says
whether the sweep must stop.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class StopReason(str, enum.Enum):
    """Why a sweep ended. A ``str``, so results compare and serialise as the plain words."""

    COMPLETED = "completed"
    """Every step of the ladder ran."""
    DIVERGED = "diverged"
    """The smoothed loss rose past ``divergence_threshold`` x its best."""
    NON_FINITE = "non_finite"
    """A loss was NaN or inf on some rank."""


WARMUP_STEPS = 5
"""The best smoothed loss is taken, and the divergence rule applied, from this step on: the
bias-corrected EMA of the first few batches is their noise alone (on the suggestion benchmark a
fine-tuned classifier whose batches' losses ranged over 0.05-1.5 "diverged" at step 2 against
its first batch, and at step 6 against the best of its first five). A loss that is not finite
stops the sweep at any step. keras_lr_finder waits for batch > 5 alike."""


@dataclass
class LossTracker:
    """Bias-corrected exponential moving average of the loss, plus the divergence check.

    ``smooth_factor`` is the weight on history (beta): ``avg = beta * avg + (1 - beta) * loss``,
    reported as ``avg / (1 - beta ** n)`` so the first points are not dragged towards zero.
    ``smooth_factor=0`` disables smoothing.

    The sweep diverges when a loss is not finite, or when the smoothed loss rises above
    ``divergence_threshold`` times the best smoothed loss from step ``WARMUP_STEPS`` on. For a negative best loss the
    rule is read as "rose by more than (threshold - 1) x |best|", which is the same test for a
    positive best and keeps a negative loss from stopping the sweep on its first step.

    Example:
        >>> t = LossTracker(smooth_factor=0.0, divergence_threshold=4.0)
        >>> [t.update(loss) for loss in (0.1, 5.0, 0.6, 0.5, 0.5, 2.5)]
        [False, False, False, False, False, True]
    """

    smooth_factor: float
    divergence_threshold: float
    smoothed: list[float] = field(default_factory=list)
    best: float = math.inf
    _avg: float = 0.0

    def update(self, loss: float) -> bool:
        """Record one step's loss; return True when the sweep has diverged at this step."""
        if not math.isfinite(loss):
            self.smoothed.append(math.nan)
            return True
        beta = self.smooth_factor
        self._avg = beta * self._avg + (1.0 - beta) * loss
        smoothed = self._avg / (1.0 - beta ** (len(self.smoothed) + 1))
        self.smoothed.append(smoothed)
        if len(self.smoothed) < WARMUP_STEPS:
            return False
        if smoothed < self.best:
            self.best = smoothed
            return False
        return smoothed - self.best > (self.divergence_threshold - 1.0) * abs(self.best)

"""The learning-rate ladder: the LR of every step of the range test.

Pure math: no torch, no I/O. The first step runs at ``min_lr`` and step ``num_steps - 1`` at
``max_lr``. A range that is extended past ``max_lr`` (``extend_range``) goes on at the same
spacing, up to a hard cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distlr.core.options import RangeTestArgs, StepMode

EXTENSION_FACTOR = 1000.0
"""An extended range ends at the latest at this many times ``max_lr`` (3 decades). On the
suggestion benchmark the loss of every task had turned up or diverged within 2 decades above
the LR it was still falling at (SGD tasks whose best LR is near 1 reached at the seed's
max_lr of 0.1); past 1000 x, no optimizer trains."""


@dataclass(frozen=True)
class Ladder:
    """The LRs of a range test: ``min_lr`` .. ``max_lr`` in ``num_steps`` points, evenly in
    log space (``"exp"``) or in LR (``"linear"``), continued past ``max_lr`` at the same spacing.

    Example:
        >>> ladder = Ladder(1e-4, 1e-1, 4)
        >>> [f"{ladder.lr(i):.0e}" for i in range(5)]
        ['1e-04', '1e-03', '1e-02', '1e-01', '1e+00']
        >>> ladder.extension_cap
        3
    """

    min_lr: float
    max_lr: float
    num_steps: int
    step_mode: StepMode = "exp"

    def __post_init__(self) -> None:
        RangeTestArgs(min_lr=self.min_lr, max_lr=self.max_lr, num_steps=self.num_steps, step_mode=self.step_mode)

    def lr(self, index: int) -> float:
        """The LR of step ``index`` (0-based); past ``num_steps - 1`` the ladder goes on."""
        if index == 0:
            return self.min_lr
        if index == self.num_steps - 1:
            return self.max_lr
        share = index / (self.num_steps - 1)
        if self.step_mode == "linear":
            return self.min_lr + (self.max_lr - self.min_lr) * share
        # Interpolate the exponent rather than multiplying by a ratio step after step, so rounding
        # does not accumulate along a long ladder.
        log_min, log_max = math.log(self.min_lr), math.log(self.max_lr)
        return math.exp(log_min + (log_max - log_min) * share)

    @property
    def extension_cap(self) -> int:
        """How many steps past ``max_lr`` an extended range may take: up to
        ``EXTENSION_FACTOR`` x ``max_lr``, and never more than ``num_steps``."""
        last = self.num_steps - 1
        if self.step_mode == "linear":
            per_step = (self.max_lr - self.min_lr) / last
            reach = (EXTENSION_FACTOR - 1.0) * self.max_lr / per_step
        else:
            reach = math.log(EXTENSION_FACTOR) / (math.log(self.max_lr / self.min_lr) / last)
        return min(self.num_steps, int(math.floor(reach + 1e-9)))

    def lrs(self) -> list[float]:
        """The ``num_steps`` LRs from ``min_lr`` to ``max_lr``."""
        return [self.lr(i) for i in range(self.num_steps)]


def lr_ladder(min_lr: float, max_lr: float, num_steps: int, step_mode: StepMode = "exp") -> list[float]:
    """Return the ``num_steps`` learning rates of a range test.

    ``"exp"`` spaces them evenly in log space (each step multiplies the LR by the same factor),
    ``"linear"`` evenly in LR. Both start exactly at ``min_lr`` and end exactly at ``max_lr``.

    Args:
        min_lr: LR of the first step, > 0.
        max_lr: LR of the last step, > ``min_lr``.
        num_steps: number of points, >= 2.
        step_mode: ``"exp"`` (default) or ``"linear"``.

    Returns:
        A list of ``num_steps`` increasing floats.

    Raises:
        ValueError / TypeError: a bad argument (checked by ``RangeTestArgs``, the one place these are).

    Example:
        >>> [f"{lr:.0e}" for lr in lr_ladder(1e-4, 1e-1, 4)]
        ['1e-04', '1e-03', '1e-02', '1e-01']
    """
    return Ladder(min_lr, max_lr, num_steps, step_mode).lrs()

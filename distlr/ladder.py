"""The learning-rate ladder: the LR of every step of the sweep.

Pure math: no torch, no I/O. The first step runs at ``min_lr`` and the last at ``max_lr``.
"""

from __future__ import annotations

import math

from distlr.args import SweepArgs
from distlr.choices import StepMode


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
        ValueError / TypeError: a bad argument (checked by ``SweepArgs``, the one place these are).

    Example:
        >>> [f"{lr:.0e}" for lr in lr_ladder(1e-4, 1e-1, 4)]
        ['1e-04', '1e-03', '1e-02', '1e-01']
    """
    SweepArgs(min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, step_mode=step_mode)
    last = num_steps - 1
    if step_mode == "linear":
        lrs = [min_lr + (max_lr - min_lr) * i / last for i in range(num_steps)]
    else:
        # Interpolate the exponent rather than multiplying by a ratio step after step, so rounding
        # does not accumulate along a long ladder.
        log_min, log_max = math.log(min_lr), math.log(max_lr)
        lrs = [math.exp(log_min + (log_max - log_min) * i / last) for i in range(num_steps)]
    lrs[0], lrs[-1] = min_lr, max_lr
    return lrs

"""Pure math for batch-size series: how a learning rate scales with the global batch size, and
how the global batch is split into micro-batches, ranks and accumulation. numpy only, no I/O.

The fit is ``lr = coefficient * B ** exponent``, least squares on ``log lr`` against ``log B``
(every repeat one point), so it can be read against the two published scaling rules: linear
(exponent 1, Goyal et al. 2017) and square root (0.5, Krizhevsky 2014; Hoffer et al. 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PowerFit:
    """``lr = coefficient * B ** exponent`` over ``points`` suggestions at ``sizes`` batch sizes."""

    coefficient: float
    exponent: float
    exponent_stderr: float | None
    """Standard error of the exponent; None with fewer than 3 points (no residual left)."""
    points: int
    sizes: int

    def predict(self, global_batch_size: float) -> float:
        return self.coefficient * global_batch_size ** self.exponent

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def fit_power_law(batch_sizes: Sequence[float], lrs: Sequence[float | None]) -> PowerFit | None:
    """The power law through ``(batch_sizes[i], lrs[i])``; points without an LR are left out.

    Returns None when fewer than two distinct batch sizes have an LR (no slope to fit).

    Example:
        >>> fit = fit_power_law([16, 64, 256], [1e-3, 2e-3, 4e-3])
        >>> round(fit.exponent, 6), round(fit.predict(1024), 6)
        (0.5, 0.008)
    """
    pairs = [(float(b), float(lr)) for b, lr in zip(batch_sizes, lrs)
             if lr is not None and lr > 0 and math.isfinite(lr) and b > 0]
    if len({b for b, _ in pairs}) < 2:
        return None
    x = np.log([b for b, _ in pairs])
    y = np.log([lr for _, lr in pairs])
    slope, intercept = np.polyfit(x, y, 1)
    stderr = None
    n = len(pairs)
    if n > 2:
        residuals = y - (slope * x + intercept)
        spread = float(np.sum((x - x.mean()) ** 2))
        stderr = float(math.sqrt(float(np.sum(residuals ** 2)) / (n - 2) / spread))
    return PowerFit(coefficient=float(math.exp(intercept)), exponent=float(slope), exponent_stderr=stderr,
                    points=n, sizes=len({b for b, _ in pairs}))


@dataclass(frozen=True)
class Spread:
    """How far the suggestion moved over repeats at one batch size."""

    geometric_mean: float | None
    min: float | None
    max: float | None
    answered: int
    repeats: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def spread(lrs: Sequence[float | None]) -> Spread:
    """Geometric mean, min and max of the suggestions that exist (a repeat may have none).

    Example:
        >>> s = spread([1e-3, 4e-3, None])
        >>> round(s.geometric_mean, 6), s.answered, s.repeats
        (0.002, 2, 3)
    """
    found = [float(lr) for lr in lrs if lr is not None and lr > 0 and math.isfinite(lr)]
    if not found:
        return Spread(None, None, None, 0, len(lrs))
    return Spread(float(math.exp(np.mean(np.log(found)))), min(found), max(found), len(found), len(lrs))


def check_series_args(global_batch_sizes: Sequence[Any] | None, repeats: Any, target_global_batch_size: Any,
                      *, accumulation_given: bool = False) -> None:
    """The one check of a series' arguments (``LRFinder.series`` and the command line's).

    Raises:
        ValueError: naming the argument, its value and what is allowed.
    """
    from distlr.core.options import is_int

    if accumulation_given and global_batch_sizes is not None:
        raise ValueError("accumulation_steps with global_batch_sizes: each size's split into micro-batch x ranks x "
                         "accumulation decides the accumulation; leave accumulation_steps out")
    if not is_int(repeats) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is not allowed; use an int >= 1")
    if global_batch_sizes is not None:
        sizes = list(global_batch_sizes)
        if not sizes or any(not is_int(b) or b < 1 for b in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError(f"global_batch_sizes={sizes!r} is not allowed; use distinct ints >= 1 (16,32,64)")
    if target_global_batch_size is not None and (not is_int(target_global_batch_size) or target_global_batch_size < 1):
        raise ValueError(f"target_global_batch_size={target_global_batch_size!r} is not allowed; use an int >= 1")
    if target_global_batch_size is not None and len(set(global_batch_sizes or ())) < 2:
        raise ValueError(f"target_global_batch_size={target_global_batch_size!r} needs a fit of LR against batch "
                         "size, so two or more global_batch_sizes (e.g. --global-batch-sizes 16,32,64); "
                         f"got {'none' if not global_batch_sizes else list(global_batch_sizes)}")


def split_global_batch(global_batch_size: int, world_size: int, max_micro_batch: int) -> tuple[int, int]:
    """``(micro_batch, accumulation_steps)`` with micro x ``world_size`` x accumulation =
    ``global_batch_size``: the largest micro-batch up to ``max_micro_batch`` (the fewest
    accumulation steps, so the fewest forward passes).

    Raises:
        ValueError: ``global_batch_size`` is not a multiple of ``world_size``, naming the nearest
            sizes that are.

    Example:
        >>> split_global_batch(64, 2, 8)
        (8, 4)
        >>> split_global_batch(24, 2, 8)
        (6, 2)
    """
    if global_batch_size < 1 or global_batch_size % world_size:
        below = max(world_size, global_batch_size // world_size * world_size)
        above = (global_batch_size // world_size + 1) * world_size
        near = f"{below} or {above}" if below != above and below < global_batch_size else f"{above}"
        raise ValueError(f"global_batch_sizes: {global_batch_size} cannot be formed by {world_size} ranks (each "
                         f"rank reads the same number of samples); the nearest that can: {near}")
    per_rank = global_batch_size // world_size
    micro = max(d for d in range(1, min(per_rank, max_micro_batch) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


@dataclass
class SeriesRun:
    """One range test of a series: its global batch, how it was split, its data seed, its result."""

    global_batch_size: int
    repeat: int
    seed: int
    micro_batch_size: int
    accumulation_steps: int
    result: Any
    """The run's ``LRFinderResult``."""

    def to_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k != "result"}
        return {**fields, "result": self.result.to_dict()}


@dataclass
class SeriesResult:
    """Every run of a series, each batch size's spread over repeats, and the power-law fit of the
    suggestion against the global batch size."""

    runs: list[SeriesRun]
    world_size: int
    target_global_batch_size: int | None = None
    planned: int | None = None
    """How many runs the series was to make (None: as many as it holds)."""

    @property
    def complete(self) -> bool:
        """Whether every planned run finished (False for a series interrupted part way)."""
        return self.planned is None or len(self.runs) >= self.planned

    @property
    def fit(self) -> PowerFit | None:
        return fit_power_law([r.global_batch_size for r in self.runs], [r.result.optimal_lr for r in self.runs])

    def spreads(self) -> dict[int, Spread]:
        sizes = sorted({r.global_batch_size for r in self.runs})
        return {b: spread([r.result.optimal_lr for r in self.runs if r.global_batch_size == b]) for b in sizes}

    def prediction(self) -> dict[str, Any] | None:
        """The fit's LR at ``target_global_batch_size``, marked when it lies outside the sizes
        the fit was made from (those with a suggestion)."""
        fit = self.fit
        if self.target_global_batch_size is None or fit is None:
            return None
        sizes = [r.global_batch_size for r in self.runs if r.result.optimal_lr is not None]  # what the fit saw
        target = self.target_global_batch_size
        return {"global_batch_size": target, "lr": fit.predict(target),
                "extrapolation": not min(sizes) <= target <= max(sizes)}

    def to_dict(self) -> dict[str, Any]:
        fit = self.fit
        return {"world_size": self.world_size, "complete": self.complete,
                "runs_planned": len(self.runs) if self.planned is None else self.planned,
                "runs": [r.to_dict() for r in self.runs],
                "fit": None if fit is None else fit.to_dict(),
                "spread": {str(b): s.to_dict() for b, s in self.spreads().items()},
                "prediction": self.prediction()}


SweepRun, SweepResult = SeriesRun, SeriesResult
"""Deprecated spellings of ``SeriesRun`` and ``SeriesResult``; they go in the next release."""

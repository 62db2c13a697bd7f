"""A recorded range-test curve, and the zero-lag view of it that the suggestion rules read.

Pure math: numpy only, no torch, no I/O. The range test keeps the seed's bias-corrected EMA of the
loss for its stop decision, but an EMA with weight ``beta`` on history trails the raw losses
by about ``1 / (1 - beta)`` points (50 at the default 0.98), which moves every "steepest"
reading to larger LRs. ``local_linear`` is a symmetric (zero-lag) smoother instead: at every
point it fits a straight line to the raw losses around it against log10(lr), weighted by a
Gaussian kernel over point indices, and reports the line's level and slope there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from distlr.core.smoothing import ema

KERNEL_REACH = 3.0
"""The Gaussian kernel is cut at this many widths (it holds 99.7 % of the weight there)."""


@dataclass(frozen=True, eq=False)
class Curve:
    """The points of one range test that a rule may read, before divergence.

    ``lrs`` is the ladder (positive, strictly increasing), ``losses`` the raw global loss of
    each step and ``smoothed`` the bias-corrected EMA the range test recorded. All three are float64
    arrays of one length, finite.

    Example:
        >>> c = Curve.of([1e-3, 1e-2, 1e-1], [2.0, 1.5, 1.0])
        >>> c.smoothed.round(3).tolist()      # EMA with the default weight 0.98
        [2.0, 1.747, 1.493]
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    designs: dict[float, Design] = field(default_factory=dict, compare=False, repr=False)
    """The ladder-only part of ``local_linear`` at each width read so far; curves on the same
    ladder (``with_losses``) share it, so the bootstrap's draws compute it once."""

    @classmethod
    def of(cls, lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float] | None = None,
           *, smooth_factor: float = 0.98) -> Curve:
        """Check and wrap a curve; ``smoothed=None`` computes the EMA with ``smooth_factor``.

        Raises:
            ValueError: mismatched lengths, non-finite values, or a ladder that is not positive
                and strictly increasing (naming the first bad entry).
        """
        lr_arr = _vector("lrs", lrs)
        loss_arr = _vector("losses", losses)
        smooth_arr = ema(loss_arr, smooth_factor) if smoothed is None else _vector("smoothed", smoothed)
        if not len(lr_arr) == len(loss_arr) == len(smooth_arr):
            raise ValueError(f"lrs, losses and smoothed must have the same length; got {len(lr_arr)}, "
                             f"{len(loss_arr)} and {len(smooth_arr)}")
        if lr_arr.size and lr_arr[0] <= 0:
            raise ValueError(f"lrs must be positive; lrs[0]={lr_arr[0]!r}")
        not_rising = np.flatnonzero(np.diff(lr_arr) <= 0)
        if not_rising.size:
            i = int(not_rising[0])
            raise ValueError(f"lrs must be strictly increasing; lrs[{i}]={lr_arr[i]!r} is followed by "
                             f"lrs[{i + 1}]={lr_arr[i + 1]!r}")
        return cls(lr_arr, loss_arr, smooth_arr)

    def __len__(self) -> int:
        return len(self.lrs)

    def with_losses(self, losses: np.ndarray, smoothed: np.ndarray) -> Curve:
        """The same ladder with other losses (unchecked: for resampling a checked curve)."""
        return Curve(self.lrs, losses, smoothed, self.designs)

    def head(self, n: int) -> Curve:
        """The first ``n`` points."""
        return Curve(self.lrs[:n], self.losses[:n], self.smoothed[:n])

    def trend(self, width: float, *, noise: float | None = None) -> LocalFit:
        """``local_linear`` of the raw losses against log10(lr) with a kernel of ``width`` points."""
        if width not in self.designs:
            self.designs[width] = design(np.log10(self.lrs), width)
        return local_linear(self.designs[width], self.losses, noise=noise)


def _vector(name: str, values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} must be finite; {name}[{bad[0]}]={arr[bad[0]]!r} "
                         "(cut the curve where the range test diverged before suggesting)")
    return arr


@dataclass(frozen=True)
class LocalFit:
    """The zero-lag reading of a curve (``local_linear``)."""

    level: np.ndarray
    """The smoothed loss at each point (same shape as the losses given)."""
    slope: np.ndarray
    """d loss / d log10(lr) at each point."""
    noise: float
    """Robust standard deviation of one raw loss around the trend."""
    level_sd: np.ndarray
    """Standard deviation that ``noise`` leaves in ``level`` at each point: the smoother averages
    it down, least at the ends, where the window is one-sided."""


def kernel(width: float) -> np.ndarray:
    """Gaussian weights over point offsets ``-reach..reach`` for a kernel of ``width`` points."""
    reach = max(1, math.ceil(KERNEL_REACH * width))
    offsets = np.arange(-reach, reach + 1, dtype=np.float64)
    return np.exp(-0.5 * (offsets / width) ** 2)


def _window_sum(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_j w[j - i] * values[j]`` at every index i, the window cut at the ends."""
    reach = len(weights) // 2
    # The kernel is symmetric, so convolution is the windowed sum; "full" then the centred
    # slice works for a kernel longer than the curve too.
    return np.convolve(values, weights, mode="full")[reach: reach + len(values)]


@dataclass(frozen=True, eq=False)
class Design:
    """What a local linear fit on one ladder with one kernel needs, whatever the losses: the
    kernel, the centred windowed sums of the ladder and the variance factor of the level."""

    x: np.ndarray
    """log10 of the ladder."""
    weights: np.ndarray
    s0: np.ndarray
    s1: np.ndarray
    den: np.ndarray
    spread: np.ndarray
    """``sum_j l_ij^2`` for the level's weights ``l_ij`` (the level's variance is noise^2 x it)."""


def design(log_lrs: np.ndarray, width: float) -> Design:
    """The ladder-only part of ``local_linear`` (six of its eight windowed sums)."""
    w = kernel(width)
    x = np.asarray(log_lrs, dtype=np.float64)
    s0 = _window_sum(np.ones_like(x), w)
    sx = _window_sum(x, w)
    sxx = _window_sum(x * x, w)
    # Sums of the centred offsets dx = x_j - x_i, expanded so each is one windowed sum.
    s1 = sx - x * s0
    s2 = sxx - 2.0 * x * sx + x * x * s0
    den = s0 * s2 - s1 * s1
    # level_i = sum_j l_ij y_j with l_ij = w_ij (S2 - dx_ij S1) / den, so for independent noise
    # var(level_i) = noise^2 sum_j l_ij^2, expanded into windowed sums with the kernel squared.
    w2 = w * w
    u0 = _window_sum(np.ones_like(x), w2)
    ux = _window_sum(x, w2)
    u1 = ux - x * u0
    u2 = _window_sum(x * x, w2) - 2.0 * x * ux + x * x * u0
    spread = np.divide(s2 * s2 * u0 - 2.0 * s2 * s1 * u1 + s1 * s1 * u2, den * den, out=np.ones_like(x),
                       where=den > 0)
    return Design(x=x, weights=w, s0=s0, s1=s1, den=den, spread=np.maximum(spread, 0.0))


def local_linear(design_or_log_lrs: Design | np.ndarray, losses: np.ndarray, width: float | None = None, *,
                 noise: float | None = None) -> LocalFit:
    """Kernel-weighted local linear fit of ``losses`` against log10(lr) at every point.

    Near the ends the window is one-sided, which a local *linear* fit handles without the pull
    towards the interior that a moving average has.

    Args:
        design_or_log_lrs: a ``Design`` (``design(log_lrs, width)``, reusable for any losses on
            that ladder), or log10 of the ladder, shape ``(n,)``, with ``width``.
        losses: raw losses, shape ``(n,)``.
        width: the kernel's standard deviation, in points (>= 1), when no ``Design`` is given.
        noise: the curve's ``noise_level`` when the caller already has it.
    """
    d = design_or_log_lrs if isinstance(design_or_log_lrs, Design) else design(design_or_log_lrs, float(width))
    t0 = _window_sum(losses, d.weights)
    t1 = _window_sum(losses * d.x, d.weights) - d.x * t0
    slope = np.divide(d.s0 * t1 - d.s1 * t0, d.den, out=np.zeros_like(t0), where=d.den > 0)
    level = (t0 - slope * d.s1) / d.s0
    noise = noise_level(losses) if noise is None else noise
    return LocalFit(level=level, slope=slope, noise=noise, level_sd=noise * np.sqrt(d.spread))


def noise_level(losses: np.ndarray) -> float:
    """Robust standard deviation of the batch-to-batch noise of a raw curve.

    Second differences ``y[i+1] - 2 y[i] + y[i-1]`` cancel any locally straight trend and have
    variance ``6 sigma^2`` for independent noise; their median absolute deviation (x 1.4826,
    the normal consistency factor) ignores the few large ones at bends and spikes.
    """
    if len(losses) < 3:
        return 0.0
    d2 = losses[2:] - 2.0 * losses[1:-1] + losses[:-2]
    mad = _median(np.abs(d2 - _median(d2)))
    return 1.4826 * mad / math.sqrt(6.0)


def _median(values: np.ndarray) -> float:
    # np.median's checks cost more than the partition itself on a curve's few hundred points,
    # and the bootstrap behind result.confidence takes thousands of these medians.
    n = len(values)
    part = np.partition(values, [(n - 1) // 2, n // 2])
    return 0.5 * float(part[(n - 1) // 2] + part[n // 2])

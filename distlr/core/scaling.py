"""Pure math for batch-size series: how a learning rate scales with the global batch size, and
how the global batch is split into micro-batches, ranks and accumulation. numpy only, no I/O.
(``distlr.core.series`` holds a series' runs and what they say on every axis.)

The fit is ``lr = coefficient * B ** exponent``, least squares on ``log lr`` against ``log B``
(every repeat one point), so it can be read against the two published scaling rules: linear
(exponent 1, Goyal et al. 2017) and square root (0.5, Krizhevsky 2014; Hoffer et al. 2017).
``fit_saturating`` adds a bend, ``lr = c * min(B, bend) ** exponent``: the batch size beyond which
the LR stops rising (the critical batch size seen from the LR side), and whether the data show one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any, Literal

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
    pairs = usable_pairs(batch_sizes, lrs)
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


# -- where the batch-size law bends --------------------------------------------------------------

Verdict = Literal["bends", "no_bend", "flat", "cannot_tell"]

BEND_LEVEL = 0.95
"""Confidence of the interval on the bend, so 1 - BEND_LEVEL is the level of the tests behind the
verdict: the 95% a reader expects beside a ± standard error."""

_GRID_STEP = 0.005
"""Spacing of the bends tried, in ln B (0.5% in B): far finer than any interval a range test's
noise allows, and few enough (about 1,100 over 16 to 4,096) to try all at once."""

_EXACT = 1e-20
"""A residual sum of squares under this fraction of the total is rounding, not noise: an exact fit
leaves residuals near 1e-14 on ln lr of order 1 to 10 (1e-28 of the total), while the quietest real
suggestions, 1e-6 apart in ln lr, leave about 1e-12."""

_RISE_FLOOR = 0.5
"""With a fitted slope, ``flat`` bounds the bend by a rise this steep: square-root scaling, the
milder of the two published rules (a rise of slope 0 would fit a bend anywhere)."""


@dataclass(frozen=True)
class SaturatingFit:
    """``lr = c * min(B, bend) ** exponent``: the suggestion rises as a power of the global batch
    size B up to a bend and is flat beyond it, and whether the data support the bend. The bend is
    the critical batch size seen from the LR side: beyond it a larger batch buys no larger LR."""

    verdict: Verdict
    """``bends``: a bend inside the sizes run, supported by the data. ``no_bend``: the plain power
    law is as good, the LR still rises at the largest size (``bend_low`` bounds the bend from below).
    ``flat``: no rise at all (``bend_high`` bounds it from above). ``cannot_tell``: too few sizes or
    points, or too much noise; ``reason`` says what is needed."""
    reason: str
    """Why the verdict: the tests behind it, or what the data lack."""
    exponent: float
    """Slope of ln lr against ln B below the bend: the bent model's for ``bends`` (the ``slope``
    given, if any); otherwise the plain power law's over every point, as ``fit_power_law``."""
    exponent_stderr: float | None
    """Standard error of ``exponent``; for ``bends`` it includes the bend's own uncertainty. None
    when the slope was given or no residual is left."""
    bend: float | None
    """The batch size where the LR stops rising, by least squares; None unless ``bends``."""
    bend_low: float | None
    """Lower end of the ``BEND_LEVEL`` profile-likelihood interval on the bend; None when it reaches the
    smallest size (a flat LR fits: the bend may be at or below it)."""
    bend_high: float | None
    """Upper end of that interval; None when it reaches the largest size (the plain power law fits:
    the bend may be beyond it). For ``flat`` with a fitted slope: where a rise as steep as
    B^0.5 would have had to stop (a rise of slope 0 fits a bend anywhere)."""
    plateau_lr: float | None
    """The LR beyond the bend (``bends``) or at every size (``flat``); None otherwise."""
    p_no_bend: float | None
    """p-value of "no bend in range" (the plain power law fits as well as the bent one), an F-test on
    the residuals of the nested models: under 1 - BEND_LEVEL, the bend earns its extra parameter."""
    p_flat: float | None
    """p-value of "flat from the smallest size on" (the same test with the bend there)."""
    points: int
    sizes: int
    min_size: float
    max_size: float
    slope: float | None = None
    """The slope below the bend when it was given (``slope=``); None: fitted."""

    def to_dict(self) -> dict[str, Any]:
        """The fields, JSON-safe (a number that is not finite becomes None)."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line for the terminal, e.g. ``the LR stops rising near B=512 (437 to 572); below it
        lr ∝ B^0.97±0.03, above it lr ≈ 3.06e-02``."""
        err = "" if self.exponent_stderr is None else f"±{self.exponent_stderr:.2f}"
        law = f"lr ∝ B^{self.exponent:.2f}{err}"
        if self.verdict == "bends":
            return (f"the LR stops rising near B={self.bend:,.0f} ({self.bend_low:,.0f} to {self.bend_high:,.0f}); "
                    f"below it {law}, above it lr ≈ {self.plateau_lr:.2e}")
        if self.verdict == "no_bend":
            return f"the LR still rises at B={self.max_size:,.0f}: no bend below B={self.bend_low:,.0f}; {law}"
        if self.verdict == "flat":
            rise = _RISE_FLOOR if self.slope is None else self.slope
            return (f"the LR does not rise with B: lr ≈ {self.plateau_lr:.2e} from B={self.min_size:,.0f} to "
                    f"{self.max_size:,.0f}; a rise as steep as B^{rise:g} stops by B={self.bend_high:,.0f}")
        return f"cannot tell where the LR stops rising: {self.reason}"


def fit_saturating(batch_sizes: Sequence[float], lrs: Sequence[float | None], *,
                   slope: float | None = None) -> SaturatingFit | None:
    """Where the batch-size law bends: ``lr = c * min(B, bend) ** exponent`` through the suggestions,
    least squares on ln lr against ln B (every repeat one point; points without an LR left out),
    tested against the plain power law (a bend beyond the largest size) and a flat LR (a bend at
    or below the smallest).

    The bend is profiled: for each bend tried (every 0.5% in B, the sizes themselves, and each
    stretch's exact optimum) the rest is linear least squares. The interval is the profile
    likelihood's: every bend whose residual sum of squares exceeds the best by less than the F(1,
    n - p) quantile at ``BEND_LEVEL`` times the residual variance (Bates and Watts 1988, ch. 6). Unlike a
    ± standard error on ln B it may be lopsided and may run off the sizes run, which is the
    verdict: an interval that reaches the largest size means the plain power law fits
    (``no_bend``), one that reaches only the smallest a flat LR (``flat``). With a fitted slope a
    flat LR fits a bend anywhere (a rise of slope 0), so ``flat`` then also needs a rise as steep
    as square-root scaling to have stopped inside the sizes run; else it is ``cannot_tell``.

    Args:
        batch_sizes: the global batch size of each run.
        lrs: each run's suggested LR; None, NaN, inf or <= 0 where a run gave none.
        slope: the exponent below the bend when a rule fixes it (1 linear, 0.5 square root); None
            fits it. A fitted slope needs two sizes at or below the bend, so a rise between the
            two smallest sizes reads as a bend at the second (with the interval reaching the first).

    Returns:
        The fit, with verdict ``cannot_tell`` for two sizes or too few points to leave a residual;
        None when fewer than two distinct sizes have an LR, as ``fit_power_law``.

    Raises:
        ValueError: ``batch_sizes`` and ``lrs`` differ in length, or ``slope`` is not a number > 0.

    Example:
        >>> sizes = [b for b in (64, 128, 256, 512, 1024, 2048) for _ in range(2)]
        >>> noise = [1.05, 0.95, 0.97, 1.03, 1.02, 0.98, 0.96, 1.04, 1.01, 0.99, 1.03, 0.97]
        >>> fit = fit_saturating(sizes, [1e-3 * min(b, 512) / 64 * e for b, e in zip(sizes, noise)])
        >>> fit.verdict, round(fit.bend), round(fit.exponent, 2)
        ('bends', 512, 1.0)
    """
    if len(batch_sizes) != len(lrs):
        raise ValueError(f"batch_sizes has {len(batch_sizes)} values and lrs {len(lrs)}; pass one LR per run")
    if slope is not None and (isinstance(slope, bool) or not isinstance(slope, Real) or not math.isfinite(slope)
                              or slope <= 0):
        raise ValueError(f"slope={slope!r} is not allowed; use a number > 0 (1 linear, 0.5 square root) or None")
    power = fit_power_law(batch_sizes, lrs)
    if power is None:
        return None
    pairs = usable_pairs(batch_sizes, lrs)
    x, y = np.log([b for b, _ in pairs]), np.log([lr for _, lr in pairs])
    sizes = np.unique(x)
    params = 2 if slope is not None else 3  # the bent model's: c and the bend, and the slope if fitted
    seen = dict(points=len(x), sizes=len(sizes), min_size=min(b for b, _ in pairs), max_size=max(b for b, _ in pairs),
                slope=None if slope is None else float(slope))
    plain = dict(exponent=power.exponent, exponent_stderr=power.exponent_stderr, bend=None, plateau_lr=None)
    if len(sizes) < 3 or len(x) <= params:
        if len(sizes) < 3:
            reason = (f"{len(sizes)} batch sizes have an LR; a bend needs 3 or more (two on the rise, one beyond), "
                      "and more on each side to place it")
        else:
            reason = (f"{len(x)} points fit any bend exactly; run repeats or more sizes (more than {params} points "
                      "in all) to leave residuals to judge a bend against")
        return SaturatingFit(verdict="cannot_tell", reason=reason, **plain, bend_low=None, bend_high=None,
                             p_no_bend=None, p_flat=None, **seen)

    fit = _Profile.of(x, y, sizes, slope)
    p_flat, p_no_bend = fit.p_value(0), fit.p_value(-1)  # fit.bends run from the smallest size to the largest
    tests = dict(bend_low=fit.low(seen["min_size"]), bend_high=fit.high(), p_no_bend=p_no_bend, p_flat=p_flat)
    if not fit.inside[0] and not fit.inside[-1]:
        stderr = None if slope is not None else fit.slope_stderr()
        return SaturatingFit(verdict="bends", reason=f"the bend beats the plain power law (p={p_no_bend:.2g}) and a "
                             f"flat LR (p={p_flat:.2g})", exponent=fit.slope, exponent_stderr=stderr,
                             bend=fit.bend, plateau_lr=fit.plateau, **tests, **seen)
    if not fit.inside[0]:
        return SaturatingFit(verdict="no_bend", reason=f"a bend does not beat the plain power law "
                             f"(p={p_no_bend:.2g})", **plain, **tests, **seen)
    # A flat LR fits. Where a fitted slope can be 0, bound the bend by a rise of the milder rule's.
    rise = _RISE_FLOOR if slope is None else slope
    high = fit.high() if slope is not None else _Profile.of(x, y, sizes, rise).high()
    if high is None:
        noise = math.exp(math.sqrt(fit.rss[fit.best] / fit.dof))
        return SaturatingFit(verdict="cannot_tell", reason=f"a flat LR and one rising as B^{rise:g} up to "
                             f"B={seen['max_size']:,.0f} both fit the {len(x)} points (noise ×{noise:.2f} a run); run "
                             "more repeats per size or sizes over a wider range", **plain, **tests, **seen)
    return SaturatingFit(verdict="flat", reason=f"a rise does not beat a flat LR (p={p_flat:.2g})",
                         **{**plain, "plateau_lr": float(math.exp(y.mean()))}, **{**tests, "bend_high": high}, **seen)


@dataclass(frozen=True, eq=False)
class _Profile:
    """The bent model's least squares at each bend tried, and which bends the data cannot reject."""

    bends: np.ndarray
    """ln B of each bend tried, from the smallest size (flat) to the largest (no bend)."""
    rss: np.ndarray
    a: np.ndarray
    c: np.ndarray
    best: int
    dof: int
    statistic: np.ndarray
    """F(1, dof) of each bend against the best."""
    inside: np.ndarray
    """The bends inside the ``BEND_LEVEL`` interval."""
    x: np.ndarray
    fitted_slope: bool

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, sizes: np.ndarray, slope: float | None) -> _Profile:
        bends = _bends_to_try(x, y, sizes, slope)
        rss, a, c = _profile(x, y, bends, slope)
        best = int(np.argmin(rss))
        dof = len(x) - (3 if slope is None else 2)
        statistic = _f_statistics(rss, best, dof, total=float(np.sum((y - y.mean()) ** 2)))
        return cls(bends, rss, a, c, best, dof, statistic, statistic <= _f_quantile(BEND_LEVEL, 1, dof), x,
                   fitted_slope=slope is None)

    @property
    def bend(self) -> float:
        return float(math.exp(self.bends[self.best]))

    @property
    def slope(self) -> float:
        return float(self.a[self.best])

    @property
    def plateau(self) -> float:
        return float(math.exp(self.c[self.best] + self.a[self.best] * self.bends[self.best]))

    def p_value(self, i: int) -> float:
        return _f_sf(float(self.statistic[i]), 1, self.dof)

    def low(self, min_size: float) -> float | None:
        """The interval's lower end (of the hull: a profile with two dips gives one interval over
        both); None when it reaches the smallest size itself (a flat LR)."""
        if self.inside[0]:
            return None
        if self.fitted_slope and self.inside[1]:
            # A fitted slope fits a bend anywhere between the two smallest sizes as well as at the second.
            return min_size
        return float(math.exp(self.bends[self.inside].min()))

    def high(self) -> float | None:
        """The interval's upper end; None when it reaches the largest size (the plain power law)."""
        return None if self.inside[-1] else float(math.exp(self.bends[self.inside].max()))

    def slope_stderr(self) -> float | None:
        """Standard error of the slope from the bent model's linearisation in (c, a, bend), so the
        bend's uncertainty counts (Muggeo 2003: moving the bend moves each point above it by ``a``)."""
        bend = self.bends[self.best]
        jacobian = np.column_stack([np.ones_like(self.x), np.minimum(self.x, bend), self.slope * (self.x > bend)])
        information = jacobian.T @ jacobian
        # 1e12: beyond this condition number the inverse is noise (12 of float64's 16 digits lost).
        if np.linalg.cond(information) > 1e12:
            return None
        return float(math.sqrt(self.rss[self.best] / self.dof * np.linalg.inv(information)[1, 1]))


def usable_pairs(batch_sizes: Sequence[float], lrs: Sequence[float | None]) -> list[tuple[float, float]]:
    """The ``(value, lr)`` pairs a fit can use: an LR that exists, is finite and > 0, at a value > 0
    (a global batch size, a width, a num_steps)."""
    return [(float(b), float(lr)) for b, lr in zip(batch_sizes, lrs)
            if lr is not None and lr > 0 and math.isfinite(lr) and b > 0]


def _bends_to_try(x: np.ndarray, y: np.ndarray, sizes: np.ndarray, slope: float | None) -> np.ndarray:
    """ln B of every bend to try, sorted, from the smallest size (flat) to the largest (no bend):
    a fine grid, the sizes, and between each two neighbouring sizes the exact best bend there
    (the line through the points below meets the mean of those above) when it falls between them."""
    # A fitted slope needs two sizes on the rise: the first stretch is tried at its top end only.
    start = sizes[0] if slope is not None else sizes[1]
    grid = np.linspace(start, sizes[-1], int(math.ceil((sizes[-1] - start) / _GRID_STEP)) + 1)
    exact = []
    for below, above in zip(sizes[:-1], sizes[1:]):
        left, right = x <= below, x >= above
        if below < start or (slope is None and len(np.unique(x[left])) < 2):
            continue
        if slope is None:
            a, c = np.polyfit(x[left], y[left], 1)
        else:
            a, c = slope, float(np.mean(y[left] - slope * x[left]))
        meet = (np.mean(y[right]) - c) / a if a > 0 else -math.inf
        if below < meet < above:
            exact.append(meet)
    return np.unique(np.concatenate([sizes[:1], grid, sizes[sizes >= start], exact]))


def _profile(x: np.ndarray, y: np.ndarray, bends: np.ndarray,
             slope: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each bend (ln B), the least squares of ``ln lr = c + a * min(ln B, bend)``: its residual
    sum of squares, ``a`` and ``c``. A fitted ``a`` is kept >= 0, as the model is a rise and then
    flat: where the best line falls, the best rise is none (``a = 0``, a flat LR)."""
    z = np.minimum(x[None, :], bends[:, None])
    if slope is not None:
        a = np.full(len(bends), float(slope))
    else:
        dz = z - z.mean(axis=1, keepdims=True)
        szz = np.sum(dz ** 2, axis=1)
        a = np.maximum(np.divide(dz @ (y - y.mean()), szz, out=np.zeros_like(szz), where=szz > 0), 0.0)
    c = np.mean(y[None, :] - a[:, None] * z, axis=1)
    rss = np.sum((y[None, :] - c[:, None] - a[:, None] * z) ** 2, axis=1)
    return rss, a, c


def _f_statistics(rss: np.ndarray, best: int, dof: int, *, total: float) -> np.ndarray:
    """F(1, dof) of each bend against the best: how far its residual sum of squares rises, in units
    of the residual variance. An exact best fit (no noise) makes every other bend infinitely worse."""
    extra = rss - rss[best]
    if rss[best] <= _EXACT * total:
        return np.where(extra <= _EXACT * total, 0.0, math.inf)
    return np.maximum(extra, 0.0) / (rss[best] / dof)


def _f_sf(f: float, d1: int, d2: int) -> float:
    """P(F > f) for F(d1, d2): the regularized incomplete beta I_{d2/(d2 + d1 f)}(d2/2, d1/2)."""
    if f <= 0:
        return 1.0
    if math.isinf(f):
        return 0.0
    return _betainc(d2 / 2, d1 / 2, d2 / (d2 + d1 * f))


def _f_quantile(level: float, d1: int, d2: int) -> float:
    """The F(d1, d2) value exceeded with probability 1 - ``level``, by bisection on ``_f_sf``."""
    low, high = 0.0, 1.0
    while _f_sf(high, d1, d2) > 1 - level:
        high *= 2
    for _ in range(100):  # halves the bracket to float64's resolution from any start under 2**60
        mid = (low + high) / 2
        low, high = (mid, high) if _f_sf(mid, d1, d2) > 1 - level else (low, mid)
    return high


def t_quantile(level: float, dof: int) -> float:
    """The two-sided Student-t quantile: ``|T|`` with ``dof`` degrees of freedom exceeds it with
    probability 1 - ``level`` (T squared is F(1, dof)).

    Example:
        >>> round(t_quantile(0.95, 4), 3), round(t_quantile(0.95, 1), 2)
        (2.776, 12.71)
    """
    return math.sqrt(_f_quantile(level, 1, dof))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b) by its continued fraction (Lentz's method, as
    Numerical Recipes' ``betai``), on the side of ``x`` where it converges fast."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300  # keeps a zero denominator from dividing: Lentz's usual guard
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):  # converges in a few dozen terms for the F tests' a, b (1/2 to a few hundred)
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:  # float64's resolution: the last factor changes nothing
            break
    return front * h / a


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


_MOVED = ("SeriesResult", "SeriesRun", "SweepResult", "SweepRun")
"""Names that lived here until ``distlr.core.series`` took the series over; they go in the next release."""


def __getattr__(name: str):  # noqa: ANN202 - a module's own attribute hook
    if name in _MOVED:
        import warnings

        from distlr.core import series

        warnings.warn(f"distlr.core.scaling.{name} is now distlr.core.series.{name}; the old place goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return getattr(series, name)
    raise AttributeError(f"module 'distlr.core.scaling' has no attribute {name!r}")

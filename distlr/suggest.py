"""Suggestion rules: from a range-test curve to one learning rate, or to a reason there is none.

Pure math: numpy only, no torch, no I/O. Every rule has one signature, ``rule(curve) ->
Suggestion``, where ``curve`` (a ``distlr.curve.Curve``) holds the ladder, the raw losses and the
recorded EMA, already cut where the sweep diverged. Every rule answers with a learning rate the
sweep actually tried (a point of the ladder) or says why it has none.

The constants below were set with the suggestion benchmark (``benchmarks/suggestion/``); the
evidence for each is in ``benchmarks/README.md``, section "Suggestion quality".
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from distlr.curve import Curve, LocalFit

MIN_POINTS = 5
"""Fewest usable points a curve needs before any rule will suggest an LR."""

MIN_RELATIVE_DROP = 0.01
"""The loss must fall by at least this fraction of its starting level."""

MIN_ABSOLUTE_DROP = 1e-12
"""Floor on the required drop, so that a curve starting at a loss of exactly 0 is judged too."""

WIDTH_FRACTION = 0.04
"""``steepest_gradient``'s zero-lag smoother averages over a Gaussian of this fraction of the
points (4 of 100), at least ``MIN_WIDTH``. On the benchmark's tune half (tuning.md) 0.08 lagged
into too-low picks (median regret 0.17 against 0.06); 0.02 scored 0.045, a difference below what
the benchmark resolves (the 3-seed means vary by about 2 %), and answered one curve fewer: the
narrower smoothing is the noisier one, so 0.04 stays."""

MIN_WIDTH = 1.5
"""Narrowest smoothing kernel, in points (short sweeps of 30 points still average ~5 raw losses)."""

SKIP_FRACTION = 0.05
"""``steepest_gradient`` searches for the minimum and the steepest point only after this
fraction of the points (at least one): the smoother is one-sided there."""

NOISE_FACTOR = 4.0
"""A descent counts only if it exceeds this many standard deviations of itself (see
``read_curve``). On pure noise, 400 curves each of 30, 50, 100 and 300 points, the 99th
percentile of that ratio was 3.4-3.8 for normal and 3.9-4.7 for log-normal noise (5.4-6.9 for
Student t with 3 dof); 5 refused a quarter of the noisy benchmark curves whose loss did fall
(batch noise ~30 % of the loss), 4 keeps them. What noise lets through is flagged by
``result.confidence`` (most resampled curves then give no answer). On the tune half (tuning.md)
3 and 4 gave the same regrets and 5 refused 2 more curves."""

SIGNIFICANCE_WIDENING = 3.0
"""The noise test reads the level before the descent on a smoothing this many times wider than
the rule's: a flat start spans many points, and its noise shrinks by about the square root."""

BOTTOM_TOLERANCE = 0.05
"""The descent ends at the first point within this fraction of the drop above the minimum: on
a flat bottom the exact minimum is wherever the noise put it, its start is not. On the tune half
(tuning.md) 0.1-0.3 moved the end earlier and the picks lower (3-5 more too-low, median regret
0.068-0.078 against 0.060), and so did ending the descent where the trend's fall slows to a share
of its fastest (``find_descent``'s ``flat_share``, off: 0.068). Known cost: a long, nearly flat
tail that dips lowest at ``max_lr`` moves the end, and the pick, to that tail."""

DESCENT_BAND = 0.25
"""The steepest point is searched after the last time the loss was within this fraction of
the drop below its top, so a dip in a flat, noisy start that comes back up cannot win
(tests/test_suggest.py's noisy-start curve). 0.1 to 0.5 gave the same picks on the tune half."""

MARGIN = 5.0
"""The seed's "slightly below": the constant LR is the steepest point's LR divided by this ..."""

FLOOR = 10.0
"""... but never less than the LR where the descent ends (``Descent.bottom``) divided by this ...
The suggestion benchmark's tune half chose MARGIN 5 and FLOOR 10 from 4 x 5 x 4 variants: the
only ones with no too-high or diverged pick, and among those the lowest median and worst regret
(``benchmarks/suggestion/tuning.md``). On the tune half the steepest point lay up to 1.5 decades
below the best constant LR (3.5 on one noisy curve) and 0.8 above it, the end of the descent
0.5 below to 1.2 above it with half the spread: the floor carries the weight, and the steepest
point moves the pick only within the factor of 2 above it."""

GUARD = 5.0
"""... and never more than the LR where the descent ends divided by this: past it the run-up to
divergence begins. The steepest point lies before the descent ends, so with GUARD = MARGIN the
margin already keeps the pick below it: tuning.md's variants with guard 1 to 5 (and MARGIN 5,
FLOOR 10) pick the same LRs, and it lists the first as chosen. With FLOOR at the guard (the pick
the descent's end / GUARD alone) a guard of 1-5 picked too high on 3-15 of 44 curves."""

PEAK_FACTOR = 10.0
"""The one-cycle / warmup-cosine peak is at most this many times the constant-LR suggestion ..."""

PEAK_GUARD = 3.0
"""... and at most the LR where the descent ends divided by this. Chosen on the tune half under
the one-cycle protocol, on the chosen constant rule: with FLOOR 10 the guard is what binds, so
the peak is the descent's end / 3, 1.7-3.3 times the constant LR; a guard of 1-2 picked too high
on 1-6 of 44 curves, 5 gave a worst regret of 11.8 against 2.9."""

MINIMUM_DIVISOR = 10.0
"""``minimum`` suggests the LR of the lowest loss divided by this (fastai's rule)."""


@dataclass(frozen=True)
class Suggestion:
    """The outcome of one rule: an LR, or the reason there is no sound one.

    Either ``lr`` and ``index`` are set and ``reason`` is None, or ``lr`` and ``index`` are None
    and ``reason`` says what went wrong and what to change.

    Example:
        >>> Suggestion(lr=1e-3, index=42, reason=None).lr
        0.001
    """

    lr: float | None
    """The suggested learning rate (a point of the ladder), or None."""
    index: int | None
    """Index into the curve of the ladder point ``lr`` is. None when ``lr`` is None."""
    reason: str | None
    """Why there is no suggestion, in words a user can act on. None when ``lr`` is set."""

    def __post_init__(self) -> None:
        has_lr, has_index, has_reason = self.lr is not None, self.index is not None, self.reason is not None
        if has_lr != has_index or has_lr == has_reason:
            raise ValueError(
                "a Suggestion has either lr and index (and no reason) or a reason (and no lr or index); "
                f"got lr={self.lr!r}, index={self.index!r}, reason={self.reason!r}"
            )


SuggestionRule = Callable[[Curve], Suggestion]


@dataclass(frozen=True)
class Reading:
    """A curve read on its zero-lag smoothing: where it is lowest, and how far and how surely it
    fell before that. Shared by ``steepest_gradient`` and the range checks."""

    fit: LocalFit
    """The rule's smoothing (``WIDTH_FRACTION``)."""
    wide: LocalFit
    """A smoothing ``SIGNIFICANCE_WIDENING`` times wider, for the level before the descent."""
    start: int
    """First point read: before it the smoothing is one-sided and noisier."""
    lowest: int
    """Index of the minimum of ``fit``, from ``start`` on."""
    top: float
    """The highest level of ``wide`` between ``start`` and ``lowest``."""
    drop: float
    """``top`` less the minimum."""
    noise: float
    """The standard deviation that noise alone gives ``drop``."""
    significance: float
    """How many of its noise standard deviations the fall is: ``drop / noise``, or, when the
    wide smoothing pins the bottom down more surely (a minimum at the curve's last points, where
    the narrow window is one-sided), the same ratio read on it."""


def read_curve(curve: Curve, *, width_fraction: float = WIDTH_FRACTION,
               skip_fraction: float = SKIP_FRACTION) -> Reading:
    """Smooth a curve (at least ``MIN_POINTS`` long) two ways and measure its fall.

    The bottom is the minimum of the rule's smoothing (a minimum can be sharp); the top, the
    highest level before it of the wider smoothing (a flat start is long, and the wide
    smoothing averages its noise further down, so a noise spike near the start does not set it).
    """
    n = len(curve)
    width = max(MIN_WIDTH, width_fraction * n)
    fit = curve.trend(width)
    wide = curve.trend(SIGNIFICANCE_WIDENING * width, noise=fit.noise)
    start = max(1, int(skip_fraction * n))
    lowest = start + int(np.argmin(fit.level[start:]))
    peak = start + int(np.argmax(wide.level[start: lowest + 1]))
    top = float(wide.level[peak])
    drop = top - float(fit.level[lowest])
    noise = math.hypot(wide.level_sd[peak], fit.level_sd[lowest])
    # On pure noise (the NOISE_FACTOR experiment) taking the better of the two readings let
    # through at most 0.6 % more curves; it answers the curves still falling at max_lr.
    significance = max(_ratio(drop, noise),
                       _ratio(top - float(wide.level[lowest]), math.hypot(wide.level_sd[peak], wide.level_sd[lowest])))
    return Reading(fit=fit, wide=wide, start=start, lowest=lowest, top=top, drop=drop, noise=noise,
                   significance=significance)


def _ratio(value: float, sd: float) -> float:
    return value / sd if sd > 0 else (math.inf if value > 0 else 0.0)


def blow_up(curve: Curve) -> int | None:
    """Where to cut a curve whose loss blew up and then fell again, or None.

    The blow-up is the first point at which the zero-lag trend climbs back above its level at
    the start (``read_curve``'s wide smoothing there) by more than it had fallen and by
    ``NOISE_FACTOR`` noise standard deviations. Past it training at these LRs has failed, and a
    loss that falls again further on (a model collapsing to a degenerate state at a huge LR, a
    spike the sweep's lagging EMA rode out) is not a descent to read, however low it goes. The
    cut is made only when the loss does fall below its earlier minimum after the blow-up.
    """
    if len(curve) < MIN_POINTS:
        return None
    r = read_curve(curve)
    level, start = r.fit.level, r.start
    ref, ref_sd = float(r.wide.level[start]), float(r.wide.level_sd[start])
    lowest = np.minimum.accumulate(level[start:])
    rise = level[start:] - ref - np.maximum(ref - lowest, 0.0)
    past = np.flatnonzero(rise > NOISE_FACTOR * np.hypot(ref_sd, r.fit.level_sd[start:]))
    if past.size == 0:
        return None
    cut = start + int(past[0])
    if cut == start:  # blown up from the first point read: nothing before it to keep
        return None
    # Only a fall below the earlier minimum after the blow-up misleads the rules; otherwise the
    # points past it are kept, so that a minimum just before it is still read two-sided.
    return cut if level[cut:].min() < level[start:cut].min() else None


@dataclass(frozen=True)
class Descent:
    """Where a curve falls, as ``steepest_gradient`` reads it on the zero-lag smoothing."""

    reading: Reading
    begin: int
    """The last point, before the minimum, where the loss was still within ``DESCENT_BAND`` of
    the drop below the top: the descent proper starts after it."""
    steepest: int
    """Index of the most negative slope between ``begin`` and the minimum."""
    bottom: int
    """Where the descent ends: the first point from ``steepest`` on within
    ``BOTTOM_TOLERANCE`` of the drop above the minimum."""

    @property
    def lowest(self) -> int:
        return self.reading.lowest


def find_descent(curve: Curve, *, width_fraction: float = WIDTH_FRACTION, skip_fraction: float = SKIP_FRACTION,
                 noise_factor: float = NOISE_FACTOR, band: float = DESCENT_BAND,
                 bottom_tolerance: float = BOTTOM_TOLERANCE, flat_share: float | None = None) -> Descent | Suggestion:
    """The descent of a curve on its zero-lag smoothing, or a ``Suggestion`` saying why none.

    The keyword arguments default to the module's constants; the suggestion benchmark varies
    them. ``flat_share`` (off by default, and the benchmark keeps it off) also ends the descent at
    the first point whose slope is no steeper than that share of the steepest.
    """
    refusal = _refuse_short(curve)
    if refusal is not None:
        return refusal
    r = read_curve(curve, width_fraction=width_fraction, skip_fraction=skip_fraction)
    level, slope = r.fit.level, r.fit.slope
    bottom_level = float(level[r.lowest])
    if r.drop < max(MIN_RELATIVE_DROP * abs(r.top), MIN_ABSOLUTE_DROP):
        return _no_suggestion(
            f"the loss never fell by {MIN_RELATIVE_DROP:.0%} (from {r.top:.4g} to at best {bottom_level:.4g}) "
            f"between lr={curve.lrs[0]:.3g} and lr={curve.lrs[-1]:.3g}; raise max_lr or num_steps, or check that "
            "the model and data can learn (labels, loss, frozen parameters)"
        )
    if r.significance < noise_factor:
        return _no_suggestion(
            f"the loss fell by {r.drop:.3g}, within the noise of its smoothed curve (about {r.noise:.2g}; batch to "
            f"batch {r.fit.noise:.2g}): the curve holds no clear descent. Raise the batch size or num_steps, or "
            "widen the range (min_lr, max_lr)"
        )
    # A dip in a noisy flat start that comes back up is not the descent: it begins after the
    # last time the loss was near the top.
    near_top = [i for i in range(r.start, r.lowest) if level[i] >= r.top - band * r.drop]
    begin = near_top[-1] if near_top else r.start
    candidates = [i for i in range(begin + 1, r.lowest) if slope[i] < 0]
    if not candidates:
        return _no_suggestion(
            f"the loss reached its minimum at lr={curve.lrs[r.lowest]:.3g} (point {r.lowest + 1} of {len(curve)}) "
            "with no descent before it to measure; lower min_lr so the sweep starts before the loss falls, or "
            "raise num_steps"
        )
    steepest = min(candidates, key=lambda i: (slope[i], i))
    bottom = next(i for i in range(steepest, r.lowest + 1) if level[i] <= bottom_level + bottom_tolerance * r.drop
                  or (flat_share is not None and slope[i] >= flat_share * slope[steepest]))
    return Descent(reading=r, begin=begin, steepest=steepest, bottom=bottom)


def steepest_gradient(curve: Curve) -> Suggestion:
    """Find where the loss falls fastest and suggest a learning rate somewhat below it.

    Read on a zero-lag smoothing of the raw losses (``distlr.curve.local_linear``), not on the
    lagging EMA:

    1. the loss minimum is found after the first ``SKIP_FRACTION`` of the points;
    2. the descent before it must exceed ``NOISE_FACTOR`` times the smoothed curve's own noise
       and 1 % of the loss, or there is no suggestion;
    3. the steepest point (most negative slope against log10 lr) is searched between the last
       time the loss was within ``DESCENT_BAND`` of the drop below its top and the minimum;
    4. the suggestion is that point's LR / ``MARGIN``, but never less than the LR where the
       descent ends (``Descent.bottom``) / ``FLOOR`` and never more than it / ``GUARD``, taken
       as the ladder point at or just below.

    The curve should come from ``distlr.analysis.usable_curve``, which also cuts a loss that
    blew up and fell again (``blow_up``).

    Example:
        >>> import numpy as np
        >>> lrs = np.geomspace(1e-6, 1.0, 100)
        >>> losses = 1 + 1 / (1 + (lrs / 1e-3) ** 2) + 3 * np.clip(np.log10(lrs) + 2, 0, None) ** 2
        >>> round(float(np.log10(steepest_gradient(Curve.of(lrs, losses)).lr)), 1)
        -3.5
    """
    return steepest_with(curve)


def steepest_with(curve: Curve, *, margin: float = MARGIN, guard: float = GUARD, floor: float = FLOOR,
                  **descent_args: float) -> Suggestion:
    """``steepest_gradient`` with its constants as arguments (for the suggestion benchmark)."""
    descent = find_descent(curve, **descent_args)
    if isinstance(descent, Suggestion):
        return descent
    bottom = float(curve.lrs[descent.bottom])
    target = min(max(curve.lrs[descent.steepest] / margin, bottom / floor), bottom / guard)
    return at_or_below(curve, target, what="the suggestion")


def peak_with(curve: Curve, chosen: Suggestion, *, factor: float = PEAK_FACTOR,
              guard: float = PEAK_GUARD) -> Suggestion:
    """The one-cycle / warmup-cosine peak built on the constant LR ``chosen``.

    ``factor`` x the constant LR, capped by the LR where the descent ends / ``guard`` (the
    smoothed minimum's when the curve holds no descent), and never below the constant LR itself;
    a point of the ladder like every suggestion.
    """
    if chosen.lr is None:
        return chosen
    descent = find_descent(curve)
    bottom = descent.bottom if isinstance(descent, Descent) else int(np.argmin(curve.smoothed))
    target = max(chosen.lr, min(chosen.lr * factor, float(curve.lrs[bottom]) / guard))
    return at_or_below(curve, target, what="the peak")


def valley(curve: Curve) -> Suggestion:
    """Suggest the LR in the middle of the longest stretch over which the smoothed loss keeps falling.

    fastai's ``valley``, on the recorded EMA: for every point, the length of the longest strictly
    decreasing subsequence ending there (patience sorting, O(n log n)). The point with the
    greatest length (the first on ties) is the valley's end, ``end - length + 1`` its start; the
    suggestion is the ladder point nearest, in log10 space, to their midpoint (the lower on a
    tie).

    Example:
        >>> lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
        >>> losses = [2.0, 2.1, 1.2, 0.9, 0.8, 0.7, 3.0]
        >>> valley(Curve.of(lrs, losses, losses)).lr
        0.01
    """
    refusal = _refuse_short(curve) or _refuse_no_drop(curve.lrs, curve.smoothed)
    if refusal is not None:
        return refusal
    lengths = _descent_lengths(curve.smoothed)
    end = int(np.argmax(lengths))
    start = end - int(lengths[end]) + 1
    log_lrs = np.log10(curve.lrs)
    index = int(np.argmin(np.abs(log_lrs - (log_lrs[start] + log_lrs[end]) / 2.0)))
    return Suggestion(lr=float(curve.lrs[index]), index=index, reason=None)


def minimum(curve: Curve) -> Suggestion:
    """Suggest the LR of the lowest smoothed loss divided by ``MINIMUM_DIVISOR`` (10).

    fastai's ``minimum`` on the recorded EMA, taken as the ladder point at or just below the
    tenth, so that the answer is an LR the sweep tried. When the tenth lies below ``min_lr``
    there is no such point, and the rule says to lower ``min_lr``.

    Example:
        >>> lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
        >>> losses = [2.0, 2.1, 1.2, 0.9, 0.8, 0.7, 3.0]
        >>> minimum(Curve.of(lrs, losses, losses))
        Suggestion(lr=0.1, index=4, reason=None)
    """
    refusal = _refuse_short(curve) or _refuse_no_drop(curve.lrs, curve.smoothed)
    if refusal is not None:
        return refusal
    target = float(curve.lrs[int(np.argmin(curve.smoothed))]) / MINIMUM_DIVISOR
    return at_or_below(curve, target, what=f"the loss minimum's lr / {MINIMUM_DIVISOR:g}")


SUGGESTION_RULES: dict[str, SuggestionRule] = {
    "steepest_gradient": steepest_gradient,
    "valley": valley,
    "minimum": minimum,
}
"""Every rule by its ``suggestion_method`` name; the first is the default."""


def suggest_all(curve: Curve) -> dict[str, Suggestion]:
    """Apply every rule to a curve, in ``SUGGESTION_RULES`` order: ``{rule name: Suggestion}``."""
    return {name: rule(curve) for name, rule in SUGGESTION_RULES.items()}


def at_or_below(curve: Curve, target: float, *, what: str) -> Suggestion:
    """The ladder point at ``target``, or the highest one below it (a tried LR, never above).

    A tiny relative tolerance keeps a target that *is* a ladder LR, up to rounding, on it.
    """
    index = bisect.bisect_right(curve.lrs.tolist(), target * (1.0 + 1e-9)) - 1
    if index < 0:
        return _no_suggestion(
            f"{what} is lr={target:.3g}, below the lowest lr the sweep tried ({curve.lrs[0]:.3g}); "
            "lower min_lr so the sweep starts before the loss falls"
        )
    return Suggestion(lr=float(curve.lrs[index]), index=index, reason=None)


def _refuse_short(curve: Curve) -> Suggestion | None:
    n = len(curve)
    if n < MIN_POINTS:
        return _no_suggestion(
            f"only {n} usable points (need at least {MIN_POINTS}): the loss probably diverged almost "
            "at once; lower min_lr or raise num_steps"
        )
    return None


def _refuse_no_drop(lrs: np.ndarray, losses: np.ndarray) -> Suggestion | None:
    first, lowest = float(losses[0]), float(losses.min())
    if first - lowest < max(MIN_RELATIVE_DROP * abs(first), MIN_ABSOLUTE_DROP):
        return _no_suggestion(
            f"the loss never fell by {MIN_RELATIVE_DROP:.0%} (from {first:.4g} to at best {lowest:.4g}) between "
            f"lr={lrs[0]:.3g} and lr={lrs[-1]:.3g}; raise max_lr or num_steps, or check that the model and data "
            "can learn (labels, loss, frozen parameters)"
        )
    return None


def _no_suggestion(reason: str) -> Suggestion:
    return Suggestion(lr=None, index=None, reason=reason)


def _descent_lengths(losses: np.ndarray) -> np.ndarray:
    # A strictly decreasing run of losses is a strictly increasing run of their negatives, and
    # tails[k] is the smallest last value of any increasing subsequence of length k + 1 seen so far
    # (kept sorted), so bisect_left gives the longest one that a new value can extend.
    tails: list[float] = []
    lengths = np.empty(len(losses), dtype=np.int64)
    for i, value in enumerate(-losses):
        k = bisect.bisect_left(tails, value)
        if k == len(tails):
            tails.append(value)
        else:
            tails[k] = value
        lengths[i] = k + 1
    return lengths


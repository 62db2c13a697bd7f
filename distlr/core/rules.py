"""Suggestion rules: from a range-test curve to one learning rate, or to a reason there is none.

Pure math: numpy only, no torch, no I/O. Every rule has one signature, ``rule(curve) ->
Suggestion``, where ``curve`` (a ``distlr.curve.Curve``) holds the ladder, the raw losses and the
recorded EMA, already cut where the range test diverged. Every rule answers with a learning rate the
range test actually tried (a point of the ladder) or says why it has none.

The default reads one thing: where the loss turns up (``rise_onset``). The constants below were
set by leave-one-family-out cross-validation on the suggestion benchmark
(``benchmarks/suggestion/``, ``tuning.md``); the held-out evidence is in ``results.md``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from distlr.core.curve import Curve, LocalFit

MIN_POINTS = 5
"""Fewest usable points a curve needs before any rule will suggest an LR."""

MIN_RELATIVE_DROP = 0.01
"""The loss responds to the LR when it moves by at least this fraction of its level (and by
more than ``NOISE_FACTOR`` noise standard deviations): a fall that small is no descent, a rise
that small no turn-up. On the benchmark's noisy curves the noise test decides (0, 1 and 3 % gave
held-out scores within 0.01 of each other, tuning.md); this one decides for curves without
noise (synthetic or quantised losses), where a noise of 0 would make any wiggle a turn-up."""

MIN_ABSOLUTE_DROP = 1e-12
"""Floor on the required move, so that a curve at a loss of exactly 0 is judged too."""

WIDTH_FRACTION = 0.02
"""The zero-lag smoother averages over a Gaussian of this fraction of the points (2 of 100), at
least ``MIN_WIDTH``. Held out on the benchmark (tuning.md), 0.02 read the turn-up better than
0.01 (noisier), 0.04 and 0.08 (a wide kernel climbs before the loss does): summed over the three
protocols 0.96 against 0.98, 1.17 and 1.31."""

MIN_WIDTH = 1.5
"""Narrowest smoothing kernel, in points (short range tests of 30 points still average ~5 raw losses)."""

SIGNIFICANCE_WIDENING = 3.0
"""Whether the loss fell is also read on a smoothing this many times wider: at a minimum in the
curve's last points (a range that ended while the loss still fell) the narrow kernel is
one-sided and its noise large, the wide one pins the fall down (a noisy regression on 1e-8..1e-1
fell from 9 to 1.3 and was called flat on the narrow reading alone, tests/test_extension.py)."""

SKIP_FRACTION = 0.05
"""The minimum is searched only after this fraction of the points (at least one): the smoother
is one-sided there."""

NOISE_FACTOR = 4.0
"""A move of the loss counts only beyond this many standard deviations of the smoothed level.
On pure noise (400 curves each of 30, 50, 100 and 300 points) the 99th percentile of a fall read
this way was 3.4-3.8 standard deviations for normal and 3.9-4.7 for log-normal noise. Held out on
the benchmark (tuning.md) 2 scored within the seed noise of 4 (0.95 against 0.96) and 8 worse (1.77)."""

CONSTANT_DIVISOR = 10 ** 1.1
"""``steepest_gradient``: a constant LR this many times (12.6) below where the loss turns up.
Chosen on all families under the constant-LR protocol (tuning.md); held out, the 8 folds chose
7.9 to 17.8: the best constant LR sits that much nearer to or further from the turn-up from
one kind of task to another."""

PEAK_DIVISOR = 10 ** 0.65
"""The one-cycle / warmup-cosine peak: this many times (4.5) below where the loss turns up, the
one-cycle protocol's choice (folds: 4.0 to 4.5)."""

WSD_DIVISOR = 10 ** 0.9
"""The plateau of a warmup-stable-decay schedule: this many times (7.9) below where the loss
turns up, the WSD protocol's choice (folds: 7.9 to 12.6)."""

VAL_CONSTANT_DIVISOR, VAL_PEAK_DIVISOR, VAL_WSD_DIVISOR = 10 ** 0.6, 10 ** 0.35, 10 ** 0.6
"""The same three numbers (4.0, 2.2 and 4.0 times below) read from the validation loss's turn-up
(val_every=2, tuning.md); with a validation loss each number is the lower of its two readings."""

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
    """A curve read on its zero-lag smoothing: where it is lowest, whether it fell before
    that, and where it turned up after it. Shared by the rules and the range checks."""

    fit: LocalFit
    """The smoothing (``WIDTH_FRACTION``)."""
    start: int
    """First point read: before it the smoothing is one-sided and noisier."""
    lowest: int
    """Index of the minimum of ``fit``, from ``start`` on."""
    top: float
    """The highest level of ``fit`` between ``start`` and ``lowest``."""
    fell: bool
    """The loss fell to its minimum by more than the noise and ``MIN_RELATIVE_DROP``, on this
    smoothing or on one ``SIGNIFICANCE_WIDENING`` times wider."""
    onset: int | None
    """The first point after the minimum from which the loss stays above it by more than the
    noise and ``MIN_RELATIVE_DROP``: where the loss turns up. None when it never does."""

    @property
    def drop(self) -> float:
        return self.top - float(self.fit.level[self.lowest])


def read_curve(curve: Curve, *, width_fraction: float = WIDTH_FRACTION, noise_factor: float = NOISE_FACTOR,
               relative: float = MIN_RELATIVE_DROP) -> Reading:
    """Smooth a curve (at least ``MIN_POINTS`` long) and find its minimum, its fall and its turn-up.

    The keyword arguments default to the module's constants; the suggestion benchmark varies them.
    """
    n = len(curve)
    fit = curve.trend(max(MIN_WIDTH, width_fraction * n))
    level, sd = fit.level, fit.level_sd
    start = max(1, int(SKIP_FRACTION * n))
    lowest = start + int(np.argmin(level[start:]))
    low = float(level[lowest])
    peak = start + int(np.argmax(level[start: lowest + 1]))
    top = float(level[peak])
    floor = max(relative * abs(low), MIN_ABSOLUTE_DROP)
    wide = curve.trend(SIGNIFICANCE_WIDENING * max(MIN_WIDTH, width_fraction * n), noise=fit.noise)
    wide_top = start + int(np.argmax(wide.level[start: lowest + 1]))
    fell = any(drop > max(floor, noise_factor * spread) for drop, spread in (
        (top - low, math.hypot(sd[peak], sd[lowest])),
        (wide.level[wide_top] - wide.level[lowest], math.hypot(wide.level_sd[wide_top], wide.level_sd[lowest]))))
    after = np.arange(lowest + 1, n)
    margin = np.maximum(noise_factor * np.hypot(sd[lowest], sd[after]), floor)
    # The turn-up is where the loss leaves its minimum for good: a noise bump in a long flat
    # stretch that comes back down is no turn-up.
    within = np.flatnonzero(level[after] - low <= margin)
    first = 0 if within.size == 0 else int(within[-1]) + 1
    onset = int(after[first]) if first < len(after) else None
    return Reading(fit=fit, start=start, lowest=lowest, top=top, fell=fell, onset=onset)


def rise_onset(curve: Curve) -> int | None:
    """Where the loss turns up (``Reading.onset``); None for a curve too short to read or one
    that has not turned up (still falling, or flat, at its last point)."""
    if len(curve) < MIN_POINTS:
        return None
    return read_curve(curve).onset


def still_open(lrs: Sequence[float], losses: Sequence[float]) -> bool:
    """Whether a range test past ``max_lr`` should go on: its loss, finite so far, has not
    turned up (``rise_onset``). Pure and deterministic: every rank asks it the same numbers."""
    if len(losses) < MIN_POINTS:
        return True
    return rise_onset(Curve.of(lrs, losses, losses)) is None


def blow_up(curve: Curve) -> int | None:
    """Where to cut a curve whose loss blew up and then fell again, or None.

    The blow-up is the first point at which the zero-lag trend climbs back above its level at
    the start by more than it had fallen and by ``NOISE_FACTOR`` noise standard deviations.
    Past it training at these LRs has failed, and a loss that falls again further on (a model
    collapsing to a degenerate state at a huge LR, a spike the range test's lagging EMA rode out) is
    not a descent to read, however low it goes. The cut is made only when the loss does fall
    below its earlier minimum after the blow-up.
    """
    if len(curve) < MIN_POINTS:
        return None
    n = len(curve)
    # Read on the wider smoothing: on the narrow one, a noise bump in a flat, noisy start (a
    # pretrained model's curve) passed for a blow-up and cut the curve to its first points.
    fit = curve.trend(SIGNIFICANCE_WIDENING * max(MIN_WIDTH, WIDTH_FRACTION * n))
    level, sd, start = fit.level, fit.level_sd, max(1, int(SKIP_FRACTION * n))
    ref = float(level[start])
    lowest = np.minimum.accumulate(level[start:])
    rise = level[start:] - ref - np.maximum(ref - lowest, 0.0)
    past = np.flatnonzero(rise > NOISE_FACTOR * np.hypot(sd[start], sd[start:]))
    if past.size == 0:
        return None
    cut = start + int(past[0])
    if cut == start:  # blown up from the first point read: nothing before it to keep
        return None
    # Only a fall below the earlier minimum after the blow-up misleads the rules; otherwise the
    # points past it are kept, so that a minimum just before it is still read two-sided.
    return cut if level[cut:].min() < level[start:cut].min() else None


def steepest_gradient(curve: Curve) -> Suggestion:
    """Read where the loss stops falling and turns up, and suggest a constant LR below it.

    The seed's rule looked for the steepest fall. The benchmark found that where the descent ends,
    at the turn-up of the loss (``rise_onset``), predicts the best LR at least as well held out,
    with one reading instead of four, and that it also answers the fine-tuning curve that is
    flat and then rises (there is no fall to read). So the name is the seed's and the reading is
    the turn-up: the suggestion is the turn-up's LR / ``CONSTANT_DIVISOR``, as the ladder point at
    or just below. A curve that never turned up (the range ended while the loss still fell) is
    read at its last point, and ``range_notes`` say so.

    The curve should come from ``distlr.analysis.usable_curve``, which also cuts a loss that
    blew up and fell again (``blow_up``).

    Example:
        >>> lrs = np.geomspace(1e-6, 1.0, 100)
        >>> losses = 1 + 1 / (1 + (lrs / 1e-3) ** 2) + 3 * np.clip(np.log10(lrs) + 2, 0, None) ** 2
        >>> round(float(np.log10(steepest_gradient(Curve.of(lrs, losses)).lr)), 1)   # climbs past 1e-2
        -3.2
    """
    return below_turn_up(curve, CONSTANT_DIVISOR, what="the suggestion")


def below_turn_up(curve: Curve, divisor: float, *, what: str, **reading: float) -> Suggestion:
    """The ladder point at or below the turn-up's LR / ``divisor``, or why there is none.

    Refused only when the curve is too short to read, or its loss neither fell nor turned up
    over the whole range (it does not respond to the LR). ``reading`` goes to ``read_curve``.
    """
    refusal = _refuse_short(curve)
    if refusal is not None:
        return refusal
    r = read_curve(curve, **reading)
    if r.onset is None and not r.fell:
        level = r.fit.level
        return _no_suggestion(
            f"the loss does not respond to the LR between lr={curve.lrs[0]:.3g} and lr={curve.lrs[-1]:.3g}: it "
            f"neither fell nor rose by {MIN_RELATIVE_DROP:.0%} or beyond its noise (from {level[r.start]:.4g}, "
            f"lowest {level[r.lowest]:.4g}); raise max_lr, or check that the model and data can learn (labels, "
            "loss, frozen parameters)"
        )
    edge = r.onset if r.onset is not None else len(curve) - 1
    return at_or_below(curve, float(curve.lrs[edge]) / divisor, what=what)


def peak(curve: Curve) -> Suggestion:
    """The one-cycle / warmup-cosine peak: the turn-up's LR / ``PEAK_DIVISOR``."""
    return below_turn_up(curve, PEAK_DIVISOR, what="the peak")


def wsd_plateau(curve: Curve) -> Suggestion:
    """The warmup-stable-decay plateau: the turn-up's LR / ``WSD_DIVISOR``."""
    return below_turn_up(curve, WSD_DIVISOR, what="the plateau")


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
    tenth, so that the answer is an LR the range test tried. When the tenth lies below ``min_lr``
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
            f"{what} is lr={target:.3g}, below the lowest lr the range test tried ({curve.lrs[0]:.3g}); "
            "lower min_lr so the range test starts before the loss falls"
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

"""Suggestion rules: from a range-test curve to one learning rate, or to a reason there is none.

Pure math: numpy only, no torch, no I/O. Every rule has one signature (``SuggestionRule``)::

    rule(curve, losses=None, *, smoothed=None, diverged=False) -> Suggestion

Pass either a ``distlr.curve.Curve`` (the ladder, the raw losses and the recorded EMA, already cut
where the range test diverged: ``distlr.core.analysis.usable_curve``), or the record itself the way
the other finders take it, ``rule(lrs, losses)``: lists or arrays of the LRs themselves (not their
log10: the rules put them on a log10 axis where they need one) and of the raw losses, NaN and inf
allowed (those points are dropped, as Lightning drops them; see ``usable_points``). ``diverged``
says that the range test diverged right after the last point. Every rule answers with a learning
rate the range test actually tried (a point of the ladder) or says why it has none; ``index`` is
the position of that LR in what was passed. Any ladder works: exponential, linear, or uneven.

The default reads one thing: where the loss turns up (``rise_onset``). The constants below were
set by leave-one-family-out cross-validation on the suggestion benchmark
(``benchmarks/suggestion/``, ``tuning.md``); the held-out evidence is in ``results.md``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from distlr.core.curve import Curve, LocalFit

MIN_POINTS = 5
"""Fewest usable points (each with a finite loss) a curve needs before any rule will suggest an LR."""

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

MAX_SHORTFALL = 2.0
"""``at_or_below`` answers only with a ladder point less than this many of the ladder's usual
steps (the median ratio of neighbouring LRs) below the LR it was asked for; further below, the
ladder tried nothing near that LR. On a log ladder every step is alike, so the point below is
always within one step and this never refuses; a linear ladder's first step is a jump (1e-8, then
0.0101 on 1e-8..1, 100 steps), and a target inside it would otherwise be answered with min_lr,
decades below what the rule read."""

NEAR_ABOVE = 10 ** 0.1
"""Where the point below is too far (``MAX_SHORTFALL``), the next ladder point is taken instead
when it is at most this factor (1.26, the suggestion benchmark's resolution of 10 LRs a decade)
above the target; otherwise there is no answer."""


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
    """Position of ``lr`` in what the rule was given: the curve, or the ``lrs`` list. None when
    ``lr`` is None."""
    reason: str | None
    """Why there is no suggestion, in words a user can act on. None when ``lr`` is set."""

    def __post_init__(self) -> None:
        has_lr, has_index, has_reason = self.lr is not None, self.index is not None, self.reason is not None
        if has_lr != has_index or has_lr == has_reason:
            raise ValueError(
                "a Suggestion has either lr and index (and no reason) or a reason (and no lr or index); "
                f"got lr={self.lr!r}, index={self.index!r}, reason={self.reason!r}"
            )


class SuggestionRule(Protocol):
    """The one signature of every rule in ``SUGGESTION_RULES`` (and of ``peak``, ``wsd_plateau``)."""

    def __call__(self, curve: Curve | Sequence[float], losses: Sequence[float] | None = None, *,
                 smoothed: Sequence[float] | None = None, diverged: bool = False) -> Suggestion: ...


@dataclass(frozen=True)
class Points:
    """The points of a record that a rule reads, and where they sit in the record."""

    curve: Curve
    """The usable points (``usable_points``)."""
    positions: Sequence[int]
    """Position in the record of each point of ``curve``."""
    given: int
    """Points in the record that were read (those before ``end``)."""
    finite: int
    """Of those, how many have a finite loss (and EMA)."""
    blew_up: bool = False
    """Whether the curve was cut where the loss blew up (``blow_up``): it rose right after its last point."""

    def place(self, found: Suggestion) -> Suggestion:
        """A rule's answer on ``curve``, its index moved to the record's."""
        if found.index is None:
            return found
        return Suggestion(lr=found.lr, index=int(self.positions[found.index]), reason=None)


def usable_points(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float] | None = None, *,
                  end: int | None = None) -> Points:
    """The points of a recorded range test that the rules may read: those before ``end`` (the
    diverging step: the explosion, not the curve), of those only the ones whose loss (and EMA)
    is finite, and of those only the ones before the loss blew up (``blow_up``: a spike the EMA's
    stop decision rode out). ``smoothed=None`` computes the EMA (weight 0.98) over the kept points.

    Example:
        >>> nan = float("nan")
        >>> points = usable_points([1e-4, 1e-3, 1e-2, 1e-1], [2.0, nan, 1.0, 0.5])
        >>> points.positions, points.given, points.finite
        ([0, 2, 3], 4, 3)
    """
    end = len(losses) if end is None else end
    keep = [i for i in range(end) if math.isfinite(losses[i]) and (smoothed is None or math.isfinite(smoothed[i]))]
    curve = Curve.of([lrs[i] for i in keep], [losses[i] for i in keep],
                     None if smoothed is None else [smoothed[i] for i in keep])
    cut = blow_up(curve)
    if cut is None:
        return Points(curve, keep, given=end, finite=len(keep))
    return Points(curve.head(cut), keep[:cut], given=end, finite=len(keep), blew_up=True)


def as_points(curve: Curve | Sequence[float], losses: Sequence[float] | None = None,
              smoothed: Sequence[float] | None = None) -> Points:
    """What a rule was given, as ``Points``: a ``Curve`` as it is, or a record ``(lrs, losses)``
    through ``usable_points``.

    Raises:
        TypeError: a Curve with losses too, or lrs without losses.
        ValueError: lrs, losses (and smoothed) of different lengths or not 1-D, or an LR that is
            not finite and > 0 (log10(lr) passed for the LRs, say).
    """
    if isinstance(curve, Curve):
        if losses is not None or smoothed is not None:
            raise TypeError("a rule takes a Curve alone, or lrs and losses (lists or arrays); got a Curve and losses")
        return Points(curve, range(len(curve)), given=len(curve), finite=len(curve))
    if losses is None:
        raise TypeError(f"a rule takes a Curve, or lrs and losses: rule(lrs, losses); got {type(curve).__name__} "
                        "and no losses")
    arrays = {"lrs": np.asarray(curve, dtype=np.float64), "losses": np.asarray(losses, dtype=np.float64)}
    if smoothed is not None:
        arrays["smoothed"] = np.asarray(smoothed, dtype=np.float64)
    for name, arr in arrays.items():
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if len({len(arr) for arr in arrays.values()}) > 1:
        raise ValueError(f"{', '.join(arrays)} must have the same length; got "
                         f"{', '.join(str(len(arr)) for arr in arrays.values())}")
    lr_arr = arrays["lrs"]
    bad = np.flatnonzero(~(np.isfinite(lr_arr) & (lr_arr > 0)))
    if bad.size:
        hint = ("; these look like log10(lr): pass 10 ** lrs" if np.isfinite(lr_arr).all() and lr_arr.min() < 0
                else "")
        raise ValueError(f"lrs must be the learning rates themselves, finite and > 0 (the rules take their log10 "
                         f"where they need it); lrs[{bad[0]}]={float(lr_arr[bad[0]])!r}{hint}")
    return usable_points(lr_arr, arrays["losses"], arrays.get("smoothed"))


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


def steepest_gradient(curve: Curve | Sequence[float], losses: Sequence[float] | None = None, *,
                      smoothed: Sequence[float] | None = None, diverged: bool = False) -> Suggestion:
    """Read where the loss stops falling and turns up, and suggest a constant LR below it.

    The seed's rule looked for the steepest fall. The benchmark found that where the descent ends,
    at the turn-up of the loss (``rise_onset``), predicts the best LR at least as well held out,
    with one reading instead of four, and that it also answers the fine-tuning curve that is
    flat and then rises (there is no fall to read). So the name is the seed's and the reading is
    the turn-up: the suggestion is the turn-up's LR / ``CONSTANT_DIVISOR``, as the ladder point at
    or just below. A curve that never turned up is read at its last point: the range ended while
    the loss still fell (``range_notes`` say so), or, with ``diverged``, the loss turned up past it.

    The axis: the raw losses are smoothed by a local linear fit against log10(lr), with a kernel
    over point indices (``Curve.trend``), on any ladder; nothing is differentiated per index or
    per raw LR (torch-lr-finder and Lightning < 2.5.3 differentiate per index, Lightning >= 2.5.3
    per raw LR, fastai's ``steep`` per ln(lr)).

    Args:
        curve: a ``Curve`` from ``distlr.core.analysis.usable_curve``, or the LRs of a record
            (lists or arrays, the LRs themselves) with ``losses``.
        losses: the raw loss of each LR, when ``curve`` is the LRs; NaN and inf are dropped.
        smoothed: the EMA the range test recorded, with ``losses``; None computes it (0.98).
        diverged: the range test diverged (or the loss blew up) right after the last point: the
            loss did respond to the LR, so a curve without a fall or turn-up of its own is read
            at its last point instead of refused.

    Returns:
        A ``Suggestion``: the LR and its position in what was passed, or why there is none.

    Example:
        >>> lrs = np.geomspace(1e-6, 1.0, 100)
        >>> losses = 1 + 1 / (1 + (lrs / 1e-3) ** 2) + 3 * np.clip(np.log10(lrs) + 2, 0, None) ** 2
        >>> round(float(np.log10(steepest_gradient(lrs, losses).lr)), 1)   # climbs past 1e-2
        -3.2
        >>> steepest_gradient(Curve.of(lrs, losses)) == steepest_gradient(lrs.tolist(), losses.tolist())
        True
    """
    return _below_turn_up_of(curve, losses, smoothed, diverged, CONSTANT_DIVISOR, "the suggestion")


def below_turn_up(curve: Curve, divisor: float, *, what: str, diverged: bool = False, **reading: float) -> Suggestion:
    """The ladder point at or below the turn-up's LR / ``divisor``, or why there is none.

    Refused only when the curve is too short to read, or its loss neither fell nor turned up
    over the whole range (it does not respond to the LR) and the range test did not diverge
    right after it (``diverged``). ``reading`` goes to ``read_curve``.
    """
    refusal = _refuse_short(as_points(curve), diverged=diverged)
    if refusal is not None:
        return refusal
    r = read_curve(curve, **reading)
    if r.onset is None and not r.fell and not diverged:
        level = r.fit.level
        return _no_suggestion(
            f"the loss does not respond to the LR between lr={curve.lrs[0]:.3g} and lr={curve.lrs[-1]:.3g}: it "
            f"neither fell nor rose by {MIN_RELATIVE_DROP:.0%} or beyond its noise (from {level[r.start]:.4g}, "
            f"lowest {level[r.lowest]:.4g}); raise max_lr, or check that the model and data can learn (labels, "
            "loss, frozen parameters)"
        )
    # No turn-up among the points: the range ended while the loss still fell, or it turned up
    # past the last point, where the range test diverged (a noisy curve on a linear ladder
    # reaches the LR that diverges in a few dozen points, too few to show the rise beyond noise).
    edge = r.onset if r.onset is not None else len(curve) - 1
    return at_or_below(curve, float(curve.lrs[edge]) / divisor, what=what)


def _below_turn_up_of(curve: Curve | Sequence[float], losses: Sequence[float] | None,
                      smoothed: Sequence[float] | None, diverged: bool, divisor: float, what: str) -> Suggestion:
    points = as_points(curve, losses, smoothed)
    rose = diverged or points.blew_up
    return _refuse_short(points, diverged=rose) or points.place(
        below_turn_up(points.curve, divisor, what=what, diverged=rose))


def peak(curve: Curve | Sequence[float], losses: Sequence[float] | None = None, *,
         smoothed: Sequence[float] | None = None, diverged: bool = False) -> Suggestion:
    """The one-cycle / warmup-cosine peak: the turn-up's LR / ``PEAK_DIVISOR`` (as ``steepest_gradient``)."""
    return _below_turn_up_of(curve, losses, smoothed, diverged, PEAK_DIVISOR, "the peak")


def wsd_plateau(curve: Curve | Sequence[float], losses: Sequence[float] | None = None, *,
                smoothed: Sequence[float] | None = None, diverged: bool = False) -> Suggestion:
    """The warmup-stable-decay plateau: the turn-up's LR / ``WSD_DIVISOR`` (as ``steepest_gradient``)."""
    return _below_turn_up_of(curve, losses, smoothed, diverged, WSD_DIVISOR, "the plateau")


def valley(curve: Curve | Sequence[float], losses: Sequence[float] | None = None, *,
           smoothed: Sequence[float] | None = None, diverged: bool = False) -> Suggestion:
    """Suggest the LR in the middle of the longest stretch over which the smoothed loss keeps falling.

    fastai's ``valley``, on the recorded EMA: for every point, the length of the longest strictly
    decreasing subsequence ending there (patience sorting, O(n log n)). The point with the
    greatest length (the first on ties) is the valley's end, ``end - length + 1`` its start; the
    suggestion is the ladder point nearest, in log10 space, to their midpoint (the lower on a
    tie). On a log ladder that is fastai's pick by index; on a linear ladder it is the middle in
    log10(lr), not the middle point. The arguments are ``steepest_gradient``'s; ``diverged`` only
    changes the advice when the loss never fell.

    Example:
        >>> lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
        >>> losses = [2.0, 2.1, 1.2, 0.9, 0.8, 0.7, 3.0]
        >>> valley(lrs, losses, smoothed=losses).lr
        0.01
    """
    points = as_points(curve, losses, smoothed)
    c = points.curve
    rose = diverged or points.blew_up
    refusal = _refuse_short(points, diverged=rose) or _refuse_no_drop(c, diverged=rose)
    if refusal is not None:
        return refusal
    lengths = _descent_lengths(c.smoothed)
    end = int(np.argmax(lengths))
    start = end - int(lengths[end]) + 1
    log_lrs = np.log10(c.lrs)
    index = int(np.argmin(np.abs(log_lrs - (log_lrs[start] + log_lrs[end]) / 2.0)))
    return points.place(Suggestion(lr=float(c.lrs[index]), index=index, reason=None))


def minimum(curve: Curve | Sequence[float], losses: Sequence[float] | None = None, *,
            smoothed: Sequence[float] | None = None, diverged: bool = False) -> Suggestion:
    """Suggest the LR of the lowest smoothed loss divided by ``MINIMUM_DIVISOR`` (10).

    fastai's ``minimum`` on the recorded EMA, taken as the ladder point at or just below the
    tenth, so that the answer is an LR the range test tried. When the tenth lies below ``min_lr``
    there is no such point, and the rule says to lower ``min_lr``. The arguments are
    ``steepest_gradient``'s; ``diverged`` only changes the advice when the loss never fell.

    Example:
        >>> lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
        >>> losses = [2.0, 2.1, 1.2, 0.9, 0.8, 0.7, 3.0]
        >>> minimum(Curve.of(lrs, losses, losses))
        Suggestion(lr=0.1, index=4, reason=None)
    """
    points = as_points(curve, losses, smoothed)
    c = points.curve
    rose = diverged or points.blew_up
    refusal = _refuse_short(points, diverged=rose) or _refuse_no_drop(c, diverged=rose)
    if refusal is not None:
        return refusal
    target = float(c.lrs[int(np.argmin(c.smoothed))]) / MINIMUM_DIVISOR
    return points.place(at_or_below(c, target, what=f"the loss minimum's lr / {MINIMUM_DIVISOR:g}"))


SUGGESTION_RULES: dict[str, SuggestionRule] = {
    "steepest_gradient": steepest_gradient,
    "valley": valley,
    "minimum": minimum,
}
"""Every rule by its ``suggestion_method`` name; the first is the default."""


def suggest_all(curve: Curve | Sequence[float], losses: Sequence[float] | None = None, *,
                smoothed: Sequence[float] | None = None, diverged: bool = False) -> dict[str, Suggestion]:
    """Apply every rule, with the rules' arguments, in ``SUGGESTION_RULES`` order: ``{rule name: Suggestion}``."""
    return {name: rule(curve, losses, smoothed=smoothed, diverged=diverged) for name, rule in SUGGESTION_RULES.items()}


def at_or_below(curve: Curve, target: float, *, what: str) -> Suggestion:
    """The ladder point at ``target``, or the highest one below it (a tried LR, never above).

    A tiny relative tolerance keeps a target that *is* a ladder LR, up to rounding, on it. When
    the point below lies more than ``MAX_SHORTFALL`` usual steps below the target (inside the
    first jump of a linear ladder), the next point is taken if it is within ``NEAR_ABOVE`` above
    the target; otherwise there is no answer, and the reason says how to make the ladder finer.
    """
    lrs = curve.lrs
    index = bisect.bisect_right(lrs.tolist(), target * (1.0 + 1e-9)) - 1
    if index < 0:
        return _no_suggestion(
            f"{what} is lr={target:.3g}, below the lowest lr the range test tried ({lrs[0]:.3g}); "
            "lower min_lr so the range test starts before the loss falls"
        )
    shortfall = target / lrs[index]
    if (index + 1 < len(lrs) and shortfall > MAX_SHORTFALL
            and shortfall > MAX_SHORTFALL * float(np.median(lrs[1:] / lrs[:-1]))):
        if lrs[index + 1] <= target * NEAR_ABOVE:
            return Suggestion(lr=float(lrs[index + 1]), index=index + 1, reason=None)
        return _no_suggestion(
            f"{what} is lr={target:.3g}, but the range test tried no lr near it: its ladder steps from "
            f"lr={lrs[index]:.3g} to lr={lrs[index + 1]:.3g} there (a linear ladder's first step is such a jump); "
            f"use step_mode='exp', or lower max_lr so that the linear steps are finer than {target:.2g}"
        )
    return Suggestion(lr=float(lrs[index]), index=index, reason=None)


def _refuse_short(points: Points, *, diverged: bool = False) -> Suggestion | None:
    n = len(points.curve)
    if n >= MIN_POINTS:
        return None
    counted = f"only {n} usable points (a suggestion needs at least {MIN_POINTS} with a finite loss)"
    if points.finite < points.given:
        counted += f": {points.finite} of the {points.given} losses given are finite"
    if points.blew_up:
        counted += f"{',' if points.finite < points.given else ':'} and the loss blew up after the first {n}"
    if diverged and n == 0 and points.given <= 1:
        advice = ("the loss was not finite at step 1, before any optimizer step, so the model, the data or the loss "
                  "is the cause, not the LR (see the range notes)")
    elif diverged:
        advice = "the range test diverged almost at once; lower min_lr"
    elif points.finite < points.given:
        advice = "the others are NaN or inf; check the model and the data (inputs, labels, loss), or lower min_lr"
    else:
        advice = "raise num_steps"
    return _no_suggestion(f"{counted}; {advice}")


def _refuse_no_drop(curve: Curve, *, diverged: bool = False) -> Suggestion | None:
    lrs, losses = curve.lrs, curve.smoothed
    first, lowest = float(losses[0]), float(losses.min())
    if first - lowest < max(MIN_RELATIVE_DROP * abs(first), MIN_ABSOLUTE_DROP):
        fix = ("the range test diverged right after it, so the fall (if any) lies below the range; lower min_lr"
               if diverged else "raise max_lr or num_steps")
        return _no_suggestion(
            f"the loss never fell by {MIN_RELATIVE_DROP:.0%} (from {first:.4g} to at best {lowest:.4g}) between "
            f"lr={lrs[0]:.3g} and lr={lrs[-1]:.3g}; {fix}, or check that the model and data "
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

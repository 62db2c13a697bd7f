"""From the recorded curve to an ``LRFinderResult``: cut at divergence, suggest, check the
range, measure how firm the suggestion is, recommend a schedule.

Pure: numpy only, no torch.distributed, no I/O. Rank 0 calls it and broadcasts what it returns.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distlr.core.curve import Curve
from distlr.core.history import History, RunFacts
from distlr.core.options import RangeTestArgs
from distlr.core.result import LRFinderResult
from distlr.core.rules import (CONSTANT_DIVISOR, MIN_POINTS, MIN_WIDTH, PEAK_DIVISOR, SUGGESTION_RULES,
                               VAL_CONSTANT_DIVISOR, VAL_PEAK_DIVISOR, VAL_WSD_DIVISOR, WIDTH_FRACTION, WSD_DIVISOR,
                               Suggestion, below_turn_up, read_curve, suggest_all, usable_points)
from distlr.core.schedule import recommend_schedule
from distlr.core.smoothing import StopReason, ema

CONFIDENCE_DRAWS = 32
"""Bootstrap resamples of the curve's noise behind ``result.confidence`` (about a millisecond)."""

SEED_SPREAD = 2.25
"""The band is at least this factor either side of the suggestion: on the suggestion benchmark,
another range test with another data order and initialisation (another seed) moved the
suggestion by at most this factor in 80 % of cases, held out over families (tuning.md, "The
band from seed to seed"); the curve's own noise alone (the bootstrap) covered far fewer
(results.md)."""

WIDE_SPREAD = 8.0
"""A band wider than this factor (high / low) is called uncertain, with the advice to repeat:
about twice the width (5.1) that ``SEED_SPREAD`` gives every suggestion."""

EARLY_DIVERGENCE_FRACTION = 0.1
"""Diverging within this fraction of the ladder means the range started too high."""

START_SLOPE_SHARE = 0.5
"""A loss that falls at this share of its fastest rate over the first points has no flat start."""

END_FRACTION = 0.05
"""A loss that never turned up may still be falling: read over this fraction of the last points ..."""

END_SLOPE_SHARE = 0.25
"""... it is, if it falls there at this share of its fastest rate or more (a curve that has
only flattened out is not "still falling"; both decide the note alone, not the suggestion)."""

READINGS = {"constant": (CONSTANT_DIVISOR, VAL_CONSTANT_DIVISOR, "the suggestion"),
            "peak": (PEAK_DIVISOR, VAL_PEAK_DIVISOR, "the peak"), "wsd": (WSD_DIVISOR, VAL_WSD_DIVISOR, "the plateau")}
"""The default's three numbers: (divisor of the training loss's turn-up, divisor of the
validation loss's, what the number is)."""


def default_number(curve: Curve, val: Curve | None, kind: str, *, diverged: bool = False) -> Suggestion:
    """One of the default's numbers (``READINGS``): below the turn-up of the training loss, and
    with a validation curve the lower of that and the same below the validation loss's turn-up.
    ``diverged`` (the training loss diverged or blew up right after the curve) goes to the
    training loss's reading only: the validation loss did not diverge."""
    train_divisor, val_divisor, what = READINGS[kind]
    found = below_turn_up(curve, train_divisor, what=what, diverged=diverged)
    if val is None:
        return found
    from_val = below_turn_up(val, val_divisor, what=what)
    if from_val.lr is None or (found.lr is not None and found.lr <= from_val.lr):
        return found
    return from_val


def usable_curve(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                 diverged_at: int | None) -> Curve:
    """The points the rules may read (``distlr.core.rules.usable_points`` up to ``diverged_at``):
    those before the diverging point (the explosion, not the curve), of those only the ones whose
    loss is finite, and of those only the ones before the loss blew up (``blow_up``: a spike the
    EMA's stop decision rode out)."""
    return usable_points(lrs, losses, smoothed, end=diverged_at).curve


def validation_curve(lrs: Sequence[float], val_steps: Sequence[int], val_losses: Sequence[float],
                     end_lr: float, smooth_factor: float) -> Curve | None:
    """The validation losses as a curve against the LR of the step they followed, up to
    ``end_lr`` (the last usable training point); None with fewer than ``MIN_POINTS``."""
    pairs = [(lrs[s], v) for s, v in zip(val_steps, val_losses) if math.isfinite(v) and lrs[s] <= end_lr]
    if len(pairs) < MIN_POINTS:
        return None
    return Curve.of([lr for lr, _ in pairs], [v for _, v in pairs], smooth_factor=smooth_factor)


def trend(curve: Curve) -> list[float]:
    """The zero-lag smoothing the rules read, for the result and the plot."""
    if len(curve) < MIN_POINTS:
        return curve.losses.tolist()
    return curve.trend(max(MIN_WIDTH, WIDTH_FRACTION * len(curve))).level.tolist()


def confidence(curve: Curve, rule: Callable[[Curve], Suggestion], *, smooth_factor: float,
               draws: int = CONFIDENCE_DRAWS, seed: int = 0, actual: float | None = None) -> dict[str, float] | None:
    """How far the rule's pick moves, under the curve's own noise and from seed to seed.

    The raw losses are split into a trend (the zero-lag smoother at its narrowest, so the
    trend keeps the curve's bends) and a noise level (``distlr.curve.noise_level``, robust to
    the trend); each draw puts fresh normal noise of that level on the trend, recomputes the
    EMA and asks the rule again. A fixed seed on a private generator: the same answer every
    time, and no global RNG is touched. The band is then widened to at least ``SEED_SPREAD``
    either side of the pick (``actual``: the rule's own answer unless given), what another
    range test (another seed) moved it by on the benchmark.

    Returns:
        ``{"low", "high"}`` (the band), ``"spread"`` (high / low), ``"noise_low"``,
        ``"noise_high"`` (the 10th and 90th percentile picks of the bootstrap alone),
        ``"answered"`` (the fraction of draws with a suggestion) and ``"draws"``; None for a
        curve too short to resample or without a pick.
    """
    actual = rule(curve).lr if actual is None else actual
    if len(curve) < MIN_POINTS or actual is None:
        return None
    fit = curve.trend(MIN_WIDTH)
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(draws):
        losses = fit.level + rng.normal(0.0, fit.noise, len(curve))
        pick = rule(curve.with_losses(losses, ema(losses, smooth_factor))).lr
        if pick is not None:
            picks.append(math.log10(pick))
    noise_low, noise_high = ((10 ** np.percentile(picks, 10), 10 ** np.percentile(picks, 90)) if picks
                             else (actual, actual))
    low = min(noise_low, actual / SEED_SPREAD)
    high = max(noise_high, actual * SEED_SPREAD)
    return {"low": float(low), "high": float(high), "spread": float(high / low), "noise_low": float(noise_low),
            "noise_high": float(noise_high), "answered": len(picks) / draws, "draws": draws}


FIRST_STEP_NOT_FINITE = (
    "the loss was not finite at step 1, before any optimizer step: no LR had acted yet, so the cause is the model, "
    "the data or the loss, not the range (a NaN or inf in the inputs or labels, a log of 0, fp16 overflowing in the "
    "forward pass); lowering min_lr would not help")
"""The first loss is computed before the first update, so a NaN there says nothing about the LR."""


def range_notes(curve: Curve, *, num_steps: int, stop_reason: str, diverged_at: int | None, max_lr: float,
                min_lr: float, extended_steps: int) -> list[str]:
    """What was wrong with the range tried, and what to change. Empty when nothing."""
    notes = []
    n = len(curve)
    if stop_reason != "completed" and diverged_at is not None and diverged_at < max(
            MIN_POINTS, EARLY_DIVERGENCE_FRACTION * num_steps):
        if diverged_at == 0:
            notes.append(FIRST_STEP_NOT_FINITE)
        else:
            notes.append(f"the loss diverged at step {diverged_at + 1} of {num_steps}, almost at once: the range "
                         f"started too high; lower min_lr (e.g. to {min_lr / 1000:.0e})")
    elif n < MIN_POINTS:
        notes.append(f"only {n} usable points: raise num_steps (at least {MIN_POINTS * 4} is sensible)")
    if n < MIN_POINTS:
        return notes
    r = read_curve(curve)
    if extended_steps:
        notes.append(f"the loss had not turned up by max_lr={max_lr:.3g}, so the range went on up the same ladder for "
                     f"{extended_steps} more step(s), to lr={curve.lrs[-1]:.3g} (extend_range=False keeps to the "
                     "range)")
    tail = max(1, int(END_FRACTION * n))
    fastest = float(np.min(r.fit.slope[r.start: r.lowest + 1]))
    end_slope = float(np.mean(r.fit.slope[n - 1 - tail:]))
    if r.onset is None and r.fell and stop_reason == "completed" and end_slope < END_SLOPE_SHARE * fastest:
        where = "after extending the range as far as it goes" if extended_steps else f"at max_lr={max_lr:.3g}"
        fix = "raise max_lr" if extended_steps else "raise max_lr, or leave extend_range on"
        notes.append(f"the loss was still falling {where}: every suggestion is capped by the range; {fix} "
                     f"(e.g. max_lr={curve.lrs[-1] * 100:.0e})")
    if r.fell and float(np.mean(r.fit.slope[: r.start + 1])) < START_SLOPE_SHARE * fastest:
        notes.append(f"the loss was already falling at min_lr={min_lr:.3g}: the flat start is missing, so the "
                     f"descent may begin below the range; lower min_lr (e.g. to {min_lr / 100:.0e})")
    return notes


Contribute = Callable[[float | None, dict[str, Any] | None], dict[str, Any]]
"""What a backend adds once the numbers are known: ``(optimal_lr, schedule) -> {field: value}``
(DeepSpeed's ZeRO stage and tuned config), ``"notes"`` appended to the result's."""


def build_result(history: History, args: RangeTestArgs, run: RunFacts = RunFacts(), *,
                 contribute: Contribute | None = None) -> LRFinderResult:
    """The one place an ``LRFinderResult`` is made: every rule's suggestion, the chosen one, the
    peak and plateau for a schedule, how firm the choice is, what was wrong with the range, the
    global batch, what the user should be told, and what the backend ``contribute``s.

    Example:
        >>> import numpy as np
        >>> lrs = np.geomspace(1e-6, 1.0, 100).tolist()
        >>> losses = [2 + 1 / (1 + (lr / 1e-3) ** 2) + 5 * max(0.0, np.log10(lr) + 1.5) ** 2 for lr in lrs]
        >>> result = build_result(History(lrs, losses, ema(losses, 0.98).tolist()),
        ...                       RangeTestArgs(min_lr=1e-6, max_lr=1.0, num_steps=100))
        >>> result.optimal_lr < result.schedule["wsd"]["plateau_lr"] < result.peak_lr
        True
    """
    lrs, losses, smoothed = history.lrs, history.losses, history.smoothed
    points = usable_points(lrs, losses, smoothed, end=history.diverged_at)
    curve = points.curve
    # The loss rose right after the curve's last point: the range test stopped there, or the
    # rules read only up to a blow-up. Either is a response to the LR, whatever the curve shows.
    rose = history.diverged_at is not None or points.blew_up
    suggestions = suggest_all(curve, diverged=rose)
    notes = list(run.notes)
    val = None if not len(curve) else validation_curve(lrs, history.val_steps, history.val_losses,
                                                       float(curve.lrs[-1]), args.smooth_factor)
    method = args.suggestion_method
    if method == next(iter(SUGGESTION_RULES)):
        chosen, peak, plateau = (default_number(curve, val, kind, diverged=rose)
                                 for kind in ("constant", "peak", "wsd"))
        if val is not None:
            notes.append("each number is the lower of its readings of the training loss and of the validation loss "
                         "(val_loader)")
    else:
        chosen = peak = plateau = suggestions[method]
    end = history.diverged_at if history.diverged_at is not None else len(losses)
    if len(curve) and curve.lrs[-1] < lrs[end - 1]:
        cut = list(lrs).index(float(curve.lrs[-1])) + 1
        notes.append(f"the loss blew up at lr={lrs[cut]:.2e} (step {cut + 1}) and fell again at larger LRs; the "
                     "rules read only the points before the blow-up")
    if history.skipped_steps:
        notes.append(f"{history.skipped_steps} fp16 step(s) overflowed and were retried at the same LR")
    global_batch = None
    if history.samples:
        global_batch = sorted(history.samples)[len(history.samples) // 2]
        if min(history.samples) != max(history.samples):
            notes.append(f"the global batch varied between {min(history.samples)} and {max(history.samples)} samples "
                         f"a step (global_batch_size is the median, {global_batch})")
    elif run.micro_batch_size is not None:
        global_batch = run.micro_batch_size * run.world_size * run.accumulation_steps
    if run.cycled:
        notes.append(f"train_dataloader ran out before {len(lrs)} steps and was cycled (new epochs)")
        if not run.validated:
            # On the suggestion benchmark's small fine-tuning sets this moved the default's picks
            # up (median regret 0.22); reading a validation loss too brought it to 0.04.
            notes.append("the range test read some samples more than once, so its loss also measures memorising "
                         "them, which raises the suggestion on small sets (fine-tuning most of all); pass "
                         "val_loader= to read a validation loss as well")
    rule = functools.partial(SUGGESTION_RULES[method], diverged=rose)
    spread = None if chosen.lr is None else confidence(curve, rule, smooth_factor=args.smooth_factor, actual=chosen.lr)
    if spread is not None and spread["spread"] > WIDE_SPREAD:
        notes.append(
            f"the suggestion is uncertain: it moves between {spread['low']:.2e} and {spread['high']:.2e} "
            f"({spread['spread']:.0f}x) under the curve's own noise; range tests with other data orders give a firmer "
            "answer: --repeats 3 on the command line, find_optimal_lr(..., repeats=3) or LRFinder.series(repeats=3)"
        )
    schedule = None
    if peak.lr is not None:
        schedule = recommend_schedule(peak.lr, total_steps=args.total_steps or run.total_steps_hint,
                                      plateau_lr=plateau.lr)
    extra = dict(contribute(chosen.lr, schedule)) if contribute is not None else {}
    notes.extend(extra.pop("notes", []))
    return LRFinderResult(
        optimal_lr=chosen.lr,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        num_steps=args.num_steps,
        lrs=list(lrs),
        losses=list(losses),
        smoothed_losses=list(smoothed),
        best_lr_idx=None if chosen.lr is None else list(lrs).index(chosen.lr),
        suggestion_method=method,
        stop_reason=StopReason(history.stop_reason).value,
        diverged_at=history.diverged_at,
        suggestion_note=chosen.reason,
        suggestions={name: s.lr for name, s in suggestions.items()},
        trend_losses=trend(curve) + [math.nan] * (len(losses) - len(curve)),
        peak_lr=peak.lr,
        confidence=spread,
        range_notes=range_notes(curve, num_steps=args.num_steps, stop_reason=history.stop_reason,
                                diverged_at=history.diverged_at, max_lr=args.max_lr, min_lr=args.min_lr,
                                extended_steps=history.extended_steps),
        schedule=schedule,
        step_mode=args.step_mode,
        world_size=run.world_size,
        micro_batch_size=run.micro_batch_size,
        accumulation_steps=run.accumulation_steps,
        global_batch_size=global_batch,
        elapsed_s=run.elapsed_s,
        notes=notes,
        extended_steps=history.extended_steps,
        val_steps=list(history.val_steps),
        val_losses=list(history.val_losses),
        provenance=dict(run.provenance),
        **extra,
    )

"""From the recorded curve to an ``LRFinderResult``: cut at divergence, suggest, check the
range, measure how firm the suggestion is, recommend a schedule.

Pure: numpy only, no torch.distributed, no I/O. Rank 0 calls it and broadcasts what it returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from distlr.curve import Curve, ema
from distlr.result import LRFinderResult
from distlr.schedule import recommend_schedule
from distlr.tracker import StopReason
from distlr.suggest import (MIN_POINTS, MIN_RELATIVE_DROP, MIN_WIDTH, NOISE_FACTOR, SUGGESTION_RULES, WIDTH_FRACTION,
                            Suggestion, SuggestionRule, blow_up, peak_with, read_curve, suggest_all)

CONFIDENCE_DRAWS = 48
"""Bootstrap resamples of the curve's noise behind ``result.confidence`` (a few ms in all)."""

WIDE_SPREAD = 4.0
"""A suggestion whose 10-90 % bootstrap range spans more than this factor is called uncertain."""

EARLY_DIVERGENCE_FRACTION = 0.1
"""Diverging within this fraction of the ladder means the range started too high."""

END_FRACTION = 0.05
"""A loss minimum within this fraction of the last point means the loss may still be falling ..."""

END_SLOPE_SHARE = 0.25
"""... if over that last stretch it still falls at this share of its fastest rate or more."""

START_SLOPE_SHARE = 0.5
"""A loss that falls at this share of its fastest rate over the first points has no flat start."""


def usable_curve(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                 diverged_at: int | None) -> Curve:
    """The points the rules may read: those before the diverging point (the explosion, not the
    curve), of those only the ones whose loss is finite, and of those only the ones before the
    loss blew up (``distlr.suggest.blow_up``: a spike the EMA's stop decision rode out)."""
    end = diverged_at if diverged_at is not None else len(losses)
    keep = [i for i in range(end) if math.isfinite(losses[i]) and math.isfinite(smoothed[i])]
    curve = Curve.of([lrs[i] for i in keep], [losses[i] for i in keep], [smoothed[i] for i in keep])
    cut = blow_up(curve)
    if cut is None:
        return curve
    return curve.head(cut)


def trend(curve: Curve) -> list[float]:
    """The zero-lag smoothing ``steepest_gradient`` reads, for the result and the plot."""
    if len(curve) < MIN_POINTS:
        return curve.losses.tolist()
    return curve.trend(max(MIN_WIDTH, WIDTH_FRACTION * len(curve))).level.tolist()


def peak_lr(curve: Curve, chosen: Suggestion) -> Suggestion:
    """The peak of a one-cycle or warmup-cosine schedule built on ``chosen`` (the constant LR);
    see ``distlr.suggest.peak_with``."""
    return peak_with(curve, chosen)


def rule_outputs(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                 diverged_at: int | None) -> dict[str, float | None]:
    """Every rule's LR for one recorded curve, by rule name, plus ``"one_cycle"`` (the peak
    built on the default rule). The suggestion benchmark re-scores stored curves with it."""
    curve = usable_curve(lrs, losses, smoothed, diverged_at)
    suggestions = suggest_all(curve)
    out: dict[str, float | None] = {name: s.lr for name, s in suggestions.items()}
    out["one_cycle"] = peak_lr(curve, suggestions["steepest_gradient"]).lr
    return out


def confidence(curve: Curve, rule: SuggestionRule, *, smooth_factor: float, draws: int = CONFIDENCE_DRAWS,
               seed: int = 0) -> dict[str, float] | None:
    """How far the rule's pick moves under the curve's own noise (a parametric bootstrap).

    The raw losses are split into a trend (the zero-lag smoother at its narrowest, so the
    trend keeps the curve's bends) and a noise level (``distlr.curve.noise_level``, robust to
    the trend); each draw puts fresh normal noise of that level on the trend, recomputes the
    EMA and asks the rule again. A fixed seed on a private generator: the same answer every
    time, and no global RNG is touched.

    Returns:
        ``{"low", "high"}`` (the 10th and 90th percentile picks, widened to hold the rule's own
        pick on the curve), ``"spread"`` (high / low),
        ``"answered"`` (the fraction of draws with a suggestion) and ``"draws"``; None for a
        curve too short to resample.
    """
    n = len(curve)
    if n < MIN_POINTS:
        return None
    fit = curve.trend(MIN_WIDTH)
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(draws):
        losses = fit.level + rng.normal(0.0, fit.noise, n)
        pick = rule(curve.with_losses(losses, ema(losses, smooth_factor))).lr
        if pick is not None:
            picks.append(math.log10(pick))
    if not picks:
        return {"low": math.nan, "high": math.nan, "spread": math.nan, "answered": 0.0, "draws": draws}
    low, high = 10 ** np.percentile(picks, 10), 10 ** np.percentile(picks, 90)
    actual = rule(curve).lr
    if actual is not None:  # the band always holds the suggestion itself
        low, high = min(low, actual), max(high, actual)
    return {"low": float(low), "high": float(high), "spread": float(high / low),
            "answered": len(picks) / draws, "draws": draws}


def range_notes(curve: Curve, *, num_steps: int, stop_reason: str, diverged_at: int | None,
                max_lr: float, min_lr: float) -> list[str]:
    """What was wrong with the range the sweep tried, and what to change. Empty when nothing."""
    notes = []
    n = len(curve)
    if stop_reason != "completed" and diverged_at is not None and diverged_at < max(
            MIN_POINTS, EARLY_DIVERGENCE_FRACTION * num_steps):
        notes.append(f"the loss diverged at step {diverged_at + 1} of {num_steps}, almost at once: the range "
                     f"started too high; lower min_lr (e.g. to {min_lr / 1000:.0e})")
    elif n < MIN_POINTS:
        notes.append(f"only {n} usable points: raise num_steps (at least {MIN_POINTS * 4} is sensible)")
    if n < MIN_POINTS:
        return notes
    r = read_curve(curve)
    fit, start, lowest = r.fit, r.start, r.lowest
    falling = r.significance > NOISE_FACTOR and r.drop > MIN_RELATIVE_DROP * abs(r.top)
    # Still falling: the minimum is at the end and the loss there still falls at a good part of
    # its fastest rate (a curve that has flattened out has its minimum at the end too).
    tail = max(1, int(END_FRACTION * n))
    fastest = float(np.min(fit.slope[start: lowest + 1]))
    end_slope = float(np.mean(fit.slope[n - 1 - tail:]))
    if stop_reason == "completed" and falling and lowest >= n - 1 - tail and end_slope < END_SLOPE_SHARE * fastest:
        notes.append(f"the loss was still falling at max_lr={max_lr:.3g}: the best LR may lie above the range "
                     f"and every suggestion is capped by it; raise max_lr (e.g. to {max_lr * 100:.0e})")
    if falling and float(np.mean(fit.slope[: start + 1])) < START_SLOPE_SHARE * fastest:
        notes.append(f"the loss was already falling at min_lr={min_lr:.3g}: the flat start is missing, so the "
                     f"descent may begin below the range; lower min_lr (e.g. to {min_lr / 100:.0e})")
    return notes


def build_result(
    *,
    lrs: Sequence[float],
    losses: Sequence[float],
    smoothed: Sequence[float],
    stop_reason: str,
    diverged_at: int | None,
    min_lr: float,
    max_lr: float,
    num_steps: int,
    smooth_factor: float,
    suggestion_method: str,
    step_mode: str,
    world_size: int,
    micro_batch_size: int | None,
    accumulation_steps: int,
    elapsed_s: float,
    global_batch_size: int | None = None,
    skipped_steps: int = 0,
    total_steps: int | None = None,
    notes: list[str] | None = None,
) -> LRFinderResult:
    """Assemble the result of a sweep: every rule's suggestion, the chosen one, the peak for a
    schedule, how firm the choice is, what was wrong with the range, a schedule."""
    curve = usable_curve(lrs, losses, smoothed, diverged_at)
    suggestions = suggest_all(curve)
    chosen = suggestions[suggestion_method]
    notes = list(notes or [])
    end = diverged_at if diverged_at is not None else len(losses)
    if len(curve) and curve.lrs[-1] < lrs[end - 1]:
        cut = list(lrs).index(float(curve.lrs[-1])) + 1
        notes.append(f"the loss blew up at lr={lrs[cut]:.2e} (step {cut + 1}) and fell again at larger LRs; the "
                     "rules read only the points before the blow-up")
    if skipped_steps:
        notes.append(f"{skipped_steps} fp16 step(s) overflowed and were retried at the same LR")
    peak = peak_lr(curve, chosen)
    spread = confidence(curve, SUGGESTION_RULES[suggestion_method], smooth_factor=smooth_factor) \
        if chosen.lr is not None else None
    if spread is not None and (spread["answered"] < 0.8 or spread["spread"] > WIDE_SPREAD):
        notes.append(
            f"the suggestion is uncertain: under the curve's own noise it moves between {spread['low']:.2e} and "
            f"{spread['high']:.2e} (and {1 - spread['answered']:.0%} of resampled curves give none); a larger "
            "batch or more num_steps gives a firmer answer"
        )
    best_idx = None
    if chosen.lr is not None:
        # Map the index among the usable points back onto the recorded curve.
        best_idx = list(lrs).index(float(curve.lrs[chosen.index]))
    # Measured (samples per step over all ranks) when the sweep gives it, else from the first batch.
    global_batch = global_batch_size
    if global_batch is None and micro_batch_size is not None:
        global_batch = micro_batch_size * world_size * accumulation_steps
    return LRFinderResult(
        optimal_lr=chosen.lr,
        min_lr=min_lr,
        max_lr=max_lr,
        num_steps=num_steps,
        lrs=list(lrs),
        losses=list(losses),
        smoothed_losses=list(smoothed),
        best_lr_idx=best_idx,
        suggestion_method=suggestion_method,
        stop_reason=StopReason(stop_reason).value,
        diverged_at=diverged_at,
        suggestion_note=chosen.reason,
        suggestions={name: s.lr for name, s in suggestions.items()},
        trend_losses=trend(curve) + [math.nan] * (len(losses) - len(curve)),
        peak_lr=peak.lr,
        confidence=spread,
        range_notes=range_notes(curve, num_steps=num_steps, stop_reason=stop_reason, diverged_at=diverged_at,
                                max_lr=max_lr, min_lr=min_lr),
        schedule=None if peak.lr is None else recommend_schedule(peak.lr, total_steps=total_steps),
        step_mode=step_mode,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        accumulation_steps=accumulation_steps,
        global_batch_size=global_batch,
        elapsed_s=elapsed_s,
        notes=notes,
    )

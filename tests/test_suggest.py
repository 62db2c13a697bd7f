"""Suggestion rules on fixed curves whose right answer is known: one test per failure users hit.

Pure: numpy only. Each curve is raw losses on a ladder; ``Curve.of`` adds the EMA the range test
would have recorded (smooth_factor 0.98, the default), so the rules see what they see in a run.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from distlr.core import rules as suggest
from distlr.core.analysis import SEED_SPREAD, build_result, confidence, range_notes, usable_curve
from distlr.core.history import History
from distlr.core.options import RangeTestArgs
from distlr.core.curve import Curve, local_linear, noise_level
from distlr.core.smoothing import ema
from distlr.core.rules import MIN_POINTS, SUGGESTION_RULES, Suggestion, minimum, steepest_gradient, suggest_all, valley

DECADE = 1.0  # log10 units


def drop(lrs: np.ndarray, centre: float, width: float = 0.3, depth: float = 1.0) -> np.ndarray:
    """A loss falling from 1 + depth to 1, fastest (against log10 lr) exactly at ``centre``."""
    z = (np.log10(lrs) - math.log10(centre)) / width
    return 1.0 + depth / (1.0 + np.exp(z))


def drop_then_climb(lrs: np.ndarray, centre: float, climb_after: float = 1.0, **kw: float) -> np.ndarray:
    """The drop, then a climb ``climb_after`` decades past ``centre``, as before divergence."""
    past = np.clip(np.log10(lrs) - math.log10(centre) - climb_after, 0.0, None)
    return drop(lrs, centre, **kw) + 3.0 * past**2


def noisy(losses: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    return losses + np.random.default_rng(seed).normal(0.0, sigma, len(losses))


def decades_between(a: float, b: float) -> float:
    return abs(math.log10(a) - math.log10(b))


# --- steepest_gradient: below where the loss turns up -----------------------------------------


def turn_up_lr(curve: Curve) -> float:
    return float(curve.lrs[suggest.rise_onset(curve)])


@pytest.mark.parametrize("centre", [1e-4, 1e-3, 3e-2])
def test_the_turn_up_is_found_where_the_climb_begins(centre):
    lrs = np.geomspace(1e-7, 10.0, 100)
    curve = Curve.of(lrs, drop_then_climb(lrs, centre))
    # The climb starts a decade past the centre; it is seen once it rose by 1 % of the loss.
    assert 0.0 <= math.log10(turn_up_lr(curve)) - math.log10(centre * 10) <= 0.25


@pytest.mark.parametrize("centre", [1e-4, 1e-3, 3e-2])
def test_the_suggestion_is_the_ladder_point_at_or_below_the_turn_up_over_the_divisor(centre):
    lrs = np.geomspace(1e-7, 10.0, 100)
    curve = Curve.of(lrs, drop_then_climb(lrs, centre))
    result = steepest_gradient(curve)
    target = turn_up_lr(curve) / suggest.CONSTANT_DIVISOR
    step = lrs[1] / lrs[0]
    assert result.lr == lrs[result.index] and target / step < result.lr <= target * (1 + 1e-9)


def test_a_fine_tuning_curve_flat_then_rising_is_answered_from_where_the_rise_begins():
    # A pretrained model on new data: the loss does not fall, it only rises past 1e-4.
    lrs = np.geomspace(1e-8, 1e-1, 100)
    rise = 2.5 * np.clip(np.log10(lrs) + 4.0, 0.0, None) ** 2
    for seed in range(5):
        curve = Curve.of(lrs, noisy(2.3 + rise, sigma=0.03, seed=seed))
        result = steepest_gradient(curve)
        assert result.lr is not None, result.reason
        assert -0.1 <= math.log10(turn_up_lr(curve)) + 4.0 <= 0.5
        assert result.lr < 1e-4


@pytest.mark.parametrize("seed", range(6))
def test_pure_noise_is_refused_as_a_loss_that_does_not_respond(seed):
    lrs = np.geomspace(1e-6, 10.0, 100)
    result = steepest_gradient(Curve.of(lrs, noisy(np.full(100, 2.3), sigma=0.2, seed=seed)))
    assert result.lr is None
    assert "does not respond to the LR" in result.reason and "raise max_lr" in result.reason


def test_the_same_curve_with_a_dip_in_its_flat_bottom_gets_nearly_the_same_answer():
    # The two-readings jump: a long flat bottom, with or without a small dip near its end (one
    # seed's curve and another's). The rule before this one moved its pick 16x with such a dip,
    # from the steepest point to the end of the descent; the turn-up moves by what the deeper
    # minimum delays the climb past it.
    lrs = np.geomspace(1e-8, 1e-1, 100)
    x = np.log10(lrs)
    base = drop(lrs, 1e-5, width=0.4) + 3.0 * np.clip(x + 1.6, 0.0, None) ** 2
    dipped = base - 0.03 * np.exp(-0.5 * ((x + 2.2) / 0.2) ** 2)
    picks = [steepest_gradient(Curve.of(lrs, noisy(c, 0.01, seed=1))).lr for c in (base, dipped)]
    assert max(picks) / min(picks) < 2.0


def test_ema_lag_does_not_move_the_pick():
    # The rule reads the raw losses' zero-lag trend, not the recorded EMA: any smooth_factor
    # gives the same pick.
    lrs = np.geomspace(1e-7, 10.0, 100)
    losses = noisy(drop_then_climb(lrs, 1e-3, climb_after=2.0, width=0.15), 0.01)
    picks = {steepest_gradient(Curve.of(lrs, losses, smooth_factor=beta)).lr for beta in (0.0, 0.9, 0.98, 0.995)}
    assert len(picks) == 1


def test_a_noisy_flat_start_is_not_picked():
    lrs = np.geomspace(1e-6, 10.0, 100)
    losses = noisy(drop_then_climb(lrs, 1e-2, width=0.4), sigma=0.08, seed=3)
    result = steepest_gradient(Curve.of(lrs, losses))
    assert result.lr is not None
    assert 1e-3 < result.lr < 1e-1 / suggest.CONSTANT_DIVISOR * 3


@pytest.mark.parametrize("seed", range(6))
def test_a_noisy_curve_with_a_real_descent_gets_an_answer(seed):
    lrs = np.geomspace(1e-6, 1.0, 100)
    losses = noisy(drop_then_climb(lrs, 1e-3, width=0.3, depth=0.8), sigma=0.25, seed=seed)
    result = steepest_gradient(Curve.of(lrs, losses))
    assert result.lr is not None, result.reason
    assert 1e-4 < result.lr < 1e-2


def test_a_loss_that_blows_up_and_then_collapses_is_read_only_up_to_the_blow_up():
    # The range test's EMA rode out a spike past the minimum (no divergence stop), after which the
    # model collapsed to a loss below anything the real descent reached (seen on a CNN with AdamW
    # at lr 1-10 and an MLP at batch 2). The pick must come from before the spike near 1.
    lrs = np.geomspace(1e-7, 10.0, 100)
    x = np.log10(lrs)
    losses = drop(lrs, 1e-3, width=0.3) + 8.0 * np.exp(-0.5 * ((x - 0.0) / 0.3) ** 2)
    losses[x > 0.5] = 0.05  # the collapse at the end
    losses = noisy(losses, 0.01)
    result = result_for(lrs.tolist(), losses.tolist())
    assert result.stop_reason == "completed"
    assert 1e-3 < result.optimal_lr < 1e-1 and result.peak_lr < 0.3
    assert all(lr is None or lr < 0.3 for lr in result.suggestions.values())
    assert any("blew up at lr=" in note and "read only the points before" in note for note in result.notes)


def test_a_curve_still_falling_at_its_end_is_read_at_its_last_point_and_says_so():
    lrs = np.geomspace(1e-8, 1e-1, 100)
    results = [result_for(lrs.tolist(), noisy(drop(lrs, 5e-2, width=0.5), sigma=0.03, seed=seed).tolist())
               for seed in range(5)]
    for r in results:
        assert r.optimal_lr == pytest.approx(lrs[lrs <= 0.1 / suggest.CONSTANT_DIVISOR * (1 + 1e-9)][-1])
        assert any("still falling at max_lr" in note for note in r.range_notes)


@pytest.mark.parametrize(("num_steps", "min_lr", "max_lr"), [(50, 1e-6, 10.0), (30, 1e-8, 1e-1)])
def test_short_sweeps_still_get_a_suggestion(num_steps, min_lr, max_lr):
    lrs = np.geomspace(min_lr, max_lr, num_steps)
    centre = 10 ** (math.log10(min_lr) + 0.5 * (math.log10(max_lr) - math.log10(min_lr)))
    losses = noisy(drop_then_climb(lrs, centre, width=0.4), sigma=0.01, seed=1)
    result = steepest_gradient(Curve.of(lrs, losses))
    assert result.lr is not None, result.reason
    assert result.lr < 10 * centre and decades_between(result.lr, centre) < 1.5


def test_a_loss_that_only_rises_from_the_first_points_is_refused_with_what_to_change():
    lrs = np.geomspace(1e-6, 1.0, 100)
    losses = np.concatenate([[3.0, 2.0, 1.5, 1.0], 1.0 + 0.05 * np.arange(1, 97)])
    result = steepest_gradient(Curve.of(lrs, losses))
    assert result.lr is None
    assert "lower min_lr" in result.reason


def test_still_open_goes_on_while_the_loss_falls_and_stops_once_it_turns_up():
    lrs = np.geomspace(1e-8, 10.0, 130)
    losses = drop_then_climb(lrs, 1e-2)          # falls to ~1e-1, climbs after 1e-1
    reading = suggest.read_curve(Curve.of(lrs, losses))
    assert reading.onset is not None
    assert all(suggest.still_open(lrs[:n].tolist(), losses[:n].tolist()) for n in range(2, reading.lowest + 1))
    # Read online, the last points' trend is one-sided and less sure: the range closes a few
    # points after the turn-up the whole curve shows, and stays closed.
    closed = [not suggest.still_open(lrs[:n].tolist(), losses[:n].tolist()) for n in range(reading.onset, 131)]
    first = closed.index(True)
    assert first <= 5 and all(closed[first:])


# --- never an LR that was not tried ------------------------------------------------------------


def test_minimum_below_min_lr_is_refused_not_invented():
    # The lowest loss is under a decade above min_lr: a tenth of it was never tried.
    lrs = np.geomspace(1e-8, 1e-1, 100)
    losses = np.concatenate([np.linspace(3.0, 1.0, 8), np.linspace(1.1, 4.0, 92)])
    result = minimum(Curve.of(lrs, losses, losses))
    assert result.lr is None
    assert "below the lowest lr the range test tried" in result.reason and "lower min_lr" in result.reason


def test_minimum_is_the_ladder_point_at_or_below_a_tenth_of_the_minimum():
    lrs = np.geomspace(1e-6, 1.0, 121)  # 20 points per decade
    losses = np.concatenate([np.linspace(3.0, 1.0, 81), np.linspace(1.1, 4.0, 40)])
    result = minimum(Curve.of(lrs, losses, losses))
    assert result.index == 60 and result.lr == lrs[60]  # one decade, 20 points, below point 80


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("rule", list(SUGGESTION_RULES))
def test_every_answer_is_an_lr_the_sweep_tried(rule, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 150))
    lrs = np.sort(10 ** rng.uniform(-9, 1, n)) if seed % 3 == 0 else np.geomspace(1e-8, 1e-1, n)
    lrs = np.unique(lrs)
    centre = 10 ** rng.uniform(-8, 0)
    losses = noisy(drop_then_climb(lrs, centre), sigma=float(rng.uniform(0, 0.3)), seed=seed)
    curve = Curve.of(lrs, losses)
    result = SUGGESTION_RULES[rule](curve)
    if result.lr is None:
        assert result.reason
    else:
        assert result.lr == lrs[result.index]
    if rule == "steepest_gradient":
        for number in (suggest.peak(curve), suggest.wsd_plateau(curve)):
            assert number.lr is None or (number.lr in lrs and number.lr >= (result.lr or 0))


# --- the range was wrong -----------------------------------------------------------------------


def notes_for(lrs, losses, *, stop_reason="completed", diverged_at=None, extended_steps=0):
    curve = usable_curve(lrs, losses, ema(np.asarray(losses, dtype=float), 0.98).tolist(), diverged_at)
    return range_notes(curve, num_steps=len(lrs), stop_reason=stop_reason, diverged_at=diverged_at,
                       max_lr=lrs[-1], min_lr=lrs[0], extended_steps=extended_steps)


def test_loss_still_falling_at_max_lr_is_said_with_a_larger_max_lr():
    lrs = np.geomspace(1e-8, 1e-1, 100).tolist()
    losses = drop(np.asarray(lrs), 3e-2, width=0.5).tolist()
    (note,) = notes_for(lrs, losses)
    assert "still falling at max_lr=0.1" in note and "raise max_lr, or leave extend_range on (e.g. max_lr=1e+01)" in note


def test_an_extended_range_is_said_with_how_far_it_went():
    lrs = np.geomspace(1e-8, 1.0, 115).tolist()   # 100 steps to 0.1, 15 more
    losses = drop_then_climb(np.asarray(lrs), 3e-2, climb_after=1.0).tolist()
    (note,) = notes_for(lrs, losses, extended_steps=15)
    assert "had not turned up by max_lr=1" in note and "15 more step(s), to lr=1" in note


def test_a_loss_that_flattened_at_max_lr_is_not_called_still_falling():
    lrs = np.geomspace(1e-8, 1e-1, 100).tolist()
    assert notes_for(lrs, drop(np.asarray(lrs), 1e-4).tolist()) == []


def test_divergence_in_the_first_points_says_lower_min_lr():
    lrs = np.geomspace(1e-2, 10.0, 100).tolist()
    losses = [2.0, 2.5, 4.0, 9.0, 30.0]
    (note,) = notes_for(lrs[:5], losses, stop_reason="diverged", diverged_at=4)
    assert "diverged at step 5" in note and "lower min_lr" in note


def test_too_few_points_say_raise_num_steps():
    lrs = [1e-4, 1e-3, 1e-2]
    (note,) = notes_for(lrs, [2.0, 1.5, 1.2])
    assert "only 3 usable points" in note and "raise num_steps" in note


def test_a_curve_already_falling_at_min_lr_says_lower_min_lr():
    lrs = np.geomspace(1e-3, 10.0, 100)
    losses = drop_then_climb(lrs, 1e-3, climb_after=2.0)
    notes = notes_for(lrs.tolist(), losses.tolist())
    assert any("already falling at min_lr" in note for note in notes)


# --- confidence and the result -----------------------------------------------------------------


def test_the_band_is_at_least_the_seed_spread_and_wider_on_a_noisy_curve():
    lrs = np.geomspace(1e-7, 10.0, 100)
    curve = Curve.of(lrs, noisy(drop_then_climb(lrs, 1e-3), 0.005))
    clean = confidence(curve, steepest_gradient, smooth_factor=0.98)
    pick = steepest_gradient(curve).lr
    assert clean["answered"] == 1.0
    assert clean["low"] == pytest.approx(pick / SEED_SPREAD) and clean["high"] == pytest.approx(pick * SEED_SPREAD)
    assert clean["noise_high"] / clean["noise_low"] < 1.5
    short = np.geomspace(1e-7, 10.0, 40)  # fewer points and more noise
    rough = confidence(Curve.of(short, noisy(drop_then_climb(short, 1e-3, depth=0.5), 0.3)), steepest_gradient,
                       smooth_factor=0.98)
    assert rough["spread"] > clean["spread"]


def test_confidence_is_deterministic_and_leaves_the_global_rng_alone():
    lrs = np.geomspace(1e-7, 10.0, 100)
    curve = Curve.of(lrs, noisy(drop_then_climb(lrs, 1e-3), 0.05))
    state = np.random.get_state()[1].copy()
    first = confidence(curve, steepest_gradient, smooth_factor=0.98)
    assert confidence(curve, steepest_gradient, smooth_factor=0.98) == first
    assert np.array_equal(np.random.get_state()[1], state)


def result_for(lrs, losses, **history):
    smoothed = ema(np.asarray(losses, dtype=float), 0.98).tolist()
    return build_result(History(list(lrs), list(losses), smoothed, **history),
                        RangeTestArgs(min_lr=lrs[0], max_lr=lrs[-1], num_steps=len(lrs)))


def test_result_carries_three_numbers_confidence_and_range_notes():
    lrs = np.geomspace(1e-8, 1e-1, 100)
    result = result_for(lrs.tolist(), noisy(drop(lrs, 3e-2, width=0.5), 0.01).tolist())
    assert result.optimal_lr < result.schedule["wsd"]["plateau_lr"] < result.peak_lr
    assert result.schedule["peak_lr"] == result.peak_lr
    assert result.confidence["low"] <= result.confidence["high"]
    assert any("still falling at max_lr" in note for note in result.range_notes)


def test_an_uncertain_suggestion_says_that_repeats_help_and_with_which_flag():
    # A slow climb out of a flat start, on 40 noisy points: where it turns up moves with the noise.
    lrs = np.geomspace(1e-7, 10.0, 40)
    losses = noisy(2.0 + 0.5 * np.clip(np.log10(lrs) + 3, 0, None), sigma=0.2, seed=2)
    result = result_for(lrs.tolist(), losses.tolist())
    assert result.optimal_lr is not None
    note = next(note for note in result.notes if "uncertain" in note)
    assert "--repeats 3" in note and "repeats=3" in note, result.confidence


def test_with_a_validation_loss_each_number_is_the_lower_reading():
    # The training loss turns up past 1e-1; the validation loss, over-fitting, past 1e-4.
    lrs = np.geomspace(1e-8, 1.0, 100)
    train = drop_then_climb(lrs, 1e-2)
    val = 2.0 + 3.0 * np.clip(np.log10(lrs) + 4.0, 0.0, None) ** 2
    steps = list(range(1, 100, 2))
    plain = result_for(lrs.tolist(), train.tolist())
    both = result_for(lrs.tolist(), train.tolist(), val_steps=steps, val_losses=val[steps].tolist())
    assert both.optimal_lr < 1e-4 < plain.optimal_lr
    assert both.peak_lr < 1e-4 and both.schedule["wsd"]["plateau_lr"] < 1e-4
    assert any("validation loss" in note for note in both.notes)
    # A validation loss that turns up later changes nothing.
    late = result_for(lrs.tolist(), train.tolist(), val_steps=steps, val_losses=train[steps].tolist())
    assert late.optimal_lr == plain.optimal_lr


# --- valley and the shared guards --------------------------------------------------------------


def valley_curve() -> np.ndarray:
    """60 points: a slight rise over 0..9, a strict fall over 10..40, a climb after 40."""
    return np.concatenate([1.0 + 0.01 * np.arange(10), np.linspace(1.5, 0.5, 31), 0.5 + 0.1 * np.arange(1, 20)])


def test_valley_takes_the_log_midpoint_of_the_longest_descent():
    lrs = np.geomspace(1e-5, 1e-1, 60)
    assert valley(Curve.of(lrs, valley_curve(), valley_curve())).index == 25
    linear = np.linspace(1e-3, 1e-1, 60)
    assert valley(Curve.of(linear, valley_curve(), valley_curve())).index == 20


@pytest.mark.parametrize("losses", [np.full(50, 2.0), np.linspace(2.0, 3.0, 50), np.full(50, 0.0)],
                         ids=["constant", "rising", "zero"])
@pytest.mark.parametrize("rule", list(SUGGESTION_RULES))
def test_no_suggestion_when_the_loss_never_fell(rule, losses):
    result = SUGGESTION_RULES[rule](Curve.of(np.geomspace(1e-6, 1.0, 50), losses))
    assert result.lr is None
    if rule != "steepest_gradient":
        assert "never fell by 1%" in result.reason
    elif losses[0] == losses[-1]:
        assert "does not respond to the LR" in result.reason
    else:  # rising from the first point: turned up before the range began
        assert "below the lowest lr the range test tried" in result.reason and "lower min_lr" in result.reason


@pytest.mark.parametrize("rule", list(SUGGESTION_RULES))
def test_too_few_points(rule):
    result = SUGGESTION_RULES[rule](Curve.of([1e-4, 1e-3, 1e-2], [3.0, 2.0, 1.0]))
    assert result.lr is None and "only 3 usable points" in result.reason
    assert MIN_POINTS == 5


@pytest.mark.parametrize(
    ("lrs", "losses", "match"),
    [
        ([1e-3, 1e-2, 1e-1], [1.0, 2.0], "same length"),
        ([1e-3, 1e-2, 1e-1], [1.0, math.nan, 2.0], r"losses must be finite; losses\[1\]"),
        ([1e-3, math.inf, 1e-1], [1.0, 2.0, 3.0], r"lrs must be finite; lrs\[1\]"),
        ([1e-3, 1e-2, 1e-2], [1.0, 2.0, 3.0], r"strictly increasing; lrs\[1\]"),
        ([0.0, 1e-2, 1e-1], [1.0, 2.0, 3.0], "positive"),
        ([[1e-3, 1e-2]], [[1.0, 2.0]], "1-D"),
    ],
)
def test_bad_curves_raise(lrs, losses, match):
    with pytest.raises(ValueError, match=match):
        Curve.of(lrs, losses)


def test_every_rule_has_one_signature_and_suggest_all_runs_them_in_order():
    for rule in SUGGESTION_RULES.values():
        assert list(inspect.signature(rule).parameters) == ["curve", "losses", "smoothed", "diverged"]
    lrs = np.geomspace(1e-7, 10.0, 100)
    curve = Curve.of(lrs, drop_then_climb(lrs, 1e-3))
    every = suggest_all(curve)
    assert list(every) == ["steepest_gradient", "valley", "minimum"]
    assert all(every[name] == rule(curve) for name, rule in SUGGESTION_RULES.items())


@pytest.mark.parametrize(("lr", "index", "reason"), [(1e-3, None, None), (None, 3, "why"), (1e-3, 3, "why")])
def test_a_suggestion_is_either_an_lr_or_a_reason(lr, index, reason):
    with pytest.raises(ValueError, match="either lr and index"):
        Suggestion(lr=lr, index=index, reason=reason)


def test_the_zero_lag_smoother_follows_a_line_exactly_and_measures_noise():
    x = np.linspace(-8, 0, 100)
    fit = local_linear(x, 3.0 - 0.5 * x, 4.0)
    assert np.allclose(fit.level, 3.0 - 0.5 * x) and np.allclose(fit.slope, -0.5)
    assert noise_level(noisy(3.0 - 0.5 * x, 0.1, seed=2)) == pytest.approx(0.1, rel=0.3)

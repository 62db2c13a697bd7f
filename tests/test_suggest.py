"""Suggestion rules on synthetic curves whose right answer is known in advance."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from distlr import suggest
from distlr.suggest import (
    MIN_POINTS,
    SUGGESTION_RULES,
    Suggestion,
    minimum,
    steepest_gradient,
    suggest_all,
    valley,
)


def sigmoid_drop(lrs: np.ndarray, centre: float, width: float = 0.2) -> np.ndarray:
    """A loss falling from 2 to 1, fastest (against log10 lr) exactly at ``centre``."""
    z = (np.log10(lrs) - math.log10(centre)) / width
    return 1.0 + 1.0 / (1.0 + np.exp(z))


def drop_then_climb(lrs: np.ndarray, centre: float) -> np.ndarray:
    """The sigmoid drop, then a climb starting one decade after ``centre``, as before divergence."""
    past = np.clip(np.log10(lrs) - math.log10(centre) - 1.0, 0.0, None)
    return sigmoid_drop(lrs, centre) + 3.0 * past**2


def valley_curve() -> np.ndarray:
    """60 points: a slight rise over 0..9, a strict fall over 10..40, a climb after 40."""
    rise = 1.0 + 0.01 * np.arange(10)
    fall = np.linspace(1.5, 0.5, 31)
    climb = 0.5 + 0.1 * np.arange(1, 20)
    return np.concatenate([rise, fall, climb])


# --- steepest_gradient -------------------------------------------------------------------------


@pytest.mark.parametrize("centre", [1e-4, 1e-3, 3e-2])
def test_steepest_gradient_finds_the_centre_of_the_drop_on_an_exponential_ladder(centre):
    lrs = np.geomspace(1e-6, 1.0, 100)
    result = steepest_gradient(lrs, drop_then_climb(lrs, centre))
    step = math.log10(lrs[1] / lrs[0])
    assert result.reason is None
    assert abs(math.log10(result.lr) - math.log10(centre)) <= step
    assert result.lr == lrs[result.index]


def test_steepest_gradient_finds_the_centre_of_the_drop_on_a_linear_ladder():
    lrs = np.linspace(1e-4, 1e-1, 300)
    centre = 3e-2
    result = steepest_gradient(lrs, drop_then_climb(lrs, centre))
    assert result.reason is None
    assert abs(result.lr - centre) <= lrs[1] - lrs[0]


def test_steepest_gradient_skips_a_steep_noisy_start(monkeypatch):
    lrs = np.geomspace(1e-6, 1.0, 100)
    centre = 1e-3
    losses = drop_then_climb(lrs, centre)
    # A bias-corrected EMA can start with a few far steeper points than the real descent.
    losses[:3] += [3.0, 1.5, 0.5]

    result = steepest_gradient(lrs, losses)
    assert abs(math.log10(result.lr) - math.log10(centre)) <= math.log10(lrs[1] / lrs[0])

    # Without the 10 % trim (only the one-point floor left) the noisy start wins.
    monkeypatch.setattr(suggest, "TRIM_START_FRACTION", 0.0)
    assert steepest_gradient(lrs, losses).index == 1


def test_steepest_gradient_ignores_a_dip_on_the_climb_after_the_minimum():
    lrs = np.geomspace(1e-6, 1.0, 100)
    losses = drop_then_climb(lrs, 1e-3)
    # A sharp dip on the way to divergence, still above the minimum: far steeper than the descent.
    losses[81] -= 2.0
    assert losses[81] > losses.min()
    result = steepest_gradient(lrs, losses)
    assert abs(math.log10(result.lr) - math.log10(1e-3)) <= math.log10(lrs[1] / lrs[0])


def test_steepest_gradient_refuses_when_the_minimum_comes_inside_the_trimmed_start():
    lrs = np.geomspace(1e-6, 1.0, 100)
    losses = np.concatenate([[3.0, 2.0, 1.5, 1.0], 1.0 + 0.05 * np.arange(1, 97)])
    result = steepest_gradient(lrs, losses)
    assert result.lr is None and result.index is None
    assert "lower min_lr" in result.reason
    # The other rules still see a usable descent.
    assert minimum(lrs, losses).lr == pytest.approx(lrs[3] / 10)


@pytest.mark.parametrize(("lowest", "suggests"), [(7, False), (8, True)])
def test_steepest_gradient_needs_three_points_between_the_trim_and_the_minimum(lowest, suggests):
    lrs = np.geomspace(1e-6, 1.0, 50)  # the trim skips points 0..4
    losses = np.concatenate([np.linspace(3.0, 1.0, lowest + 1), 1.0 + 0.1 * np.arange(1, 50 - lowest)])
    result = steepest_gradient(lrs, losses)
    assert (result.lr is not None) == suggests
    if not suggests:
        assert "need 3" in result.reason


def test_steepest_gradient_refuses_when_no_slope_in_the_window_is_negative():
    # An uneven ladder (a jump before the last point) can leave every slope before the minimum >= 0.
    lrs = [1e-7, 1e-6, 1e-5, 1e-4, 1e-1]
    result = steepest_gradient(lrs, [2.0, 2.0, 2.1, 2.5, 1.0])
    assert result.lr is None
    assert "never slopes down" in result.reason


# --- valley ------------------------------------------------------------------------------------


def test_valley_suggests_the_middle_of_the_descent_on_an_exponential_ladder():
    lrs = np.geomspace(1e-5, 1e-1, 60)
    result = valley(lrs, valley_curve())
    # The fall spans points 10..40; on an exponential ladder its log-midpoint is point 25.
    assert result.index == 25
    assert result.lr == lrs[25]


def test_valley_takes_the_midpoint_in_log_space_on_a_linear_ladder():
    lrs = np.linspace(1e-3, 1e-1, 60)
    result = valley(lrs, valley_curve())
    # sqrt(lrs[10] * lrs[40]) = 0.0348 is nearest to lrs[20]; the midpoint by index would be 25.
    assert result.index == 20
    assert result.lr == lrs[20]


def test_valley_ignores_a_short_bump_before_the_long_descent():
    lrs = np.geomspace(1e-5, 1e-1, 40)
    bump = [2.0, 1.8, 1.9, 2.5]  # falls two points, then rises above the start
    fall = np.linspace(2.4, 1.0, 30)
    climb = 1.0 + 0.2 * np.arange(1, 7)
    result = valley(lrs, np.concatenate([bump, fall, climb]))
    # Longest descent: 2.5 at point 3 then the 30-point fall, i.e. points 3..33, log-midpoint 18.
    assert result.index == 18


def test_valley_does_not_count_a_flat_stretch_as_descent():
    lrs = np.geomspace(1e-5, 1e-1, 60)
    flat = np.full(30, 2.0)
    fall = np.linspace(1.9, 1.0, 20)
    climb = 1.0 + 0.2 * np.arange(1, 11)
    result = valley(lrs, np.concatenate([flat, fall, climb]))
    # Strict descent: the last 2.0 (point 29) then the fall to point 49; log-midpoint 39.
    assert result.index == 39


def test_valley_prefers_the_earlier_of_two_equally_long_descents():
    lrs = np.geomspace(1e-5, 1e-1, 13)
    # Points 0..6 fall to 0.8; 2.0, 1.9 and points 8..12 fall to 0.9: both are 7 long.
    losses = [2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.8, 1.9, 1.7, 1.5, 1.3, 1.1, 0.9]
    assert valley(lrs, losses).index == 3


# --- minimum -----------------------------------------------------------------------------------


def test_minimum_is_the_lr_of_the_lowest_loss_divided_by_ten():
    lrs = np.geomspace(1e-6, 1.0, 121)  # 20 points per decade
    losses = np.concatenate([np.linspace(3.0, 1.0, 81), np.linspace(1.1, 4.0, 40)])
    result = minimum(lrs, losses)
    assert result.lr == pytest.approx(lrs[80] / 10)
    assert result.index == 60  # one decade, 20 points, below the minimum


def test_minimum_below_the_ladder_sits_on_the_first_point():
    lrs = np.geomspace(1e-6, 1.0, 121)
    losses = np.concatenate([np.linspace(3.0, 1.0, 6), np.linspace(1.1, 4.0, 115)])
    result = minimum(lrs, losses)
    assert result.lr == pytest.approx(lrs[5] / 10)
    assert result.lr < lrs[0]
    assert result.index == 0


# --- shared guards -----------------------------------------------------------------------------


LADDER = np.geomspace(1e-6, 1.0, 50)


@pytest.mark.parametrize(
    "losses",
    [
        np.full(50, 2.0),
        np.linspace(2.0, 3.0, 50),
        np.full(50, 0.0),
        np.concatenate([[2.0], np.linspace(2.0, 1.99, 49)]),  # a 0.5 % drop is not enough
    ],
    ids=["constant", "rising", "zero", "half-percent-drop"],
)
@pytest.mark.parametrize("rule", list(SUGGESTION_RULES))
def test_no_suggestion_when_the_loss_never_fell(rule, losses):
    result = SUGGESTION_RULES[rule](LADDER, losses)
    assert result == Suggestion(lr=None, index=None, reason=result.reason)
    assert "never fell by 1%" in result.reason
    assert "max_lr" in result.reason


@pytest.mark.parametrize("rule", list(SUGGESTION_RULES))
def test_a_two_percent_drop_is_enough(rule):
    losses = np.concatenate([np.linspace(2.0, 1.96, 30), np.linspace(1.97, 2.5, 20)])
    assert SUGGESTION_RULES[rule](LADDER, losses).lr is not None


@pytest.mark.parametrize("rule", list(SUGGESTION_RULES))
def test_too_few_points(rule):
    result = SUGGESTION_RULES[rule]([1e-4, 1e-3, 1e-2], [3.0, 2.0, 1.0])
    assert result.lr is None and result.index is None
    assert "only 3 usable points" in result.reason
    assert "min_lr" in result.reason and "num_steps" in result.reason


@pytest.mark.parametrize("rule", list(SUGGESTION_RULES))
def test_min_points_is_the_boundary(rule):
    lrs = np.geomspace(1e-4, 1.0, MIN_POINTS)
    losses = np.linspace(5.0, 1.0, MIN_POINTS)
    assert SUGGESTION_RULES[rule](lrs[:-1], losses[:-1]).lr is None
    assert SUGGESTION_RULES[rule](lrs, losses).lr is not None


# --- inputs and results ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lrs", "losses", "match"),
    [
        ([1e-3, 1e-2, 1e-1], [1.0, 2.0], "same length"),
        ([1e-3, 1e-2, 1e-1], [1.0, math.nan, 2.0], r"losses must be finite; losses\[1\]"),
        ([1e-3, math.inf, 1e-1], [1.0, 2.0, 3.0], r"lrs must be finite; lrs\[1\]"),
        ([1e-3, 1e-2, 1e-2], [1.0, 2.0, 3.0], r"strictly increasing; lrs\[1\]"),
        ([1e-2, 1e-3, 1e-1], [1.0, 2.0, 3.0], "strictly increasing"),
        ([0.0, 1e-2, 1e-1], [1.0, 2.0, 3.0], "positive"),
        ([-1e-3, 1e-2, 1e-1], [1.0, 2.0, 3.0], "positive"),
        ([[1e-3, 1e-2]], [[1.0, 2.0]], "1-D"),
    ],
)
@pytest.mark.parametrize("rule", list(SUGGESTION_RULES))
def test_bad_curves_raise(rule, lrs, losses, match):
    with pytest.raises(ValueError, match=match):
        SUGGESTION_RULES[rule](lrs, losses)


def test_suggest_rejects_an_unknown_method_and_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'valey'.*did you mean 'valley'.*steepest_gradient, valley, minimum"):
        suggest.suggest("valey", LADDER, np.linspace(2.0, 1.0, 50))
    with pytest.raises(ValueError, match="allowed: steepest_gradient, valley, minimum"):
        suggest.suggest("fastest", LADDER, np.linspace(2.0, 1.0, 50))


def test_suggest_and_suggest_all_dispatch_to_the_rules():
    lrs = np.geomspace(1e-6, 1.0, 100)
    losses = drop_then_climb(lrs, 1e-3)
    every = suggest_all(lrs, losses)
    assert list(every) == ["steepest_gradient", "valley", "minimum"]
    for name, rule in SUGGESTION_RULES.items():
        assert suggest.suggest(name, lrs, losses) == rule(lrs, losses) == every[name]
    assert len({s.lr for s in every.values()}) == 3


def test_every_rule_has_one_signature():
    expected = inspect.signature(steepest_gradient)
    assert list(expected.parameters) == ["lrs", "losses"]
    for rule in SUGGESTION_RULES.values():
        assert inspect.signature(rule) == expected


@pytest.mark.parametrize("rule", list(SUGGESTION_RULES))
def test_lists_and_arrays_give_the_same_plain_python_result(rule):
    lrs = np.geomspace(1e-6, 1.0, 100)
    losses = drop_then_climb(lrs, 1e-3)
    from_arrays = SUGGESTION_RULES[rule](lrs, losses)
    from_lists = SUGGESTION_RULES[rule](lrs.tolist(), losses.tolist())
    assert from_arrays == from_lists
    assert type(from_arrays.lr) is float and type(from_arrays.index) is int


@pytest.mark.parametrize(
    ("lr", "index", "reason"),
    [(1e-3, None, None), (None, 3, "why"), (1e-3, 3, "why"), (None, None, None)],
)
def test_a_suggestion_is_either_an_lr_or_a_reason(lr, index, reason):
    with pytest.raises(ValueError, match="either lr and index"):
        Suggestion(lr=lr, index=index, reason=reason)

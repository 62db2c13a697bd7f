"""The other finders' own test cases, ported: what their users expect of a suggestion, asked of distlr.

One test per finding (issue 20): Lightning's too-few-finite-points case, the peers' calling
convention ``rule(lrs, losses)``, a linear ladder, and Lightning's Adam and Adagrad runs of its
small ``BoringModel`` (``tests/tests_pytorch/tuner/test_lr_finder.py``). Pure numpy except the
last, a few tiny range tests on CPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distlr import LRFinder, NoSuggestionError, find_optimal_lr
from distlr.core.analysis import build_result
from distlr.core.curve import Curve
from distlr.core.history import History
from distlr.core.ladder import lr_ladder
from distlr.core.options import RangeTestArgs
from distlr.core.rules import MIN_POINTS, SUGGESTION_RULES, peak, steepest_gradient, wsd_plateau
from distlr.core.smoothing import LossTracker

NAN, INF = math.nan, math.inf


def drop_then_climb(lrs: np.ndarray, centre: float, climb_after: float = 1.0) -> np.ndarray:
    """A loss falling from 2 to 1 around ``centre``, climbing ``climb_after`` decades past it."""
    x = np.log10(lrs) - math.log10(centre)
    return 1.0 + 1.0 / (1.0 + np.exp(x / 0.3)) + 3.0 * np.clip(x - climb_after, 0.0, None) ** 2


def recorded(lrs: np.ndarray, losses: np.ndarray) -> History:
    """What the range test records for these losses: the EMA, and the stop when it diverges."""
    tracker, history = LossTracker(smooth_factor=0.98, divergence_threshold=4.0), History()
    for step, (lr, loss) in enumerate(zip(lrs.tolist(), losses.tolist())):
        history.lrs.append(lr)
        history.losses.append(loss)
        stop = tracker.update(loss)
        history.smoothed.append(tracker.smoothed[-1])
        if stop:
            history.stop_reason, history.diverged_at = "diverged", step
            break
    return history


# --- Lightning: "not enough points" is a clear no-answer, with the counts ----------------------


@pytest.mark.parametrize("rule", list(SUGGESTION_RULES))
def test_too_few_finite_points_is_a_no_answer_that_counts_them(rule):
    # Lightning's test_suggestion_not_enough_finite_points: NaN and inf among the losses.
    losses = [NAN, 2.0, INF, 1.5, NAN, 1.2, 1.1, NAN]
    lrs = np.geomspace(1e-5, 1e-1, len(losses)).tolist()
    result = SUGGESTION_RULES[rule](lrs, losses)
    assert result.lr is None
    assert f"only 4 usable points (a suggestion needs at least {MIN_POINTS} with a finite loss)" in result.reason
    assert "4 of the 8 losses given are finite" in result.reason


def test_a_range_test_too_short_to_read_says_so_and_find_optimal_lr_raises_it(regression):
    # Lightning's test_lr_attribute_when_suggestion_invalid (num_training=1, suggestion None).
    model, loader = regression
    result = LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), device="cpu").find(
        min_lr=1e-4, max_lr=1e-2, num_steps=4, extend_range=False, progress=False)
    assert result.stop_reason == "completed" and result.optimal_lr is None
    assert result.suggestion_note.startswith("only 4 usable points (a suggestion needs at least 5")
    # It ran every step it was asked for: the reason is the step count, not a divergence.
    assert "diverged" not in result.suggestion_note and "raise num_steps" in result.suggestion_note
    with pytest.raises(NoSuggestionError, match="only 4 usable points"):
        find_optimal_lr(model, loader, criterion=nn.MSELoss(), device="cpu", min_lr=1e-4, max_lr=1e-2,
                        num_steps=4, extend_range=False, progress=False)


# --- every rule takes lrs and losses as the peers do --------------------------------------------


@pytest.mark.parametrize("rule", [*SUGGESTION_RULES.values(), peak, wsd_plateau], ids=lambda r: r.__name__)
def test_every_rule_takes_lrs_and_losses_as_lists_or_arrays(rule):
    lrs = np.geomspace(1e-7, 10.0, 100)
    losses = drop_then_climb(lrs, 1e-3)
    on_curve = rule(Curve.of(lrs, losses))
    assert on_curve.lr is not None
    assert rule(lrs.tolist(), losses.tolist()) == on_curve == rule(lrs, losses)
    # A step whose loss is missing (Lightning records NaN when training_step returns None) is
    # skipped, and the index still points into the lists given.
    holed = losses.copy()
    holed[[5, 12, 17]] = NAN
    found = rule(lrs.tolist(), holed.tolist())
    assert found.lr is not None and lrs[found.index] == found.lr


def test_the_lrs_themselves_are_passed_not_their_log10():
    lrs = np.geomspace(1e-7, 10.0, 100)
    with pytest.raises(ValueError, match=r"learning rates themselves.*look like log10\(lr\): pass 10 \*\* lrs"):
        steepest_gradient(np.log10(lrs), drop_then_climb(lrs, 1e-3))


# --- a linear ladder ---------------------------------------------------------------------------


def test_a_linear_ladder_never_answers_min_lr_for_a_target_inside_its_first_step():
    # 1e-8..1 in 100 linear steps (Lightning's default range in mode="linear"): 1e-8, then 0.0101.
    coarse = np.asarray(lr_ladder(1e-8, 1.0, 100, "linear"))
    result = steepest_gradient(coarse, drop_then_climb(coarse, 3e-3))
    # The turn-up is near 0.06, so the suggestion belongs near 0.005, where nothing was tried.
    assert result.lr is None
    assert "tried no lr near it: its ladder steps from lr=1e-08 to lr=0.0101" in result.reason
    assert "step_mode='exp'" in result.reason
    # A finer linear ladder answers, and where the exponential ladder does.
    fine = np.asarray(lr_ladder(1e-8, 0.1, 100, "linear"))
    exp = np.geomspace(1e-8, 0.1, 100)
    on_fine, on_exp = (steepest_gradient(lrs, drop_then_climb(lrs, 3e-3)).lr for lrs in (fine, exp))
    assert on_fine is not None and abs(math.log10(on_fine / on_exp)) < 0.15


@pytest.mark.parametrize("seed", range(8))
def test_a_noisy_linear_range_test_that_diverges_gets_a_suggestion_below_the_divergence(seed):
    # Batch-of-one noise (a chi-square loss) on a linear ladder: it reaches the LR that diverges
    # in ~15 points, too few to show the rise beyond the noise before the range test stops.
    lrs = np.asarray(lr_ladder(1e-8, 1.0, 100, "linear"))
    trend = 0.3 + 0.7 / (1.0 + lrs / 3e-3) + 0.3 * np.expm1(np.clip(lrs - 0.05, 0.0, None) / 0.04)
    history = recorded(lrs, trend * np.random.default_rng(seed + 3).chisquare(1, len(lrs)))
    assert history.stop_reason == "diverged" and history.diverged_at >= 14
    result = build_result(history, RangeTestArgs(min_lr=1e-8, max_lr=1.0, num_steps=100, step_mode="linear"))
    assert result.optimal_lr is not None, result.suggestion_note
    assert 5e-3 < result.optimal_lr < lrs[history.diverged_at] / 4


# --- Lightning's Adam and Adagrad runs of its BoringModel --------------------------------------


BEST_LR = {"Adam": 0.018, "Adagrad": 0.1}
"""The best constant LR for this task: lowest mean loss on fresh inputs after 128 steps (two
epochs of 64 batches of one), over 10**(k/4) from 1e-4 to 1 and three seeds. Adam: 0.106 at 0.018
(0.21 at 0.01, 0.17 at 0.032, 0.83 at 0.056); Adagrad: 0.18 at 0.1 (0.27 at 0.056, 0.26 at 0.18)."""


def boring_range_test(optimizer: str, step_mode: str, seed: int) -> float | None:
    """Lightning's BoringModel, Linear(32, 2) regressed onto ones from 64 random inputs in
    batches of one, through lr_find's defaults (1e-8..1, 100 steps, stop on divergence)."""
    torch.manual_seed(seed)
    model = nn.Linear(32, 2)
    loader = DataLoader(TensorDataset(torch.randn(64, 32), torch.ones(64, 2)), batch_size=1)
    opt = getattr(torch.optim, optimizer)(model.parameters(), lr=1e-2)
    result = LRFinder(model, loader, opt, nn.MSELoss(), device="cpu").find(
        min_lr=1e-8, max_lr=1.0, num_steps=100, step_mode=step_mode, progress=False)
    return result.optimal_lr


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("optimizer", ["Adam", "Adagrad"])
def test_lightnings_adam_and_adagrad_boring_runs_get_a_sound_suggestion(optimizer, seed):
    # Lightning's test_call_to_trainer_method: lr_find(mode="linear"), then the default exponential.
    # Linear, the noisy loss diverges within ~30 steps (Adam) before its rise stands out of the noise.
    linear, exp = (boring_range_test(optimizer, mode, seed) for mode in ("linear", "exp"))
    assert linear is not None and exp is not None
    for lr in (linear, exp):
        assert abs(math.log10(lr / BEST_LR[optimizer])) <= 0.5, (optimizer, linear, exp)

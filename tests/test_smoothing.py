import math

import pytest

from distlr.core.smoothing import LossTracker


def smooth(losses: list[float], smooth_factor: float) -> list[float]:
    tracker = LossTracker(smooth_factor=smooth_factor, divergence_threshold=math.inf)
    for loss in losses:
        tracker.update(loss)
    return tracker.smoothed


def test_smoothing_is_the_bias_corrected_ema():
    losses = [4.0, 2.0, 3.0, 1.0]
    beta, avg, expected = 0.9, 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        expected.append(avg / (1 - beta**i))
    assert smooth(losses, 0.9) == pytest.approx(expected, rel=1e-12)
    # Bias correction: the first smoothed point is the first loss, not 10 % of it.
    assert smooth(losses, 0.98)[0] == pytest.approx(4.0)


def test_zero_smooth_factor_disables_smoothing():
    losses = [3.0, 1.0, 2.0]
    assert smooth(losses, 0.0) == losses


def test_divergence_fires_on_the_first_step_above_threshold_times_best():
    tracker = LossTracker(smooth_factor=0.0, divergence_threshold=4.0)
    flags = [tracker.update(x) for x in [3.0, 3.0, 3.0, 3.0, 2.0, 1.0, 3.9, 4.0, 4.01]]
    assert flags == [False] * 8 + [True]
    assert tracker.best == 1.0


def test_the_first_batches_cannot_stop_the_sweep_a_nan_can():
    # A fine-tuned model's batches: 0.05, then 1.5. Against its first batch that is 30x; the
    # best is taken, and the rule applied, only from the fifth step on (WARMUP_STEPS).
    tracker = LossTracker(smooth_factor=0.0, divergence_threshold=4.0)
    assert [tracker.update(x) for x in [0.05, 1.5, 1.2, 0.9, 1.1, 1.0]] == [False] * 6
    assert tracker.best == 1.0
    assert LossTracker(smooth_factor=0.0, divergence_threshold=4.0).update(math.nan) is True


def test_non_finite_loss_diverges_and_is_recorded_as_nan():
    tracker = LossTracker(smooth_factor=0.5, divergence_threshold=4.0)
    assert tracker.update(1.0) is False
    assert tracker.update(math.nan) is True
    assert math.isnan(tracker.smoothed[-1])
    assert LossTracker(smooth_factor=0.0, divergence_threshold=4.0).update(math.inf) is True


def test_negative_losses_do_not_stop_the_sweep_at_once():
    tracker = LossTracker(smooth_factor=0.0, divergence_threshold=4.0)
    assert [tracker.update(x) for x in [-1.0, -1.0, -1.0, -1.0, -2.0, -1.5, -0.5]] == [False] * 7
    # rose by more than (4 - 1) x |best| = 6 above the best of -2
    assert tracker.update(4.5) is True


def test_infinite_threshold_never_stops_on_a_finite_loss():
    tracker = LossTracker(smooth_factor=0.0, divergence_threshold=math.inf)
    assert not any(tracker.update(x) for x in [1.0, 1e6, 1e30])

"""Does the LR transfer across widths? The verdict and the prediction of a width series, on
simulated suggestions whose truth is known: a flat LR must be called "moves" about 1 time in
20 (the test's level), a clear slope must be found, one run per width must not be called
"transfers", and the prediction's interval must hold the true LR at its level, also when the
series could not tell a slope from flat."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distlr.core.scaling import t_quantile
from distlr.core.series import LEVEL, predict, seed_spread, width_transfer

NOISE = 0.3
"""Standard deviation of ln lr between runs: the seed spread of the small MLPs in
tests/test_series_axes.py was 0.1 to 0.4 with one outlier."""


def simulate(widths: list[int], repeats: int, alpha: float, seed: int) -> tuple[list[int], list[float]]:
    rng = np.random.default_rng(seed)
    points = [w for w in widths for _ in range(repeats)]
    return points, [1e-2 * (w / 256) ** alpha * math.exp(NOISE * rng.standard_normal()) for w in points]


def verdicts(widths: list[int], repeats: int, alpha: float, trials: int = 600) -> dict[str, float]:
    counts: dict[str, int] = {}
    for seed in range(trials):
        verdict = width_transfer(*simulate(widths, repeats, alpha, seed))["verdict"]
        counts[verdict] = counts.get(verdict, 0) + 1
    return {k: v / trials for k, v in counts.items()}


def test_a_flat_lr_is_called_moves_at_about_the_tests_level_and_transfers_otherwise():
    share = verdicts([64, 256, 1024], 2, alpha=0.0)
    assert 0.02 <= share.get("moves", 0) <= 0.09  # 1 - LEVEL = 0.05, within 600 trials' noise
    assert share["transfers"] == pytest.approx(1 - share.get("moves", 0))


def test_one_run_per_width_never_claims_the_lr_transfers():
    """Three points on a line leave one degree of freedom and no seed spread: a flat-looking
    line proves nothing (the 2-standard-error rule called 31 % of these "moves")."""
    share = verdicts([64, 256, 1024], 1, alpha=0.0)
    assert "transfers" not in share
    assert share.get("moves", 0) <= 0.09


def test_a_slope_of_minus_a_half_is_found_over_a_16_fold_range_with_repeats():
    share = verdicts([64, 256, 1024], 2, alpha=-0.5)
    assert share["moves"] >= 0.85


def test_the_prediction_holds_the_true_lr_at_its_level_whatever_the_verdict():
    for widths, repeats, alpha in (([64, 256, 1024], 2, 0.0), ([64, 256, 1024], 2, -0.5),
                                   ([256, 512, 1024], 3, -0.5), ([64, 256, 1024], 1, -1.0)):
        held = 0
        for seed in range(400):
            points, lrs = simulate(widths, repeats, alpha, seed)
            flat = width_transfer(points, lrs)["verdict"] == "transfers"
            p = predict(points, lrs, 4096, flat=flat)
            held += p["lr_low"] <= 1e-2 * 16 ** alpha <= p["lr_high"]
        assert held / 400 >= LEVEL - 0.04, (widths, repeats, alpha, held)


def test_a_series_that_transfers_predicts_its_own_lr_with_a_band_the_slope_could_reach():
    points, lrs = [64, 64, 256, 256, 1024, 1024], [1e-2, 1.2e-2, 1.1e-2, 0.9e-2, 1e-2, 1.15e-2]
    transfer = width_transfer(points, lrs)
    assert transfer["verdict"] == "transfers"
    assert transfer["exponent_low"] < 0 < transfer["exponent_high"]
    assert "within the seed spread" in transfer["sentence"] and "at most ×" in transfer["sentence"]
    p = predict(points, lrs, 4096, flat=True)
    assert p["law"] == "flat" and p["extrapolation"]
    assert p["lr"] == pytest.approx(math.exp(np.mean(np.log(lrs))))
    power = predict(points, lrs, 4096)
    assert p["lr_low"] <= power["lr_low"] and p["lr_high"] >= power["lr_high"]


def test_the_seed_spread_is_pooled_over_widths_and_absent_without_repeats():
    s, dof = seed_spread([64, 64, 64, 256, 256], [1e-3, 1e-3, 1e-3, 1e-2, 4e-2])
    assert dof == 3 and s == pytest.approx(math.sqrt(math.log(4) ** 2 / 2 / 3))
    assert seed_spread([64, 256, 1024], [1e-3, 1e-3, 1e-3]) is None
    assert width_transfer([64, 256, 1024], [1e-3, 1e-3, 1e-3])["verdict"] == "cannot_tell"


def test_the_t_quantiles_match_published_tables():
    # Student's t, two-sided 95 %: 12.706 (1), 4.303 (2), 2.776 (4), 2.228 (10), 1.960 (infinity).
    for dof, table in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (100_000, 1.960)):
        assert t_quantile(0.95, dof) == pytest.approx(table, abs=2e-3)

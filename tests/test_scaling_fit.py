"""Where the batch-size law bends (``fit_saturating``): synthetic suggestions with log-normal noise,
3 repeats at each of 16 to 4,096 doubling, as a series of range tests gives them. A bend is
recovered inside its interval over many seeds, a law still rising is ``no_bend`` with a lower
bound near the largest size, a flat LR is ``flat``, and too little data says ``cannot_tell``."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from distlr.core.scaling import _f_quantile, _f_sf, fit_power_law, fit_saturating

SIZES = [16 * 2 ** k for k in range(9)]  # 16 to 4,096, doubling
SEEDS = range(50)


def suggestions(seed: int, *, bend: float, slope: float, sigma: float = 0.15, repeats: int = 3,
                sizes: list[int] = SIZES) -> tuple[list[int], list[float]]:
    """``1e-3 * (min(B, bend) / 16) ** slope`` times log-normal noise of ``sigma`` (in ln), one LR a run."""
    rng = np.random.default_rng(seed)
    batch = [b for b in sizes for _ in range(repeats)]
    lrs = [1e-3 * (min(b, bend) / 16) ** slope * math.exp(rng.normal(0, sigma)) for b in batch]
    return batch, lrs


def test_a_known_bend_is_recovered_inside_an_interval_that_covers_it_at_about_its_level():
    fits = [fit_saturating(*suggestions(seed, bend=512, slope=1.0)) for seed in SEEDS]
    assert {f.verdict for f in fits} == {"bends"}
    assert all(f.p_no_bend < 0.05 and f.p_flat < 0.05 for f in fits)  # the bend beats both simpler laws
    covered = sum(f.bend_low <= 512 <= f.bend_high for f in fits) / len(fits)
    assert covered >= 0.88  # 95% intervals; 0.94 measured over these seeds and over 200
    assert max(f.bend_high / f.bend_low for f in fits) < 4  # located, not just detected (1.4x typical)
    assert statistics.median(abs(math.log(f.bend / 512)) for f in fits) < 0.1
    assert sum(abs(f.exponent - 1.0) < 3 * f.exponent_stderr for f in fits) >= 0.9 * len(fits)
    assert statistics.median(f.plateau_lr for f in fits) == pytest.approx(1e-3 * 32, rel=0.05)


@pytest.mark.parametrize("slope", [None, 1.0])
def test_a_bend_between_sizes_is_found_from_suggestions_on_a_ladder_with_ties(slope):
    fits = []
    for seed in SEEDS:
        batch, lrs = suggestions(seed, bend=700, slope=1.0)
        on_ladder = [10 ** (round(math.log10(lr) * 20) / 20) for lr in lrs]  # 20 LRs a decade: many ties
        fits.append(fit_saturating(batch, on_ladder, slope=slope))
    assert {f.verdict for f in fits} == {"bends"} and max(f.bend_high / f.bend_low for f in fits) < 2
    assert sum(f.bend_low <= 700 <= f.bend_high for f in fits) >= 0.88 * len(fits)  # 0.94, 0.965 over 200 seeds


def test_a_given_slope_is_reported_as_given():
    given = fit_saturating(*suggestions(0, bend=700, slope=1.0), slope=1.0)
    assert given.exponent == 1.0 and given.exponent_stderr is None and given.slope == 1.0
    assert "±" not in given.describe() and "B^1.00," in given.describe()


def test_noise_free_suggestions_pin_the_bend_exactly():
    batch, lrs = suggestions(0, bend=700, slope=1.0, sigma=0.0)
    fit = fit_saturating(batch, lrs)
    assert fit.verdict == "bends" and fit.bend == pytest.approx(700) and fit.exponent == pytest.approx(1.0)
    assert fit.bend_low == pytest.approx(700) and fit.bend_high == pytest.approx(700) and fit.p_no_bend == 0.0
    assert fit.describe().startswith("the LR stops rising near B=700 (700 to 700); below it lr ∝ B^1.00±0.00")


def test_a_law_still_rising_at_the_largest_size_has_no_bend_and_a_lower_bound_near_it():
    fits = [fit_saturating(*suggestions(seed, bend=math.inf, slope=0.5)) for seed in SEEDS]
    rising = [f for f in fits if f.verdict == "no_bend"]
    assert len(rising) >= 0.9 * len(fits)  # a false bend at 5% or less: 3% measured over 200 seeds
    assert all(f.bend is None and f.bend_high is None and f.p_no_bend >= 0.05 for f in rising)
    assert min(f.bend_low for f in rising) >= 4096 / 4
    assert statistics.median(f.bend_low for f in rising) >= 4096 / 2
    assert all(abs(f.exponent - 0.5) < 3 * f.exponent_stderr for f in rising)
    batch, lrs = suggestions(0, bend=math.inf, slope=0.5)
    assert fit_saturating(batch, lrs).exponent == fit_power_law(batch, lrs).exponent  # the plain law's own
    assert fit_saturating(batch, lrs).describe().startswith("the LR still rises at B=4,096: no bend below B=")


@pytest.mark.parametrize("slope", [None, 0.5])
def test_a_flat_lr_is_flat_with_an_upper_bound_on_the_bend(slope):
    fits = [fit_saturating(*suggestions(seed, bend=16, slope=1.0), slope=slope) for seed in SEEDS]
    flat = [f for f in fits if f.verdict == "flat"]
    assert len(flat) >= 0.9 * len(fits)
    assert all(f.bend is None and f.bend_low is None and f.bend_high <= 64 for f in flat)
    assert all(f.plateau_lr == pytest.approx(1e-3, rel=0.1) and f.p_flat >= 0.05 for f in flat)
    assert "a rise as steep as B^0.5 stops by B=" in flat[0].describe()


def test_two_sizes_too_few_points_or_heavy_noise_cannot_tell_and_say_what_is_needed():
    assert fit_saturating([64] * 3, [1e-3, 2e-3, 3e-3]) is None  # as fit_power_law: no slope at all
    two = fit_saturating([16, 16, 32, 32], [1e-3, 1.1e-3, 2e-3, 2.1e-3])
    assert two.verdict == "cannot_tell" and "3 or more" in two.reason and two.exponent == pytest.approx(0.96, abs=0.01)
    three = fit_saturating([16, 32, 64], [1e-3, 2e-3, 2e-3])
    assert three.verdict == "cannot_tell" and "repeats" in three.reason and three.p_no_bend is None
    # The demo's case: 3 sizes x 2 repeats whose suggestions disagree by up to 10x.
    noisy = [fit_saturating(*suggestions(seed, bend=math.inf, slope=0.5, sigma=1.2, repeats=2, sizes=SIZES[:3]))
             for seed in SEEDS]
    unsure = [f for f in noisy if f.verdict == "cannot_tell"]
    assert len(unsure) >= 0.8 * len(noisy) and sum(f.verdict == "bends" for f in noisy) <= 2
    assert all(f.bend is None and f.bend_low is None and f.bend_high is None for f in unsure)
    assert all("more repeats" in f.reason and f.describe().startswith("cannot tell") for f in unsure)


def test_runs_without_an_lr_are_left_out_and_every_repeat_is_a_point():
    batch, lrs = suggestions(3, bend=512, slope=1.0)
    gappy = fit_saturating(batch + [16, 512, 4096, 64, 128], lrs + [None, math.nan, math.inf, 0.0, -1e-3])
    assert gappy == fit_saturating(batch, lrs) and gappy.points == 27 and gappy.sizes == 9


def test_every_verdict_is_json_safe():
    cases = [suggestions(0, bend=512, slope=1.0), suggestions(0, bend=math.inf, slope=0.5),
             suggestions(0, bend=16, slope=1.0), suggestions(0, bend=700, slope=1.0, sigma=0.0),
             ([16, 32], [1e-3, 2e-3]), ([16, 32, 64], [1e-3, 2e-3, 2e-3])]
    verdicts = set()
    for batch, lrs in cases:
        d = fit_saturating(batch, lrs).to_dict()
        assert json.loads(json.dumps(d, allow_nan=False)) == d
        verdicts.add(d["verdict"])
    assert verdicts == {"bends", "no_bend", "flat", "cannot_tell"}


def test_the_f_distribution_behind_the_tests_matches_published_tables():
    for dof, table in [(1, 161.45), (2, 18.51), (5, 6.61), (24, 4.26), (120, 3.92)]:
        assert _f_quantile(0.95, 1, dof) == pytest.approx(table, abs=0.01)
    assert _f_sf(3.40, 2, 24) == pytest.approx(0.05, abs=0.001) and _f_sf(0.0, 1, 5) == 1.0


@pytest.mark.parametrize("kwargs, match", [(dict(slope=0), "slope=0"), (dict(slope=True), "slope=True"),
                                           (dict(slope=math.nan), "slope=nan")])
def test_a_bad_slope_or_mismatched_lengths_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_saturating([16, 32, 64], [1e-3, 2e-3, 4e-3], **kwargs)
    with pytest.raises(ValueError, match="batch_sizes has 3 values and lrs 2"):
        fit_saturating([16, 32, 64], [1e-3, 2e-3])

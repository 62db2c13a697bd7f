import math

import pytest

from distlr.ladder import lr_ladder


@pytest.mark.parametrize("n", [2, 3, 100, 1000])
def test_exponential_ladder_starts_and_ends_exactly_with_a_constant_ratio(n):
    lrs = lr_ladder(1e-8, 1e-1, n)
    assert len(lrs) == n and lrs[0] == 1e-8 and lrs[-1] == 1e-1
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    expected = (1e-1 / 1e-8) ** (1 / (n - 1))
    assert all(math.isclose(r, expected, rel_tol=1e-9) for r in ratios)


def test_linear_ladder_has_constant_steps():
    lrs = lr_ladder(0.01, 0.1, 10, "linear")
    assert lrs[0] == 0.01 and lrs[-1] == 0.1
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(math.isclose(s, 0.01, rel_tol=1e-9) for s in steps)


def test_exponential_ladder_is_even_in_log10():
    assert lr_ladder(1e-4, 1e-1, 4) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1], rel=1e-12)


@pytest.mark.parametrize(
    "args, match",
    [((0.0, 1.0, 10), "min_lr"), ((1.0, 0.5, 10), "greater than min_lr"), ((1e-3, 1.0, 1), "num_steps"),
     ((1e-3, math.inf, 10), "finite")],
)
def test_bad_ladder_arguments_raise(args, match):
    with pytest.raises(ValueError, match=match):
        lr_ladder(*args)


def test_unknown_step_mode_raises():
    with pytest.raises(ValueError, match="step_mode='cosine'"):
        lr_ladder(1e-3, 1.0, 10, "cosine")

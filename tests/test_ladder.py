import math

import pytest

from distlr.core.ladder import lr_ladder


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


def test_the_ladder_goes_on_past_max_lr_at_the_same_spacing():
    from distlr.core.ladder import Ladder

    exp = Ladder(1e-8, 1e-1, 100)
    assert exp.lr(99) == 1e-1 and exp.lr(0) == 1e-8
    ratio = exp.lr(99) / exp.lr(98)
    assert exp.lr(100) / exp.lr(99) == pytest.approx(ratio, rel=1e-12)
    assert exp.lr(142) / exp.lr(141) == pytest.approx(ratio, rel=1e-12)
    linear = Ladder(0.01, 0.1, 10, "linear")
    assert linear.lr(10) - linear.lr(9) == pytest.approx(0.01)


@pytest.mark.parametrize(("args", "cap"), [
    ((1e-8, 1e-1, 100), 42),       # 0.0707 decades a step: 3 decades in 42 steps
    ((1e-7, 10.0, 100), 37),
    ((1e-4, 1e-1, 4), 3),          # 1 decade a step, up to 1000 x max_lr
    ((1e-8, 1e-7, 10), 10),        # a fine ladder: never more than num_steps more
    ((0.01, 0.1, 10, "linear"), 10),
])
def test_an_extended_range_ends_at_1000_times_max_lr_or_num_steps_more(args, cap):
    from distlr.core.ladder import EXTENSION_FACTOR, Ladder

    ladder = Ladder(*args)
    assert ladder.extension_cap == cap
    last = ladder.lr(ladder.num_steps - 1 + ladder.extension_cap)
    assert last <= EXTENSION_FACTOR * ladder.max_lr * (1 + 1e-9)

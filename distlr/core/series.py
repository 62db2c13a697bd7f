"""A series: several range tests in one job along one axis (the global batch size, the model's
width, or the range test's length), and what they say together: each point's spread over
repeats, the power law through the suggestions, where a batch law bends, whether a width
series transfers, and the LR predicted at a target. numpy and ``distlr.core.scaling`` only; no
torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from distlr.core.scaling import (PowerFit, SaturatingFit, Spread, fit_power_law, fit_saturating, spread, t_quantile,
                                 usable_pairs)

AXES = ("global_batch_size", "width", "num_steps")
"""What a series varies from run to run: the global batch, the model's width, the range test's length."""

LEVEL = 0.95
"""Confidence of every interval a series reports (the exponent, the prediction), and so the level
of the test behind a width series' verdict: the 95 % a reader expects beside a ± range."""

MAX_SERIES_STEPS = 1_000_000
"""The most steps a series may plan in all (its runs' ``num_steps`` summed). A series keeps every
run's whole curve and rewrites series.json after each run: about 60-100 bytes a point in memory and
85 in the JSON (measured on a 2,000-step range test), so 100 MB and 85 MB at this bound, and days of
training before it. A larger plan (``repeats`` in the millions) is a typo, and used to fill memory
with the plan itself before the first step."""


@dataclass
class SeriesRun:
    """One range test of a series: its global batch, how it was split, its data seed, its result."""

    global_batch_size: int
    repeat: int
    seed: int
    micro_batch_size: int
    accumulation_steps: int
    result: Any
    """The run's ``LRFinderResult``."""
    width: int | None = None
    """The model's width, in a width series."""

    def to_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k != "result"}
        return {**fields, "result": self.result.to_dict()}


@dataclass
class SeriesResult:
    """Every run of a series, each point's spread over repeats, and the power-law fit of the
    suggestion against the series' axis (global batch size, width or num_steps)."""

    runs: list[SeriesRun]
    world_size: int
    target_global_batch_size: int | None = None
    planned: int | None = None
    """How many runs the series was to make (None: as many as it holds)."""
    axis: str = "global_batch_size"
    """What varies between runs (``AXES``)."""
    target: int | None = None
    """The axis value to predict the LR at (``target_global_batch_size`` for a batch series)."""

    def __post_init__(self) -> None:
        if self.axis == "global_batch_size" and self.target is None:
            self.target = self.target_global_batch_size

    @property
    def complete(self) -> bool:
        """Whether every planned run finished (False for a series interrupted part way)."""
        return self.planned is None or len(self.runs) >= self.planned

    def values(self) -> list[int]:
        """Each run's value on the axis."""
        if self.axis == "width":
            return [int(r.width) for r in self.runs]
        if self.axis == "num_steps":
            return [int(r.result.num_steps) for r in self.runs]
        return [r.global_batch_size for r in self.runs]

    def _lrs(self) -> list[float | None]:
        return [r.result.optimal_lr for r in self.runs]

    @property
    def fit(self) -> PowerFit | None:
        """``lr = coefficient * value ** exponent`` through every run's suggestion."""
        return fit_power_law(self.values(), self._lrs())

    def spreads(self) -> dict[int, Spread]:
        """Each value's suggestions over its repeats: geometric mean, min and max."""
        values, lrs = self.values(), self._lrs()
        return {v: spread([lr for x, lr in zip(values, lrs) if x == v]) for v in sorted(set(values))}

    @property
    def bend(self) -> SaturatingFit | None:
        """For a batch series: where the LR stops rising with B (``fit_saturating``); None for
        other axes and with fewer than two sizes that gave a suggestion."""
        if self.axis != "global_batch_size":
            return None
        return fit_saturating(self.values(), self._lrs())

    def transfer(self) -> dict[str, Any] | None:
        """For a width series: does the LR transfer across widths (as muP promises)? None for
        other axes. See ``width_transfer``."""
        if self.axis != "width":
            return None
        return width_transfer(self.values(), self._lrs())

    def prediction(self) -> dict[str, Any] | None:
        """The LR at ``target`` with its ``LEVEL`` interval, marked when the target lies outside
        the values that gave a suggestion. A width series whose LR transfers predicts the same LR
        at any width (the geometric mean of its suggestions); otherwise it is the power law's."""
        if self.target is None:
            return None
        transfers = self.axis == "width" and (self.transfer() or {}).get("verdict") == "transfers"
        found = predict(self.values(), self._lrs(), self.target, flat=transfers)
        if found is None:
            return None
        return {"axis": self.axis, "value": self.target, self.axis: self.target, **found}

    def to_dict(self) -> dict[str, Any]:
        fit, bend = self.fit, self.bend
        return {"axis": self.axis, "world_size": self.world_size, "complete": self.complete,
                "runs_planned": len(self.runs) if self.planned is None else self.planned,
                "values": sorted(set(self.values())),
                "runs": [r.to_dict() for r in self.runs],
                "fit": None if fit is None else fit.to_dict(),
                "bend": None if bend is None else bend.to_dict(),
                "transfer": self.transfer(),
                "spread": {str(v): s.to_dict() for v, s in self.spreads().items()},
                "prediction": self.prediction()}


def _log_points(values: Sequence[float], lrs: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """``(ln value, ln lr)`` of every run with a suggestion."""
    pairs = usable_pairs(values, lrs)
    return np.log([v for v, _ in pairs]).astype(float), np.log([lr for _, lr in pairs]).astype(float)


def seed_spread(values: Sequence[float], lrs: Sequence[float | None]) -> tuple[float, int] | None:
    """The spread of the suggestion between repeats at one value, pooled over the values: the
    standard deviation of ln lr about each value's own mean, and its degrees of freedom (runs
    minus values). None when no value has two suggestions (nothing measures it).

    Example:
        >>> s, dof = seed_spread([64, 64, 256, 256], [1e-3, 2e-3, 4e-4, 8e-4])
        >>> round(math.exp(s), 3), dof
        (1.633, 2)
    """
    x, y = _log_points(values, lrs)
    groups = [y[x == v] for v in np.unique(x)]
    dof = sum(len(g) - 1 for g in groups)
    if dof == 0:
        return None
    return math.sqrt(sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / dof), dof


def width_transfer(widths: Sequence[int], lrs: Sequence[float | None]) -> dict[str, Any]:
    """Whether the suggestion is flat across widths within the spread the runs themselves show.

    The fit ``ln lr = c + alpha ln width`` over every run gives alpha, its standard error and its
    ``LEVEL`` interval (Student's t on the runs' scatter about the line, which holds the seed
    spread). The verdict:

    - ``moves``: the interval excludes 0, so the LR moves as ``width^alpha`` beyond the spread;
    - ``transfers``: it holds 0 and repeats measured the seed spread; ``largest_move`` says how
      far the LR could still move over the widths run (the interval's steeper end), which is
      what this series can rule out;
    - ``cannot_tell``: fewer than 3 suggestions over 2 widths, or no width with two suggestions
      (one run per width leaves the seed spread unmeasured, so a flat-looking line proves
      nothing).

    Returns:
        A dict: ``verdict``, ``exponent``, ``exponent_stderr``, ``exponent_low``/``high``,
        ``dof``, ``t`` (alpha over its standard error), ``seed_spread`` (a factor: the typical
        ratio of one run's LR to its width's geometric mean, None unmeasured), ``largest_move``,
        ``sentence``.

    Example:
        >>> flat = width_transfer([64, 64, 256, 256, 1024, 1024], [1e-2, 1.2e-2, 1.1e-2, 0.9e-2, 1e-2, 1.15e-2])
        >>> flat["verdict"], round(flat["exponent"], 3)
        ('transfers', -0.008)
        >>> width_transfer([64, 64, 256, 256, 1024, 1024], [4e-2, 4.4e-2, 1e-2, 1.1e-2, 2.5e-3, 2.6e-3])["verdict"]
        'moves'
    """
    fit = fit_power_law(widths, lrs)
    x, y = _log_points(widths, lrs)
    noise = seed_spread(widths, lrs)
    empty = {"exponent": None if fit is None else fit.exponent, "exponent_stderr": None, "exponent_low": None,
             "exponent_high": None, "dof": None, "t": None,
             "seed_spread": None if noise is None else math.exp(noise[0]), "largest_move": None}
    if fit is None or fit.exponent_stderr is None:
        return {"verdict": "cannot_tell", **empty,
                "sentence": "cannot tell: needs suggestions from 3 or more runs over 2 or more widths"}
    dof = len(x) - 2
    half = t_quantile(LEVEL, dof) * fit.exponent_stderr
    low, high = fit.exponent - half, fit.exponent + half
    t = fit.exponent / fit.exponent_stderr if fit.exponent_stderr > 0 else math.copysign(math.inf, fit.exponent)
    span = float(x.max() - x.min())
    largest_move = math.exp(max(abs(low), abs(high)) * span)
    stats = {**empty, "exponent_stderr": fit.exponent_stderr, "exponent_low": low, "exponent_high": high, "dof": dof,
             "t": t if math.isfinite(t) else None, "largest_move": largest_move}
    alpha = f"alpha = {fit.exponent:.2f} ± {fit.exponent_stderr:.2f} ({LEVEL:.0%}: {low:.2f} to {high:.2f})"
    if not low <= 0 <= high:
        return {"verdict": "moves", **stats,
                "sentence": f"the LR moves with width: lr ∝ width^alpha, {alpha}, {abs(t):.1f} standard errors from 0"}
    if noise is None:
        return {"verdict": "cannot_tell", **stats,
                "sentence": f"cannot tell: {alpha} holds 0, but with one run per width the seed spread is not "
                            "measured; run repeats=2 or more"}
    widths_run = f"{math.exp(x.min()):,.0f} to {math.exp(x.max()):,.0f}"
    return {"verdict": "transfers", **stats,
            "sentence": f"the LR transfers across widths: {alpha} holds 0, within the seed spread "
                        f"(×{math.exp(noise[0]):.2f} a run); from width {widths_run} it moves by at most "
                        f"×{largest_move:.2f}"}


def predict(values: Sequence[float], lrs: Sequence[float | None], target: float, *,
            flat: bool = False) -> dict[str, Any] | None:
    """The LR at ``target`` from the power law through the suggestions, with the ``LEVEL``
    confidence interval of that line there (Student's t; None with too few points to leave a
    residual), and whether ``target`` lies outside the values that gave a suggestion. None when
    fewer than two values gave a suggestion.

    ``flat`` (a width series that transfers): the LR is the suggestions' geometric mean, the same
    at every value, and the interval spans both that mean's and the power law's, so a slope the
    series could not rule out still shows in it. On simulated series (widths 256, 512, 1024, 3
    repeats, 30 % noise a run, true slope -0.5, read as flat 1 time in 3) the interval held the
    true LR at width 4096 in 66 % of 2,000 series with the mean's own interval, 95 % spanned.

    Example:
        >>> p = predict([64, 64, 256, 256], [4e-2, 4.4e-2, 1e-2, 1.1e-2], 1024)
        >>> round(p["lr"], 5), p["extrapolation"], p["lr_low"] < p["lr"] < p["lr_high"]
        (0.00262, True, True)
    """
    fit = fit_power_law(values, lrs)
    if fit is None:
        return None
    x, y = _log_points(values, lrs)
    at = math.log(target)
    slope, intercept = fit.exponent, math.log(fit.coefficient)
    centre, low, high = float(intercept + slope * at), None, None
    if len(x) > 2:
        sigma = math.sqrt(float(((y - intercept - slope * x) ** 2).sum()) / (len(x) - 2))
        se = sigma * math.sqrt(1 / len(x) + (at - x.mean()) ** 2 / float(((x - x.mean()) ** 2).sum()))
        half = t_quantile(LEVEL, len(x) - 2) * se
        low, high = centre - half, centre + half
    if flat:
        centre = float(y.mean())
        half = t_quantile(LEVEL, len(x) - 1) * float(y.std(ddof=1)) / math.sqrt(len(x))
        if low is not None:
            low, high = min(low, centre - half), max(high, centre + half)
    return {"lr": math.exp(centre), "lr_low": None if low is None else math.exp(low),
            "lr_high": None if high is None else math.exp(high), "level": LEVEL,
            "law": "flat" if flat else "power",
            "extrapolation": not x.min() - 1e-9 <= at <= x.max() + 1e-9}


def check_series(global_batch_sizes: Sequence[Any] | None = None, widths: Sequence[Any] | None = None,
                 num_steps_series: Sequence[Any] | None = None, *, repeats: Any = 1,
                 target_global_batch_size: Any = None, target_width: Any = None, num_steps: int,
                 num_steps_given: bool = False, accumulation_steps: Any = None,
                 accumulation_given: bool = False) -> str:
    """The one check of a series' arguments (``LRFinder.series`` and the command line's); the
    axis they ask for.

    Args:
        num_steps: each run's length when ``num_steps_series`` does not set it.
        accumulation_steps: the accumulation asked for, to name in a refusal.
        num_steps_given, accumulation_given: whether the caller set ``num_steps`` or
            ``accumulation_steps``, which a horizon and a batch series decide themselves.

    Raises:
        ValueError: naming the argument, its value and what is allowed.
    """
    from distlr.core.options import MAX_NUM_STEPS, is_int

    given = [name for name, value in (("global_batch_sizes", global_batch_sizes), ("widths", widths),
                                      ("num_steps_series", num_steps_series)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)}: a series varies one thing at a time; run one series per axis")
    if accumulation_given and global_batch_sizes is not None:
        raise ValueError(f"accumulation_steps={accumulation_steps!r} with global_batch_sizes: each size's split into "
                         "micro-batch x ranks x accumulation decides the accumulation; leave accumulation_steps out")
    if num_steps_series is not None and num_steps_given:
        raise ValueError(f"num_steps={num_steps!r} with num_steps_series: each run's length is one of "
                         "num_steps_series; leave num_steps out")
    if not is_int(repeats) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is not allowed; use an int >= 1")
    if global_batch_sizes is not None:
        sizes = list(global_batch_sizes)
        if not sizes or any(not is_int(b) or b < 1 for b in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError(f"global_batch_sizes={sizes!r} is not allowed; use distinct ints >= 1 (16,32,64)")
    for name, values, least in (("widths", widths, 1), ("num_steps_series", num_steps_series, 2)):
        if values is None:
            continue
        items = list(values)
        if len(items) < 2 or any(not is_int(v) or v < least for v in items) or len(set(items)) != len(items):
            raise ValueError(f"{name}={items!r} is not allowed; use two or more distinct ints >= {least}")
        if name == "num_steps_series" and max(items) > MAX_NUM_STEPS:
            raise ValueError(f"num_steps_series: {max(items):,} is more than a range test can take "
                             f"(at most {MAX_NUM_STEPS:,})")
    lengths = list(num_steps_series) if num_steps_series is not None else \
        [num_steps] * len(global_batch_sizes if global_batch_sizes is not None else widths or [None])
    planned = repeats * sum(lengths) if all(is_int(n) for n in lengths) else 0  # a bad num_steps: find() names it
    if planned > MAX_SERIES_STEPS:
        raise ValueError(f"repeats={repeats:,} over {len(lengths)} point(s) of {', '.join(map(str, sorted(set(lengths))))} "
                         f"steps plans {planned:,} steps, more than a series keeps (at most {MAX_SERIES_STEPS:,} in "
                         "all: each run's curve stays in memory and in series.json); use fewer repeats or points")
    if target_global_batch_size is not None and (not is_int(target_global_batch_size) or target_global_batch_size < 1):
        raise ValueError(f"target_global_batch_size={target_global_batch_size!r} is not allowed; use an int >= 1")
    if target_global_batch_size is not None and len(set(global_batch_sizes or ())) < 2:
        raise ValueError(f"target_global_batch_size={target_global_batch_size!r} needs a fit of LR against batch "
                         "size, so two or more global_batch_sizes (e.g. --global-batch-sizes 16,32,64); "
                         f"got {'none' if not global_batch_sizes else list(global_batch_sizes)}")
    if target_width is not None and (widths is None or not is_int(target_width) or target_width < 1):
        raise ValueError(f"target_width={target_width!r} needs a width series (widths=..., --widths: two or more, "
                         "e.g. 256,512,1024) and must be an int >= 1")
    return "width" if widths is not None else "num_steps" if num_steps_series is not None else "global_batch_size"


SweepRun, SweepResult = SeriesRun, SeriesResult
"""Deprecated spellings of ``SeriesRun`` and ``SeriesResult``; they go in the next release."""

"""``LRFinderResult``: everything a range test found, identical on every rank, JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distlr.core.options import check_choice
from distlr.core.schedule import SCHEDULE_KINDS, WARMUP_FRACTION, LrShape, ScheduleKind, set_peak_lr

Which = Literal["constant", "peak", "wsd"]
"""Which of the result's learning rates: the constant LR, the one-cycle / cosine peak, the WSD plateau."""
SEARCH_BACKENDS = ("optuna", "ray")
SEARCH_WIDTH = 3.0
"""The least factor a search space reaches either side of the suggestion: the benchmark's median
seed-to-seed spread is 1.6x and the band's floor 2.25x, so 3x covers another range test's answer
and leaves the search room to find a better one."""

SCHEMA_VERSION = 5
"""1: the first release; 2: added peak_lr, confidence, range_notes, trend_losses, inputs,
provenance and schema_version; 3: added extended_steps, val_steps and val_losses; 4: ``inputs``
left the result for the command line's own key of result.json (``"cli"``); 5: ``schedule``
uses transformers 5's key names (``warmup_steps``, no ``warmup_ratio``) and ``schedule["wsd"]``
holds its torch, Hugging Face and DeepSpeed forms."""


@dataclass(repr=False)
class LRFinderResult:
    """The outcome of ``LRFinder.find()``.

    The first nine fields are the product's fixed ones (docs/api.md); the rest
    say why the run ended and how much to trust it. Losses are the global mean over all ranks, one per optimizer step.
    ``optimal_lr`` and ``best_lr_idx`` are None when no sound suggestion exists, and then
    ``suggestion_note`` says why.

    Example:
        >>> result = finder.find()                         # doctest: +SKIP
        >>> LRFinderResult.from_json(result.to_json()) == result   # doctest: +SKIP
        True
    """

    optimal_lr: float | None
    min_lr: float
    max_lr: float
    num_steps: int
    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    best_lr_idx: int | None
    suggestion_method: str
    # -- why and how it ran ------------------------------------------------------------------
    stop_reason: str = "completed"
    """Why the range test ended: "completed" (every step ran), "diverged" (the smoothed loss rose past
    the threshold) or "non_finite" (a loss was NaN/inf on some rank)."""
    diverged_at: int | None = None
    """Index of the step at which the loss diverged (it is the last recorded point), or None."""
    suggestion_note: str | None = None
    """Why there is no suggestion, when ``optimal_lr`` is None."""
    suggestions: dict[str, float | None] = field(default_factory=dict)
    """Every rule's suggestion, by name (None where that rule had no sound answer)."""
    trend_losses: list[float] = field(default_factory=list)
    """The zero-lag smoothing of ``losses`` that ``steepest_gradient`` reads (NaN past the usable
    points); ``smoothed_losses`` is the EMA the stop decision uses, which lags."""
    peak_lr: float | None = None
    """The peak LR for a one-cycle or warmup-cosine schedule (``optimal_lr`` is the constant LR)."""
    confidence: dict[str, float] | None = None
    """How far ``optimal_lr`` moves under the curve's own noise: ``low``/``high`` (10th/90th
    percentile of a bootstrap), ``spread`` (high / low), ``answered``, ``draws``."""
    range_notes: list[str] = field(default_factory=list)
    """What was wrong with the range tried (still falling at max_lr, diverged at once, ...)."""
    schedule: dict[str, Any] | None = None
    """A schedule whose peak is ``peak_lr``, in pasteable forms (see ``distlr.core.schedule``)."""
    step_mode: str = "exp"
    world_size: int = 1
    micro_batch_size: int | None = None
    """Samples per rank per micro-batch (the first batch's size)."""
    accumulation_steps: int = 1
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks, as measured (the median over the steps; a note
    says when it varied)."""
    elapsed_s: float = 0.0
    """Wall time of the range test, snapshot and restore included."""
    notes: list[str] = field(default_factory=list)
    """Things the user was told during the run (loader cycled, steps skipped, ...)."""
    zero_stage: int | None = None
    """The DeepSpeed ZeRO stage the range test ran under (None without DeepSpeed)."""
    deepspeed_config: dict[str, Any] | None = None
    """The user's DeepSpeed config with the suggested lr and a scheduler (ds_config.tuned.json)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Where the result came from: the versions of distlr, torch, transformers and deepspeed, the
    launcher and the world size."""
    extended_steps: int = 0
    """Steps run past ``max_lr`` because the loss had not turned up there (``extend_range``):
    the last ``extended_steps`` entries of ``lrs`` lie above ``max_lr``."""
    val_steps: list[int] = field(default_factory=list)
    """With a ``val_loader``: the step (index into ``lrs``) after which each validation loss was measured."""
    val_losses: list[float] = field(default_factory=list)
    """With a ``val_loader``: the validation loss (mean over all ranks) after each of ``val_steps``."""
    schema_version: int = SCHEMA_VERSION
    """The layout of this result's JSON; a reader of an older one gets its missing fields' defaults."""

    @property
    def steps_run(self) -> int:
        """How many points the curve has (fewer than ``num_steps`` when it stopped early)."""
        return len(self.losses)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; NaN and inf become null so any JSON parser reads the file."""
        return _finite_or_none(dataclasses.asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise to strict JSON (see ``to_dict``)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LRFinderResult:
        """Rebuild a result from ``to_dict()`` output; null losses come back as NaN."""
        known = {f.name for f in dataclasses.fields(cls)}
        # A result.json holds what the command line read beside the result; schema 2-3 kept it inside.
        data = {k: v for k, v in data.items() if k not in ("cli", "inputs")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LRFinderResult field(s) {unknown}; allowed: {sorted(known)}")
        data = dict(data)
        for key in ("losses", "smoothed_losses", "trend_losses", "val_losses"):
            if key not in data:
                continue
            data[key] = [math.nan if v is None else float(v) for v in data[key]]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> LRFinderResult:
        """Inverse of ``to_json`` (a JSON text; ``load`` reads a file)."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> LRFinderResult:
        """Read a ``result.json`` file (its ``"cli"`` key, what the command line read, is not part
        of the result).

        Example:
            >>> result = LRFinderResult.load("distlr-runs/20260101-120000/result.json")  # doctest: +SKIP
        """
        return cls.from_json(Path(path).read_text())

    # -- using the result ----------------------------------------------------------------------

    def lr_for(self, which: Which = "constant") -> float:
        """The learning rate for a schedule: ``"constant"`` (``optimal_lr``), ``"peak"`` (the
        one-cycle / warmup-cosine peak) or ``"wsd"`` (the warmup-stable-decay plateau).

        Raises:
            ValueError: an unknown ``which``, or a result without a suggestion (saying why).
        """
        check_choice("which", which, ("constant", "peak", "wsd"))
        value = {"constant": self.optimal_lr, "peak": self.peak_lr,
                 "wsd": (self.schedule or {}).get("wsd", {}).get("plateau_lr")}[which]
        if value is None:
            raise ValueError(f"this result has no {which} learning rate: {self.suggestion_note or 'no suggestion'}")
        return float(value)

    def apply(self, optimizer: Any, scheduler: Any | None = None, which: Which = "constant") -> float:
        """Set ``optimizer`` (and the ``scheduler`` already built on it) to ``lr_for(which)`` so
        that it sticks: each group's ``lr`` and ``initial_lr``, the scheduler's ``base_lrs`` (or
        OneCycleLR's ``max_lr``), with the ratios between param groups kept; the next
        ``scheduler.step()`` follows its own shape from the new LR. Returns that LR.

        Example:
            >>> scheduler = get_cosine_schedule_with_warmup(optimizer, 100, 10_000)  # doctest: +SKIP
            >>> result.apply(optimizer, scheduler, which="peak")                      # doctest: +SKIP
        """
        lr = self.lr_for(which)
        set_peak_lr(optimizer, scheduler, lr)
        return lr

    def make_scheduler(self, optimizer: Any, total_steps: int, kind: ScheduleKind = "warmup_cosine") -> Any:
        """A torch LR scheduler for ``optimizer`` built from ``schedule``: ``"onecycle"``
        (``OneCycleLR``, peak ``peak_lr``), ``"warmup_cosine"`` (peak ``peak_lr``) or ``"wsd"``
        (the plateau), over ``total_steps`` optimizer steps. Param-group ratios are kept.

        Raises:
            ValueError: an unknown ``kind``, a bad ``total_steps``, or no suggestion.
        """
        check_choice("kind", kind, SCHEDULE_KINDS)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 2:
            raise ValueError(f"total_steps={total_steps!r} is not allowed; allowed: an int >= 2 (your training "
                             "run's optimizer steps)")
        from torch.optim.lr_scheduler import LambdaLR, OneCycleLR  # the one torch import of core: on demand

        peaks = set_peak_lr(optimizer, None, self.lr_for("wsd" if kind == "wsd" else "peak"))
        schedule = self.schedule or {}
        warmup = round(total_steps * _warmup_fraction(schedule))
        if kind == "onecycle":
            cycle = schedule["one_cycle"]
            return OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps, pct_start=cycle["pct_start"],
                              div_factor=cycle["div_factor"], final_div_factor=cycle["final_div_factor"],
                              anneal_strategy="cos", cycle_momentum=False)
        if kind == "warmup_cosine":
            floor = schedule["warmup_cosine"]["min_lr"] / schedule["peak_lr"]
            return LambdaLR(optimizer, LrShape("warmup_cosine", total_steps, warmup, min_ratio=floor))
        wsd = schedule["wsd"]
        decay = max(1, round(total_steps * wsd["decay_fraction"]))
        return LambdaLR(optimizer, LrShape("wsd", total_steps, warmup, decay, wsd["min_lr_ratio"], wsd["decay_type"]))

    def search_space(self, kind: str = "optuna", *, low: float | None = None, high: float | None = None) -> Any:
        """A log-uniform learning-rate range around the suggestion, as the ``hp_space`` a Hugging
        Face ``Trainer.hyperparameter_search(backend=kind, hp_space=...)`` takes: ``"optuna"``
        (``trial.suggest_float(..., log=True)``) or ``"ray"`` (``tune.loguniform``). The range is
        the band (``confidence``) widened to the peak and to at least ``SEARCH_WIDTH`` either
        side of ``optimal_lr``; ``low``/``high`` override it. ``space.bounds`` holds the pair.

        Raises:
            ValueError: an unknown ``kind``, no suggestion, or ``low >= high``.
        """
        check_choice("kind", kind, SEARCH_BACKENDS)
        lr = self.lr_for("constant")
        band = self.confidence or {}
        lo = low if low is not None else min(lr / SEARCH_WIDTH, band.get("low") or lr)
        hi = high if high is not None else max(lr * SEARCH_WIDTH, band.get("high") or lr, self.peak_lr or lr)
        if not 0 < lo < hi:
            raise ValueError(f"search_space: low={lo!r} and high={hi!r}; allowed: 0 < low < high")
        return SearchSpace(kind, float(lo), float(hi))

    def summary(self, full: bool = False) -> str:
        """A few lines to read in a notebook (also the result's ``repr``): the suggestion, the
        schedule, the band, how the range test ended, the first note. ``full=True`` adds every
        rule's answer and every note (what the command line prints)."""
        lines = []
        if self.optimal_lr is not None:
            lines.append(f"suggested lr: {self.optimal_lr:.3e}  ({self.suggestion_method}; constant LR)")
            if self.peak_lr is not None:
                plateau = (self.schedule or {}).get("wsd", {}).get("plateau_lr")
                wsd = f"; warmup-stable-decay plateau {plateau:.3e}" if plateau is not None else ""
                lines.append(f"schedule:     one-cycle / warmup-cosine peak {self.peak_lr:.3e}{wsd}")
            if self.confidence is not None:
                band = self.confidence
                lines.append(f"band:         {band['low']:.2e} .. {band['high']:.2e} ({band['spread']:.1f}x): where "
                             "another range test (another data order) lands 4 times in 5; repeats=3 narrows it")
        else:
            lines.append(f"no suggestion ({self.suggestion_method}): {self.suggestion_note}")
        if full:
            lines.append("all rules:    " + ", ".join(f"{name} {lr:.2e}" if lr is not None else f"{name} -"
                                                      for name, lr in self.suggestions.items()))
        extended = f" and {self.extended_steps} past max_lr" if self.extended_steps else ""
        at = "-" if self.diverged_at is None else f"{self.diverged_at + 1} (lr {self.lrs[self.diverged_at]:.2e})"
        ended = {"completed": f"ran all {self.num_steps} steps{extended}",
                 "diverged": f"loss diverged at step {at}, stopped",
                 "non_finite": f"loss was not finite at step {at}, stopped"}.get(self.stop_reason, self.stop_reason)
        batch = f", global batch {self.global_batch_size}" if self.global_batch_size else ""
        lines.append(f"range test:   {ended}; {self.world_size} rank(s){batch}; {self.elapsed_s:.1f} s")
        notes = [*(f"range:        {n}" for n in self.range_notes), *(f"note:         {n}" for n in self.notes)]
        if full or len(notes) <= 1:
            lines.extend(notes)
        else:
            lines.append(f"{notes[0]} (+{len(notes) - 1} more: result.range_notes, result.notes)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"LRFinderResult(\n{self.summary()}\n)"

    def __eq__(self, other: object) -> bool:
        # NaN != NaN would make a diverged result unequal to its own round trip.
        if not isinstance(other, LRFinderResult):
            return NotImplemented
        return self.to_dict() == other.to_dict()


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _warmup_fraction(schedule: dict[str, Any]) -> float:
    """The warmup's share of training in ``schedule`` (its ``warmup_steps`` is a fraction, or
    steps of the ``total_steps`` it was made for)."""
    steps, total = schedule.get("warmup_cosine", {}).get("warmup_steps"), schedule.get("total_steps")
    if isinstance(steps, float) and 0 <= steps < 1:
        return steps
    if isinstance(steps, int) and total:
        return steps / total
    return WARMUP_FRACTION


@dataclass(frozen=True)
class SearchSpace:
    """``hp_space(trial)`` for ``Trainer.hyperparameter_search``: the learning rate, log-uniform
    over ``bounds``."""

    kind: str
    low: float
    high: float

    @property
    def bounds(self) -> tuple[float, float]:
        return self.low, self.high

    def __call__(self, trial: Any = None) -> dict[str, Any]:
        if self.kind == "optuna":
            return {"learning_rate": trial.suggest_float("learning_rate", self.low, self.high, log=True)}
        try:
            from ray import tune
        except ImportError:
            raise ImportError("search_space('ray') needs Ray Tune: pip install 'ray[tune]'") from None
        return {"learning_rate": tune.loguniform(self.low, self.high)}

"""``LRFinderResult``: everything a range test found, identical on every rank, JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 4
"""1: the first release; 2: added peak_lr, confidence, range_notes, trend_losses, inputs,
provenance and schema_version; 3: added extended_steps, val_steps and val_losses; 4: ``inputs``
left the result for the command line's own key of result.json (``"cli"``)."""


@dataclass
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

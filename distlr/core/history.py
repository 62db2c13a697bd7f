"""What a range test recorded, and what the run around it knows: the inputs of the one
function that builds a result (``distlr.core.analysis.build_result``).

Pure: no torch, no I/O. ``distlr.loop`` fills a ``History`` step by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class History:
    """One point per optimizer step that ran."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    """The global batch of each recorded step: samples summed over micro-batches and ranks."""
    stop_reason: str = "completed"
    diverged_at: int | None = None
    skipped_steps: int = 0
    """fp16 steps that overflowed and were retried at the same LR."""
    extended_steps: int = 0
    """Steps run past ``max_lr`` because the loss had not turned up there."""
    val_steps: list[int] = field(default_factory=list)
    """The step (index into ``lrs``) after which each validation loss was measured."""
    val_losses: list[float] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class RunFacts:
    """What the run around the range test knows and the result carries."""

    world_size: int = 1
    micro_batch_size: int | None = None
    """Samples per rank per micro-batch (the first batch's size)."""
    accumulation_steps: int = 1
    elapsed_s: float = 0.0
    total_steps_hint: int | None = None
    """The training length the backend's own config names, when ``total_steps`` was not given."""
    cycled: bool = False
    """The training loader ran out on some rank and was read again."""
    validated: bool = False
    """A ``val_loader`` was given."""
    notes: tuple[str, ...] = ()
    """What the backend wants the user told."""
    provenance: dict[str, Any] = field(default_factory=dict)

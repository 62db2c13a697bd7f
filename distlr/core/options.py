"""The arguments of one range test, checked once, and the values every choice argument allows.

Pure: no torch, no I/O; it imports nothing from distlr, so every layer may use it.
``RangeTestArgs`` holds ``LRFinder.find()``'s arguments (the CLI's ``RunConfig`` embeds one, and
the ranks of a job compare theirs before the first step). Each choice is a ``Literal`` type, and
the tuple of its allowed values is read from that type, so the two never drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

StepMode = Literal["exp", "linear"]
"""LR ladder spacing: even in log space, or even in LR."""
AmpMode = Literal["no", "bf16", "fp16"]
"""Mixed precision: none, bf16 autocast, fp16 autocast with a GradScaler."""
SnapshotMode = Literal["memory", "disk"]
"""Where the state from before the range test is kept."""
DistBackend = Literal["auto", "nccl", "gloo"]
"""The process group backend when distlr creates the group."""
SuggestionMethod = Literal["steepest_gradient", "valley", "minimum"]
"""The rule that picks ``optimal_lr`` (``distlr.suggest.SUGGESTION_RULES``; the first is the default)."""
OptimizerName = Literal["adamw", "adam", "sgd"]
"""The optimizers the CLI builds."""
TokenDtype = Literal["uint16", "uint32", "int32", "int64"]
"""The integer type of raw ``.bin`` token files."""

STEP_MODES: tuple[str, ...] = get_args(StepMode)
AMP_MODES: tuple[str, ...] = get_args(AmpMode)
SNAPSHOT_MODES: tuple[str, ...] = get_args(SnapshotMode)
DIST_BACKENDS: tuple[str, ...] = get_args(DistBackend)
SUGGESTION_METHODS: tuple[str, ...] = get_args(SuggestionMethod)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
TOKEN_DTYPES: tuple[str, ...] = get_args(TokenDtype)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name`` (for "did you mean ...?"), or None if none is close.

    The cutoff is lower than difflib's default so that long misspellings such as
    ``max_learning_rate`` still find ``max_lr``.

    Example:
        >>> closest("valey", SUGGESTION_METHODS)
        'valley'
    """
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.4)
    return found[0] if found else None


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``, suggesting the closest name.

    Example:
        >>> check_choice("step_mode", "log", STEP_MODES)
        Traceback (most recent call last):
        ...
        ValueError: step_mode='log' is not supported; allowed: 'exp', 'linear'
    """
    allowed = list(allowed)
    if value in allowed:
        return
    close = closest(str(value), allowed)
    hint = f" (did you mean {close!r}?)" if close else ""
    raise ValueError(f"{name}={value!r} is not supported{hint}; allowed: {', '.join(map(repr, allowed))}")


def check_device(device: Any) -> None:
    """Raise unless ``device`` is a device string distlr takes: ``auto``, ``cpu``, ``cuda`` or
    ``cuda:N`` (whether CUDA is there is for the rank that runs it to say).

    Raises:
        TypeError: not a string. ValueError: any other string, naming what is allowed.
    """
    if not isinstance(device, str):
        raise TypeError(f"device={device!r} must be a string ({', '.join(DEVICE_CHOICES)}) or a torch.device")
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return
    raise ValueError(f"device={device!r} is not supported; allowed: {', '.join(DEVICE_CHOICES)}")


DEFAULT_TIMEOUT_S = 300.0
"""Collective timeout when distlr makes the process group: a dead rank ends the job in minutes,
not after torch's default half hour."""


def check_timeout(seconds: Any) -> None:
    """Raise ValueError unless ``seconds`` is a finite number > 0 (``dist_timeout``)."""
    if not is_real(seconds) or not math.isfinite(seconds) or not seconds > 0:
        raise ValueError(f"dist_timeout={seconds!r} is not allowed; use a number of seconds > 0")


def is_real(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_lr(name: str, value: Any) -> None:
    if not is_real(value):
        raise TypeError(f"{name}={value!r} must be a number (a float > 0), got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be a finite number > 0")


@dataclass(frozen=True, kw_only=True)
class RangeTestArgs:
    """The arguments of one range test (``LRFinder.find``'s), validated on construction.

    Raises:
        TypeError: a value of the wrong type (``num_steps=10.5``).
        ValueError: a value out of range; the message names the argument, the value and what
            is allowed.

    Example:
        >>> RangeTestArgs(num_steps=50).num_steps
        50
        >>> RangeTestArgs(min_lr=1e-2, max_lr=1e-3)
        Traceback (most recent call last):
        ...
        ValueError: max_lr=0.001 must be greater than min_lr=0.01; please decrease min_lr or increase max_lr
    """

    min_lr: float = field(default=1e-8, metadata={"help": "LR of the first step."})
    max_lr: float = field(default=1e-1, metadata={"help": "LR of the last step."})
    num_steps: int = field(default=100, metadata={"help": "Number of optimizer steps (points on the curve)."})
    smooth_factor: float = field(default=0.98, metadata={"help":
        "Weight on history of the bias-corrected EMA of the loss; 0 disables smoothing."})
    divergence_threshold: float = field(default=4.0, metadata={"help":
        "Stop when the smoothed loss exceeds this times the best smoothed loss."})
    suggestion_method: SuggestionMethod = field(default="steepest_gradient", metadata={"help":
        "Rule that picks the suggested LR: steepest_gradient, valley or minimum."})
    step_mode: StepMode = field(default="exp", metadata={"help":
        "LR ladder spacing: exp (even in log space) or linear."})
    accumulation_steps: int = field(default=1, metadata={"help":
        "Micro-batches per optimizer step; the ladder advances per optimizer step."})
    max_grad_norm: float | None = field(default=None, metadata={"help":
        "Clip the global gradient norm to this before each step (unset: no clipping)."})
    amp: AmpMode = field(default="no", metadata={"help":
        "Mixed precision: no, bf16 (autocast) or fp16 (autocast + GradScaler, CUDA only)."})
    total_steps: int | None = field(default=None, metadata={"help":
        "Optimizer steps of your real training run, filled into the schedule recommendation."})
    extend_range: bool = field(default=True, metadata={"help":
        "When the loss has not turned up by max_lr, go on up the same ladder until it does or diverges (at "
        "most num_steps more steps, up to 1000 x max_lr); false: stop at max_lr."})
    val_every: int = field(default=2, metadata={"help":
        "With a val_loader: record the validation loss every this many steps."})
    val_batches: int = field(default=4, metadata={"help":
        "With a val_loader: the validation loss is the mean over this many of its batches, the same ones "
        "every time."})

    def __post_init__(self) -> None:
        _check_lr("min_lr", self.min_lr)
        _check_lr("max_lr", self.max_lr)
        if self.max_lr <= self.min_lr:
            raise ValueError(f"max_lr={self.max_lr!r} must be greater than min_lr={self.min_lr!r}; "
                             "please decrease min_lr or increase max_lr")
        for name, least in (("num_steps", 2), ("accumulation_steps", 1), ("val_every", 1), ("val_batches", 1)):
            value = getattr(self, name)
            if not is_int(value):
                raise TypeError(f"{name}={value!r} must be an int >= {least}, got {type(value).__name__}")
            if value < least:
                raise ValueError(f"{name}={value!r} is too small; allowed: an int >= {least}")
        if self.num_steps > MAX_NUM_STEPS:
            raise ValueError(f"num_steps={self.num_steps:,} is more than a range test can keep and analyse "
                             f"(allowed: 2 to {MAX_NUM_STEPS:,}; 100 to 1,000 is usual): every step keeps its point "
                             "for the analysis, whose time grows faster than the number of points")
        if not is_real(self.smooth_factor) or not 0 <= self.smooth_factor < 1:
            raise ValueError(f"smooth_factor={self.smooth_factor!r} is not allowed; it is the weight on history and "
                             "must be in [0, 1) (0 disables smoothing; 0.98 is the default)")
        threshold = self.divergence_threshold
        if not is_real(threshold) or math.isnan(threshold) or threshold <= 1:
            raise ValueError(f"divergence_threshold={threshold!r} is not allowed; it must be a number > 1 "
                             "(stop when the smoothed loss exceeds threshold x the best loss; inf never stops)")
        check_choice("suggestion_method", self.suggestion_method, SUGGESTION_METHODS)
        check_choice("step_mode", self.step_mode, STEP_MODES)
        check_choice("amp", self.amp, AMP_MODES)
        norm = self.max_grad_norm
        if norm is not None and (not is_real(norm) or not math.isfinite(norm) or norm <= 0):
            raise ValueError(f"max_grad_norm={norm!r} is not allowed; use None (no clipping) or a number > 0")
        if not isinstance(self.extend_range, bool):
            raise TypeError(f"extend_range={self.extend_range!r} must be True or False")
        total = self.total_steps
        if total is not None and (not is_int(total) or total < 1):
            raise ValueError(f"total_steps={total!r} is not allowed; use None or an int >= 1")

    def as_dict(self) -> dict[str, Any]:
        """Every argument by name."""
        return dataclasses.asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The argument names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))


MAX_NUM_STEPS = 100_000
"""The most steps a range test may take. Each step keeps its point (0.3-1.4 kB at the analysis'
peak, measured with tracemalloc), and the analysis of a curve grows faster than linearly: 0.2 s
at 1,000 points, 2.9 s at 10,000, 7 s at 30,000 and about 110 s at 100,000 on the 2-core CPU
machine. A larger number is a typo far more often than a plan; one in the billions used to fill
memory."""

DEFAULTS = RangeTestArgs()
"""The defaults, which ``LRFinder.find()``'s signature reads: one place for each."""

SweepArgs = RangeTestArgs
"""Deprecated spelling of ``RangeTestArgs``; it goes in the next release."""

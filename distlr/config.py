"""Arguments and configuration: validation shared by the API and the CLI.

``validate_find_args`` checks every ``find()`` argument before anything runs. ``RunConfig`` is the
CLI's whole configuration: defaults < YAML file < command line, unknown keys rejected with the
closest valid name, every value validated with a message naming the field, the value and what
is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import numbers
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distlr.backend import AMP_MODES
from distlr.distributed import DIST_BACKENDS
from distlr.ladder import STEP_MODES
from distlr.snapshot import SNAPSHOT_MODES
from distlr.suggest import SUGGESTION_RULES

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    """The candidate most like ``name`` (for "did you mean ...?"), or None if none is close.

    The cutoff is lower than difflib's default so that long misspellings such as
    ``max_learning_rate`` still find ``max_lr``.
    """
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.4)
    return found[0] if found else None


def check_choice(name: str, value: Any, allowed: typing.Iterable[str]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``, suggesting the closest name."""
    allowed = list(allowed)
    if value in allowed:
        return
    close = closest(str(value), allowed)
    hint = f" (did you mean {close!r}?)" if close else ""
    raise ValueError(f"{name}={value!r} is not supported{hint}; allowed: {', '.join(map(repr, allowed))}")


def check_positive_lr(name: str, value: Any) -> None:
    if not _is_real(value):
        raise TypeError(f"{name}={value!r} must be a number (a float > 0), got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be a finite number > 0")


def validate_find_args(
    *,
    min_lr: Any,
    max_lr: Any,
    num_steps: Any,
    smooth_factor: Any,
    divergence_threshold: Any,
    suggestion_method: Any,
    step_mode: Any = "exp",
    accumulation_steps: Any = 1,
    max_grad_norm: Any = None,
    amp: Any = "no",
) -> None:
    """Check every ``find()`` argument; raise before any training step.

    Raises:
        TypeError: a value of the wrong type (e.g. ``num_steps=10.5``).
        ValueError: a value out of range; the message names the argument, the value and what
            is allowed.
    """
    check_positive_lr("min_lr", min_lr)
    check_positive_lr("max_lr", max_lr)
    if max_lr <= min_lr:
        raise ValueError(
            f"max_lr={max_lr!r} must be greater than min_lr={min_lr!r}; "
            "please decrease min_lr or increase max_lr"
        )
    for name, value, least in (("num_steps", num_steps, 2), ("accumulation_steps", accumulation_steps, 1)):
        if not _is_int(value):
            raise TypeError(f"{name}={value!r} must be an int >= {least}, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{name}={value!r} is too small; allowed: an int >= {least}")
    if not _is_real(smooth_factor) or not 0 <= smooth_factor < 1:
        raise ValueError(
            f"smooth_factor={smooth_factor!r} is not allowed; it is the weight on history and must be "
            "in [0, 1) (0 disables smoothing; 0.98 is the default)"
        )
    if not _is_real(divergence_threshold) or math.isnan(divergence_threshold) or divergence_threshold <= 1:
        raise ValueError(
            f"divergence_threshold={divergence_threshold!r} is not allowed; it must be a number > 1 "
            "(stop when the smoothed loss exceeds threshold x the best loss; inf never stops)"
        )
    check_choice("suggestion_method", suggestion_method, SUGGESTION_RULES)
    check_choice("step_mode", step_mode, STEP_MODES)
    check_choice("amp", amp, AMP_MODES)
    if max_grad_norm is not None and (
        not _is_real(max_grad_norm) or not math.isfinite(max_grad_norm) or max_grad_norm <= 0
    ):
        raise ValueError(f"max_grad_norm={max_grad_norm!r} is not allowed; use None (no clipping) or a number > 0")


def resolve_device(device: Any, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this rank's CUDA device when CUDA is available, else the CPU.

    Raises:
        ValueError: an unknown device string, or a CUDA device when CUDA is not available.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, str):
        if device == "auto":
            return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device={device!r} is not supported; allowed: {', '.join(DEVICE_CHOICES)}") from None
        if resolved.type not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r} is not supported; allowed: {', '.join(DEVICE_CHOICES)}")
    else:
        raise TypeError(f"device={device!r} must be a string ({', '.join(DEVICE_CHOICES)}) or a torch.device")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available on this machine; use 'auto' or 'cpu'")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


@dataclass(kw_only=True)
class RunConfig:
    """Everything ``python -m distlr`` needs. Field docstrings become ``--help`` text."""

    # -- the sweep (the arguments of LRFinder.find) ------------------------------------------
    min_lr: float = 1e-8
    """LR of the first step."""
    max_lr: float = 1e-1
    """LR of the last step."""
    num_steps: int = 100
    """Number of optimizer steps (points on the curve)."""
    smooth_factor: float = 0.98
    """Weight on history of the bias-corrected EMA of the loss; 0 disables smoothing."""
    divergence_threshold: float = 4.0
    """Stop when the smoothed loss exceeds this times the best smoothed loss."""
    suggestion_method: str = "steepest_gradient"
    """Rule that picks the suggested LR: steepest_gradient, valley or minimum."""
    step_mode: str = "exp"
    """LR ladder spacing: exp (even in log space) or linear."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step; the ladder advances per optimizer step."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this before each step (unset: no clipping)."""
    amp: str = "no"
    """Mixed precision: no, bf16 (autocast) or fp16 (autocast + GradScaler, CUDA only)."""
    # -- model, data, optimizer --------------------------------------------------------------
    model: str = "demo"
    """'demo' (tiny GPT), 'gpt2-small', a Hugging Face model directory or config.json, or 'package.module:function'."""
    data: str = "demo"
    """'demo' (Python's own documentation text), text file(s) (comma-separated or glob), or 'package.module:function'."""
    seq_len: int = 64
    """Tokens per sequence when text is tokenized and packed."""
    batch_size: int = 16
    """Samples per micro-batch (per rank)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    optimizer: str = "adamw"
    """Optimizer: adamw, adam or sgd."""
    weight_decay: float = 0.01
    """Weight decay of the optimizer."""
    momentum: float = 0.9
    """Momentum (sgd only)."""
    deepspeed: str | None = None
    """A DeepSpeed config (JSON) to run under: ZeRO stage, precision, optimizer, batch sizes; "auto" values are filled from this run."""
    # -- the run -----------------------------------------------------------------------------
    device: str = "auto"
    """auto (this rank's GPU if any, else CPU), cpu, cuda or cuda:N."""
    seed: int = 0
    """Seed for model initialisation and data order."""
    output_dir: str | None = None
    """Where results go; default: a new timestamped folder under ./distlr-runs."""
    overwrite: bool = False
    """Allow writing into an output_dir that already holds a result."""
    total_steps: int | None = None
    """Optimizer steps of your real training run, filled into the schedule recommendation."""
    snapshot: str = "memory"
    """Where the pre-sweep state is kept: memory (host RAM) or disk (a checkpoint per rank)."""
    snapshot_dir: str | None = None
    """Directory for snapshot=disk (default: the system temp directory)."""
    find_unused_parameters: bool = False
    """Passed to DDP: set it when some parameters get no gradient in a step."""
    dist_backend: str = "auto"
    """Process group backend when distlr creates one: auto (nccl with CUDA, else gloo), nccl, gloo."""
    dist_timeout: float = 300.0
    """Seconds a collective may wait before the job fails."""
    log_every: int = 10
    """Log one line every this many steps (when no progress bar is drawn)."""
    progress: bool = True
    """Draw a progress bar on a terminal."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ValueError/TypeError naming the field, value and what is allowed."""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _field_types(type(self))[f.name])
        validate_find_args(**self.find_kwargs())
        for name in ("seq_len", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is too small; allowed: an int >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers!r} is not allowed; use an int >= 0")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps!r} is not allowed; use an int >= 1 or leave it unset")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("snapshot", self.snapshot, SNAPSHOT_MODES)
        check_choice("dist_backend", self.dist_backend, DIST_BACKENDS)
        if not self.dist_timeout > 0 or not math.isfinite(self.dist_timeout):
            raise ValueError(f"dist_timeout={self.dist_timeout!r} is not allowed; use a number of seconds > 0")
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise ValueError(f"weight_decay={self.weight_decay!r} is not allowed; use a number >= 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum!r} is not allowed; use a number in [0, 1)")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise ValueError(f"deepspeed={self.deepspeed!r}: no such file (a DeepSpeed config JSON)")
        if self.device != "auto":
            if not (self.device in ("cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
                raise ValueError(f"device={self.device!r} is not supported; allowed: {', '.join(DEVICE_CHOICES)}")

    def find_kwargs(self) -> dict[str, Any]:
        """The ``LRFinder.find()`` arguments this config sets."""
        names = ("min_lr", "max_lr", "num_steps", "smooth_factor", "divergence_threshold", "suggestion_method",
                 "step_mode", "accumulation_steps", "max_grad_norm", "amp")
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        """Build a config from a mapping (a YAML file, flags); values may be strings."""
        types_ = _field_types(cls)
        for key in data:
            if key not in types_:
                close = closest(key, types_)
                hint = f"; did you mean {close!r}?" if close else ""
                raise ValueError(f"unknown key {key!r} in {source}{hint} (valid keys: see `distlr --help`)")
        return cls(**{k: coerce(k, v, types_[k]) for k, v in data.items()})


OPTIMIZERS = ("adamw", "adam", "sgd")


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each dataclass field, by field name (for --help)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = str(after.value.value).strip()  # type: ignore[attr-defined]
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """``(T, optional)`` for ``T`` or ``T | None``."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Turn a YAML/flag value into the field's type (``"1e-8"`` -> 1e-8), or raise naming the field."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{name}: a value is required (got null)")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float)
            return int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a valid {base.__name__}") from None


def _check_type(name: str, value: Any, tp: Any) -> None:
    base, optional = _base_type(tp)
    if value is None and optional:
        return
    ok = {bool: isinstance(value, bool), int: _is_int(value), float: _is_real(value), str: isinstance(value, str)}[base]
    if not ok:
        raise TypeError(f"{name}={value!r} must be {'an' if base is int else 'a'} {base.__name__}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config (safe loader). Raises ValueError naming the file for bad content."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {str(path)!r}: no such file")
    with path.open() as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise ValueError(f"--config {str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data

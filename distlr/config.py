"""The command line's configuration: every key, its default, its check.

``RunConfig`` is the CLI's whole configuration: the sweep's ``SweepArgs`` (checked there, once)
and what the CLI builds and where it writes. Defaults < YAML file < command line; unknown keys
are rejected with the closest valid name; every value is checked with a message naming the
field, the value and what is allowed. A config file is flat: the sweep's keys sit beside the
others.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distlr import trackers
from distlr.args import SweepArgs, is_int, is_real
from distlr.choices import (DEVICE_CHOICES, DIST_BACKENDS, OPTIMIZERS, SNAPSHOT_MODES, TOKEN_DTYPES, DistBackend,
                            OptimizerName, SnapshotMode, TokenDtype, check_choice, closest)


BUILTIN_MODELS = ("demo", "tiny-gpt", "gpt2-small")
"""The models the CLI builds by name."""


@dataclass(kw_only=True)
class RunConfig:
    """Everything ``python -m distlr`` needs. Field docstrings become ``--help`` text."""

    sweep: SweepArgs = field(default_factory=SweepArgs)
    """The range test's arguments (``LRFinder.find``'s); their keys sit at the top level of a config."""
    # -- model, data, optimizer --------------------------------------------------------------
    model: str = "demo"
    """'demo' (tiny GPT), 'gpt2-small', a Hugging Face model directory or config.json, or 'package.module:function'."""
    data: str = "demo"
    """'demo' (Python's own documentation); text files, .pt/.npy/.bin token files, .jsonl/.json/.parquet/.csv/.arrow files (comma-separated, a glob, or a directory of .txt files); a saved Hugging Face datasets directory; or 'package.module:function'."""
    val_data: str | None = None
    """A validation set, read as --data is: with it, the validation loss (the same val_batches batches each time) is recorded every val_every steps and drawn in the plot."""
    text_column: str = "text"
    """The column holding the text in a Hugging Face dataset or .jsonl/.parquet/... files (an 'input_ids' column is used as it is)."""
    token_dtype: TokenDtype = "uint16"
    """The integer type of raw .bin token files (nanoGPT style): uint16, uint32, int32 or int64."""
    seq_len: int = 64
    """Tokens per sequence when text is tokenized and packed."""
    batch_size: int = 16
    """Samples per micro-batch (per rank)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    optimizer: OptimizerName = "adamw"
    """Optimizer: adamw, adam or sgd."""
    weight_decay: float = 0.01
    """Weight decay of the optimizer."""
    momentum: float = 0.9
    """Momentum (sgd only)."""
    deepspeed: str | None = None
    """A DeepSpeed config (JSON) to run under: ZeRO stage, precision, optimizer, batch sizes; "auto" values are filled from this run."""
    fsdp: bool = False
    """Shard the model with FSDP2 over the ranks, one unit per transformer block (as torchtitan does); with --amp bf16 the blocks compute in bf16."""
    # -- the run -----------------------------------------------------------------------------
    device: str = "auto"
    """auto (this rank's GPU if any, else CPU), cpu, cuda or cuda:N."""
    seed: int = 0
    """Seed for model initialisation and data order."""
    output_dir: str | None = None
    """Where results go; default: a new timestamped folder under ./distlr-runs."""
    overwrite: bool = False
    """Allow writing into an output_dir that already holds a result."""
    snapshot: SnapshotMode = "memory"
    """Where the pre-sweep state is kept: memory (host RAM) or disk (a checkpoint per rank)."""
    snapshot_dir: str | None = None
    """Directory for snapshot=disk (default: the system temp directory)."""
    find_unused_parameters: bool = False
    """Passed to DDP: set it when some parameters get no gradient in a step."""
    dist_backend: DistBackend = "auto"
    """Process group backend when distlr creates one: auto (nccl with CUDA, else gloo), nccl, gloo."""
    dist_timeout: float = 300.0
    """Seconds a collective may wait before the job fails."""
    log_every: int = 10
    """Log one line every this many steps (when no progress bar is drawn)."""
    progress: bool = True
    """Draw a progress bar on a terminal."""
    global_batch_sizes: str | None = None
    """Run one range test per global batch size (comma-separated, e.g. 16,32,64: micro-batch x ranks x accumulation, the micro-batch at most batch_size) and fit LR against batch size; writes sweep.json and sweep.png."""
    repeats: int = 1
    """Range tests per batch size, each with its own data order (seed + repeat); the spread of the suggestion is reported."""
    target_global_batch_size: int | None = None
    """With global_batch_sizes: the global batch to predict the LR for from the fit (marked as extrapolated outside the swept sizes)."""
    report_to: str = "none"
    """Trackers that get the curve, the figure and the suggestion (in a run of their own): tensorboard, mlflow, wandb (offline unless WANDB_MODE says otherwise), comma-separated; all (every one installed) or none."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field but the sweep's (``SweepArgs`` checks itself); raise ValueError/
        TypeError naming the field, the value and what is allowed."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name != "sweep":
                _check_type(f.name, getattr(self, f.name), hints[f.name])
        if not isinstance(self.sweep, SweepArgs):
            raise TypeError(f"sweep must be a SweepArgs, got {type(self.sweep).__name__}")
        for name in ("seq_len", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is too small; allowed: an int >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers!r} is not allowed; use an int >= 0")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("token_dtype", self.token_dtype, TOKEN_DTYPES)
        check_choice("snapshot", self.snapshot, SNAPSHOT_MODES)
        check_choice("dist_backend", self.dist_backend, DIST_BACKENDS)
        trackers.parse(self.report_to)
        self.batch_sizes()
        if self.is_sweep and self.report_to.strip().lower() not in ("", "none"):
            raise ValueError(f"report_to={self.report_to!r} with a sweep: trackers get single range tests only, not "
                             "sweeps yet; leave report_to out (sweep.json and sweep.png hold every run)")
        if self.global_batch_sizes is not None and self.sweep.accumulation_steps != 1:
            raise ValueError(f"accumulation_steps={self.sweep.accumulation_steps} with global_batch_sizes: each "
                             "size's split decides the accumulation; leave accumulation_steps out")
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats!r} is too small; allowed: an int >= 1")
        if self.target_global_batch_size is not None and self.target_global_batch_size < 1:
            raise ValueError(f"target_global_batch_size={self.target_global_batch_size!r} is too small; allowed: an "
                             "int >= 1")
        if not self.dist_timeout > 0 or not math.isfinite(self.dist_timeout):
            raise ValueError(f"dist_timeout={self.dist_timeout!r} is not allowed; use a number of seconds > 0")
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise ValueError(f"weight_decay={self.weight_decay!r} is not allowed; use a number >= 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum!r} is not allowed; use a number in [0, 1)")
        if self.fsdp and self.deepspeed is not None:
            raise ValueError("fsdp=True and deepspeed=... both shard the model; choose one")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise ValueError(f"deepspeed={self.deepspeed!r}: no such file (a DeepSpeed config JSON)")
        # Only the form: whether CUDA is there is for the rank that runs it to say.
        if self.device != "auto":
            if not (self.device in ("cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
                raise ValueError(f"device={self.device!r} is not supported; allowed: {', '.join(DEVICE_CHOICES)}")

    def batch_sizes(self) -> list[int] | None:
        """``global_batch_sizes`` as ints (a YAML list or a comma-separated string)."""
        if self.global_batch_sizes is None:
            return None
        text = self.global_batch_sizes.strip().strip("[]")
        try:
            sizes = [int(part) for part in text.replace(" ", "").split(",") if part]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
            raise ValueError(f"global_batch_sizes={self.global_batch_sizes!r} is not allowed; use distinct ints >= 1, "
                             "comma-separated (16,32,64)")
        return sizes

    @property
    def is_sweep(self) -> bool:
        return self.global_batch_sizes is not None or self.repeats > 1

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping a config file holds: the sweep's keys first, then the others."""
        flat = self.sweep.as_dict()
        flat.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sweep"})
        return flat

    def to_saved_dict(self) -> dict[str, Any]:
        """What a run saves as its ``config.yaml``: everything but ``overwrite``, so that running
        the saved config again can never write over that run."""
        return {k: v for k, v in self.to_dict().items() if k != "overwrite"}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        """Build a config from a flat mapping (a YAML file, flags); values may be strings."""
        types_ = field_types()
        for key in data:
            if key not in types_:
                close = closest(key, types_)
                hint = f"; did you mean {close!r}?" if close else ""
                raise ValueError(f"unknown key {key!r} in {source}{hint} (valid keys: see `distlr --help`)")
        values = {k: coerce(k, v, types_[k]) for k, v in data.items()}
        sweep = SweepArgs(**{k: v for k, v in values.items() if k in SweepArgs.names()})
        return cls(sweep=sweep, **{k: v for k, v in values.items() if k not in SweepArgs.names()})


def field_types() -> dict[str, Any]:
    """Every key a config may hold, with its type: the sweep's and the run's."""
    types_ = typing.get_type_hints(SweepArgs)
    types_.update({k: v for k, v in typing.get_type_hints(RunConfig).items() if k != "sweep"})
    return types_


def field_defaults() -> dict[str, Any]:
    """Every key's default, as ``field_types``."""
    return RunConfig().to_dict()


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each dataclass field, by field name (for --help)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = str(after.value.value).strip()  # type: ignore[attr-defined]
    return docs


def _base_type(tp: Any) -> tuple[Any, bool]:
    """``(T, optional)`` for ``T`` or ``T | None``; a ``Literal`` of strings is ``str``."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _base_type(inner[0])[0], True
    if typing.get_origin(tp) is typing.Literal:
        return str, False
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
        if base in (int, float) and isinstance(value, bool):
            raise ValueError  # YAML's true is no number
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
    ok = {bool: isinstance(value, bool), int: is_int(value), float: is_real(value), str: isinstance(value, str)}[base]
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

"""The command line's configuration: every key, its default, its check.

``RunConfig`` is the CLI's whole configuration: the range test's ``RangeTestArgs`` (checked there, once)
and what the CLI builds and where it writes. Defaults < YAML file < command line; unknown keys
are rejected with the closest valid name; every value is checked with a message naming the
field, the value and what is allowed. A config file is flat: the range test's keys sit beside the
others.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distlr.core.options import (DEFAULT_TIMEOUT_S, DIST_BACKENDS, OPTIMIZERS, SNAPSHOT_MODES, TOKEN_DTYPES, DistBackend,
                                 OptimizerName, RangeTestArgs, SnapshotMode, TokenDtype, check_choice, check_device,
                                 check_timeout, closest, is_int, is_real)
from distlr.core.series import check_series
from distlr.output import trackers
from distlr.output.progress import LOG_EVERY, check_display_args

BUILTIN_MODELS = ("demo", "tiny-gpt", "gpt2-small")
"""The models the CLI builds by name."""


@dataclass(kw_only=True)
class RunConfig:
    """Everything ``python -m distlr`` needs. Each field's ``help`` becomes its ``--help`` text."""

    range_test: RangeTestArgs = field(default_factory=RangeTestArgs, metadata={"help":
        "The range test's arguments (``LRFinder.find``'s); their keys sit at the top level of a config."})
    # -- model, data, optimizer --------------------------------------------------------------
    model: str = field(default="demo", metadata={"help":
        "'demo' (tiny GPT), 'gpt2-small', a Hugging Face model directory or config.json, or "
        "'package.module:function'."})
    data: str = field(default="demo", metadata={"help":
        "'demo' (Python's own documentation); text files, .pt/.npy/.bin token files, "
        ".jsonl/.json/.parquet/.csv/.arrow files (comma-separated, a glob, or a directory of .txt files); a "
        "saved Hugging Face datasets directory; or 'package.module:function'."})
    val_data: str | None = field(default=None, metadata={"help":
        "A validation set, read as --data is: with it, the validation loss (the same val_batches batches each"
        " time) is recorded every val_every steps and drawn in the plot."})
    text_column: str = field(default="text", metadata={"help":
        "The column holding the text in a Hugging Face dataset or .jsonl/.parquet/... files (an 'input_ids' "
        "column is used as it is)."})
    token_dtype: TokenDtype = field(default="uint16", metadata={"help":
        "The integer type of raw .bin token files (nanoGPT style): uint16, uint32, int32 or int64."})
    text_encoding: str = field(default="utf-8", metadata={"help":
        "The encoding of text files, when they start with no byte-order mark (one is followed): utf-8, latin-1,"
        " ... Bytes that do not decode are refused with the file and offset; ENCODING:replace reads them as"
        " U+FFFD instead."})
    seq_len: int = field(default=64, metadata={"help": "Tokens per sequence when text is tokenized and packed."})
    batch_size: int = field(default=16, metadata={"help": "Samples per micro-batch (per rank)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    optimizer: OptimizerName = field(default="adamw", metadata={"help": "Optimizer: adamw, adam or sgd."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay of the optimizer."})
    momentum: float = field(default=0.9, metadata={"help": "Momentum (sgd only)."})
    deepspeed: str | None = field(default=None, metadata={"help":
        "A DeepSpeed config (JSON) to run under: ZeRO stage, precision, optimizer, batch sizes; \"auto\" values"
        " are filled from this run."})
    fsdp: bool = field(default=False, metadata={"help":
        "Shard the model with FSDP2 over the ranks, one unit per transformer block (as torchtitan does); with"
        " --amp bf16 the blocks compute in bf16."})
    # -- the run -----------------------------------------------------------------------------
    device: str = field(default="auto", metadata={"help":
        "auto (this rank's GPU if any, else CPU), cpu, cuda or cuda:N."})
    seed: int = field(default=0, metadata={"help": "Seed for model initialisation and data order."})
    output_dir: str | None = field(default=None, metadata={"help":
        "Where results go; default: a new timestamped folder under ./distlr-runs."})
    overwrite: bool = field(default=False, metadata={"help":
        "Allow writing into an output_dir that already holds a result."})
    snapshot: SnapshotMode = field(default="memory", metadata={"help":
        "Where the state from before the range test is kept: memory (host RAM) or disk (a checkpoint per rank)."})
    snapshot_dir: str | None = field(default=None, metadata={"help":
        "Directory for snapshot=disk (default: the system temp directory)."})
    find_unused_parameters: bool = field(default=False, metadata={"help":
        "Passed to DDP: set it when some parameters get no gradient in a step."})
    dist_backend: DistBackend = field(default="auto", metadata={"help":
        "Process group backend when distlr creates one: auto (nccl with CUDA, else gloo), nccl, gloo."})
    dist_timeout: float = field(default=DEFAULT_TIMEOUT_S, metadata={"help":
        "Seconds a collective may wait before the job fails."})
    log_every: int = field(default=LOG_EVERY, metadata={"help":
        "Log one line every this many steps (when no progress bar is drawn)."})
    progress: bool | None = field(default=None, metadata={"help":
        "A progress bar (true), log lines (false); unset: a bar on a terminal, log lines otherwise and under "
        "SLURM."})
    global_batch_sizes: str | None = field(default=None, metadata={"help":
        "Run one range test per global batch size (comma-separated, e.g. 16,32,64: micro-batch x ranks x "
        "accumulation, the micro-batch at most batch_size) and fit LR against batch size; writes series.json "
        "and series.png."})
    repeats: int = field(default=1, metadata={"help":
        "Range tests per batch size, each with its own data order (seed + repeat); the spread of the "
        "suggestion is reported."})
    target_global_batch_size: int | None = field(default=None, metadata={"help":
        "With global_batch_sizes: the global batch to predict the LR for from the fit (marked as extrapolated"
        " outside the swept sizes)."})
    widths: str | None = field(default=None, metadata={"help":
        "Run one range test per model width (comma-separated, e.g. 256,512,1024): --model must be a "
        "'package.module:function' factory, called with width=...; each run trains a fresh model from the same "
        "seed. Says whether the LR transfers across widths (a verdict needs --repeats 2 or more, which measure"
        " the seed spread), or fits lr ~ width^alpha."})
    target_width: int | None = field(default=None, metadata={"help":
        "With widths: the width to predict the LR for from the fit, with its uncertainty (marked as "
        "extrapolated outside the widths run)."})
    num_steps_series: str | None = field(default=None, metadata={"help":
        "Run range tests of several lengths (comma-separated num_steps, e.g. 50,100,200) to show how the "
        "suggestion moves with the length of the test (its short-horizon bias)."})
    report_to: str = field(default="none", metadata={"help":
        "Trackers that get the curve, the figure and the suggestion (in a run of their own): tensorboard, "
        "mlflow, wandb (offline unless WANDB_MODE says otherwise), comma-separated; all (every one installed)"
        " or none."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field but the range test's (``RangeTestArgs`` checks itself); raise ValueError/
        TypeError naming the field, the value and what is allowed."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name != "range_test":
                _check_type(f.name, getattr(self, f.name), hints[f.name])
        if not isinstance(self.range_test, RangeTestArgs):
            raise TypeError(f"range_test must be a RangeTestArgs, got {type(self.range_test).__name__}")
        check_display_args(progress=self.progress, log_every=self.log_every)
        for name in ("model", "data", "val_data", "output_dir", "snapshot_dir", "deepspeed", "text_column",
                     "text_encoding"):
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"{name}={value!r} is empty; give a value or leave --{name.replace('_', '-')} out "
                                 f"(default: {field_defaults()[name]})")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r} is not allowed; use an int from 0 to {2**32 - 1} "
                             "(NumPy's seeds are unsigned 32-bit)")
        for name in ("seq_len", "batch_size"):
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
        self.width_list()
        self.num_steps_list()
        if self.widths is not None and (":" not in self.model or Path(self.model).exists()):
            raise ValueError(f"widths={self.widths!r} needs --model as a 'package.module:function' factory that takes "
                             f"width=..., got model={self.model!r}")
        self.check_series()
        if self.is_series and self.report_to.strip().lower() not in ("", "none"):
            raise ValueError(f"report_to={self.report_to!r} with a series: trackers get single range tests only, not "
                             "series yet; leave report_to out (series.json and series.png hold every run)")
        check_timeout(self.dist_timeout)
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise ValueError(f"weight_decay={self.weight_decay!r} is not allowed; use a number >= 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum!r} is not allowed; use a number in [0, 1)")
        if self.fsdp and self.deepspeed is not None:
            raise ValueError("fsdp=True and deepspeed=... both shard the model; choose one")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise ValueError(f"deepspeed={self.deepspeed!r}: no such file (a DeepSpeed config JSON)")
        check_device(self.device)

    def check_series(self, flags: Collection[str] = ()) -> None:
        """The series' keys (``distlr.core.series.check_series``). A series decides ``num_steps``
        (a horizon series) and ``accumulation_steps`` (a batch series) itself, so either is
        refused beside it when it differs from its default, or when one of ``flags`` (the keys
        given on the command line) sets it, even to the default. A config file may hold the
        default: config.yaml files saved before the series left those keys out did."""
        def is_given(key: str) -> bool:
            return key in flags or getattr(self.range_test, key) != getattr(RangeTestArgs(), key)

        check_series(self.batch_sizes(), self.width_list(), self.num_steps_list(), repeats=self.repeats,
                     target_global_batch_size=self.target_global_batch_size, target_width=self.target_width,
                     num_steps=self.range_test.num_steps, num_steps_given=is_given("num_steps"),
                     accumulation_steps=self.range_test.accumulation_steps,
                     accumulation_given=is_given("accumulation_steps"))

    def batch_sizes(self) -> list[int] | None:
        """``global_batch_sizes`` as ints (a YAML list or a comma-separated string)."""
        return _int_list("global_batch_sizes", self.global_batch_sizes, "16,32,64")

    def width_list(self) -> list[int] | None:
        """``widths`` as ints."""
        return _int_list("widths", self.widths, "256,512,1024")

    def num_steps_list(self) -> list[int] | None:
        """``num_steps_series`` as ints."""
        return _int_list("num_steps_series", self.num_steps_series, "50,100,200")

    def find_args(self) -> dict[str, Any]:
        """``find()``'s arguments (in a series over global batch sizes, each size's split decides
        ``accumulation_steps``: ``validate`` refused another value)."""
        args = self.range_test.as_dict()
        if self.global_batch_sizes is not None:
            args.pop("accumulation_steps")
        if self.num_steps_series is not None:
            args.pop("num_steps")
        return args

    def for_data(self, data: str) -> RunConfig:
        """This config reading ``data`` (the validation set is read as the training data is)."""
        return dataclasses.replace(self, data=data)

    @property
    def is_series(self) -> bool:
        return (self.global_batch_sizes is not None or self.widths is not None or self.num_steps_series is not None
                or self.repeats > 1)

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping a config file holds: the range test's keys first, then the others."""
        flat = self.range_test.as_dict()
        flat.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "range_test"})
        return flat

    def to_saved_dict(self) -> dict[str, Any]:
        """What a run saves as its ``config.yaml``: everything but ``overwrite``, so that running
        the saved config again can never write over that run, and but the keys a series decides
        itself (``find_args`` leaves them out too), so that the saved config runs again."""
        decided = set(self.range_test.as_dict()) - set(self.find_args())
        return {k: v for k, v in self.to_dict().items() if k != "overwrite" and k not in decided}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", flags: Collection[str] = ()) -> RunConfig:
        """Build a config from a flat mapping (a YAML file, flags); values may be strings, and
        keys may use the Hugging Face names in ``ALIASES``. ``flags``: the keys of ``data`` given
        on the command line, in distlr's names (a few checks hold a flag to more than a file's value)."""
        data = canonical_keys(data, source=source)
        types_ = field_types()
        for key in data:
            if key not in types_:
                close = closest(key, types_)
                hint = f"; did you mean {close!r}?" if close else ""
                raise ValueError(f"unknown key {key!r} in {source}{hint} (valid keys: see `distlr --help`)")
        values = {k: coerce(k, v, types_[k]) for k, v in data.items()}
        range_test = RangeTestArgs(**{k: v for k, v in values.items() if k in RangeTestArgs.names()})
        config = cls(range_test=range_test, **{k: v for k, v in values.items() if k not in RangeTestArgs.names()})
        config.check_series(flags)  # a flag set to its default is still set
        return config


ALIASES = {"gradient_accumulation_steps": "accumulation_steps", "mixed_precision": "amp",
           "per_device_train_batch_size": "batch_size"}
"""The names Hugging Face's ``TrainingArguments`` and Accelerate give three of distlr's keys,
taken as flags (``--gradient-accumulation-steps``) and YAML keys alike."""


def canonical_keys(data: dict[str, Any], *, source: str) -> dict[str, Any]:
    """``data`` with the ``ALIASES`` spelled as distlr's keys.

    Raises:
        ValueError: a key given under both names with different values, naming both.
    """
    out = {k: v for k, v in data.items() if k not in ALIASES}
    for alias, key in ALIASES.items():
        if alias not in data:
            continue
        if key in data and str(data[key]) != str(data[alias]):
            raise ValueError(f"{source} gives {key}={data[key]!r} and {alias}={data[alias]!r}, two names for the "
                             f"same setting; keep one")
        out[key] = data[alias]
    return out


def field_types() -> dict[str, Any]:
    """Every key a config may hold, with its type: the range test's and the run's."""
    types_ = typing.get_type_hints(RangeTestArgs)
    types_.update({k: v for k, v in typing.get_type_hints(RunConfig).items() if k != "range_test"})
    return types_


def field_defaults() -> dict[str, Any]:
    """Every key's default, as ``field_types``."""
    return RunConfig().to_dict()


def field_help() -> dict[str, str]:
    """Every key's ``--help`` text: the ``help`` in its field's metadata (kept in the class
    itself, so installed byte code alone serves it; the convention of HfArgumentParser)."""
    return {f.name: f.metadata.get("help", "") for cls in (RangeTestArgs, RunConfig) for f in dataclasses.fields(cls)
            if f.name != "range_test"}

def base_type(tp: Any) -> tuple[Any, bool]:
    """``(T, optional)`` for ``T`` or ``T | None``; a ``Literal`` of strings is ``str``."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return base_type(inner[0])[0], True
    if typing.get_origin(tp) is typing.Literal:
        return str, False
    return tp, False


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Turn a YAML/flag value into the field's type (``"1e-8"`` -> 1e-8), or raise naming the field."""
    base, optional = base_type(tp)
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
        if value is False and "no" in _literal_values(tp):
            return "no"  # YAML reads an unquoted `amp: no` as false; "no" is what was written
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a valid {base.__name__}") from None


def _literal_values(tp: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` (or ``Literal | None``) type allows; () for any other type."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    return tuple(v for arg in typing.get_args(tp) for v in _literal_values(arg))


def _check_type(name: str, value: Any, tp: Any) -> None:
    base, optional = base_type(tp)
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
            data = yaml.load(fh, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as err:
            raise ValueError(f"--config {str(path)!r} is not valid YAML: {err}") from None
        except _DuplicateKey as err:
            raise ValueError(f"--config {str(path)!r}: {err}; keep one") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


class _DuplicateKey(Exception):
    pass


def _unique_key_loader() -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last silently, so a stale line earlier in the file would be overruled without a word)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if not isinstance(key, (str, int, float, bool)):
                    continue  # an odd key: the config's own check names it
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and {line})")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return Loader


def _int_list(name: str, value: str | None, example: str) -> list[int] | None:
    """A comma-separated (or YAML list) field as distinct ints >= 1."""
    if value is None:
        return None
    text = str(value).strip().strip("[]")
    try:
        items = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        items = []
    if not items or min(items) < 1 or len(set(items)) != len(items):
        raise ValueError(f"{name}={value!r} is not allowed; use distinct ints >= 1, comma-separated ({example})")
    return items

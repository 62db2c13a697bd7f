"""What rank 0 shows and writes: the progress line, the summary, result files.

Files are written atomically (temp file + rename) into a fresh output directory; an existing
result is never overwritten unless the user asks for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from distlr.fit import SweepResult
from distlr.result import LRFinderResult

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
PLOT_FILE = "lr_finder.png"
SWEEP_FILE = "sweep.json"
SWEEP_PLOT_FILE = "sweep.png"
CONFIG_FILE = "config.yaml"
TUNED_DS_FILE = "ds_config.tuned.json"
OUTPUTS = (RESULT_FILE, PLOT_FILE, CONFIG_FILE, TUNED_DS_FILE)


def format_step(index: int, num_steps: int, lr: float, loss: float, smoothed: float) -> str:
    """One fixed-width line per step: ``step 037/100 | lr 3.16e-03 | loss 2.4132 | smooth 2.4410``;
    a step past ``max_lr`` (an extended range) shows as ``step 105/100+``."""
    width = len(str(num_steps))
    past = "+" if index >= num_steps else " "
    return f"step {index + 1:0{width}d}/{num_steps}{past}| lr {lr:.2e} | loss {loss:.4f} | smooth {smoothed:.4f}"


class ProgressReporter:
    """Rank 0's view of the sweep: a progress bar on a terminal, else a log line every few steps."""

    def __init__(self, num_steps: int, *, bar: bool = True, log_every: int = 10, stream: TextIO | None = None) -> None:
        self.num_steps, self.log_every = num_steps, log_every
        self.stream = stream or sys.stderr
        self.bar = bar and self.stream.isatty()
        self._drawn = False

    def step(self, index: int, lr: float, loss: float, smoothed: float) -> None:
        if self.bar:
            done = min(30, (index + 1) * 30 // self.num_steps)
            line = format_step(index, self.num_steps, lr, loss, smoothed)
            self.stream.write(f"\r[{'#' * done}{'.' * (30 - done)}] {line}")
            self.stream.flush()
            self._drawn = True
        elif (index % self.log_every == 0 or index + 1 >= self.num_steps) and logger.isEnabledFor(logging.INFO):
            logger.info(format_step(index, self.num_steps, lr, loss, smoothed))

    def warn(self, message: str) -> None:
        """A warning during the sweep, on a line of its own, not glued to the progress bar."""
        self.close()
        logger.warning("%s", message)

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def summary(result: LRFinderResult) -> str:
    """A few lines for the terminal: the suggestion (or why there is none), how firm it is,
    what was wrong with the range, how the run ended."""
    lines = []
    if result.optimal_lr is not None:
        lines.append(f"suggested lr: {result.optimal_lr:.3e}  ({result.suggestion_method}; constant LR)")
        if result.peak_lr is not None:
            plateau = (result.schedule or {}).get("wsd", {}).get("plateau_lr")
            wsd = f"; warmup-stable-decay plateau {plateau:.3e}" if plateau is not None else ""
            lines.append(f"schedule:     one-cycle / warmup-cosine peak {result.peak_lr:.3e}{wsd}")
        spread = result.confidence
        if spread is not None:
            lines.append(f"band:         {spread['low']:.2e} .. {spread['high']:.2e} ({spread['spread']:.1f}x): where "
                         "another range test (another data order) lands 4 times in 5; --repeats 3 narrows it")
    else:
        lines.append(f"no suggestion ({result.suggestion_method}): {result.suggestion_note}")
    others = ", ".join(
        f"{name} {lr:.2e}" if lr is not None else f"{name} -" for name, lr in result.suggestions.items()
    )
    lines.append(f"all rules:    {others}")
    extended = f" and {result.extended_steps} past max_lr" if result.extended_steps else ""
    ended = {
        "completed": f"ran all {result.num_steps} steps{extended}",
        "diverged": f"loss diverged at step {_step_of(result)} (lr {_lr_at(result)}), stopped",
        "non_finite": f"loss was not finite at step {_step_of(result)} (lr {_lr_at(result)}), stopped",
    }[result.stop_reason]
    batch = f", global batch {result.global_batch_size}" if result.global_batch_size else ""
    lines.append(f"sweep:        {ended}; {result.world_size} rank(s){batch}; {result.elapsed_s:.1f} s")
    if result.inputs:
        lines.append(f"data:         {describe_inputs(result.inputs)}")
    lines.extend(f"range:        {note}" for note in result.range_notes)
    lines.extend(f"note:         {note}" for note in result.notes)
    return "\n".join(lines)


def sweep_summary(sweep: SweepResult) -> str:
    """The terminal table of a sweep: each batch size's split and spread, the fit, the prediction."""
    runs = {run.global_batch_size: run for run in sweep.runs}
    lines = ["global batch | micro x ranks x accum | suggested lr (geo-mean)   min        max        answered"]
    for size, spread in sweep.spreads().items():
        run = runs[size]
        split = f"{run.micro_batch_size} x {sweep.world_size} x {run.accumulation_steps}"
        lines.append(f"{size:>12} | {split:>20} | {_lr_or_dash(spread.geometric_mean):>23}   "
                     f"{_lr_or_dash(spread.min):<10} {_lr_or_dash(spread.max):<10} {spread.answered}/{spread.repeats}")
    fit = sweep.fit
    if fit is None:
        lines.append("fit: fewer than two batch sizes gave a suggestion")
    else:
        err = "" if fit.exponent_stderr is None else f" ± {fit.exponent_stderr:.2f}"
        lines.append(f"fit: lr = {fit.coefficient:.3e} * B^{fit.exponent:.3f}{err} over {fit.points} runs "
                     "(square-root scaling: 0.5, linear: 1)")
    prediction = sweep.prediction()
    if prediction is not None:
        where = ("EXTRAPOLATED outside the swept sizes" if prediction["extrapolation"]
                 else "within the swept sizes")
        lines.append(f"predicted lr at global batch {prediction['global_batch_size']}: {prediction['lr']:.3e} ({where})")
    return "\n".join(lines)


def describe_inputs(inputs: dict) -> str:
    """One line of what the command line read: ``12,345 tokens from 2 files (token files), 192
    sequences of 64, 96 per rank``."""
    parts = [str(inputs.get("source", "data"))]
    if "tokens" in inputs:
        files = inputs.get("files") or []
        where = f" from {len(files)} file(s)" if files else ""
        parts.insert(0, f"{inputs['tokens']:,} tokens{where}")
    if "sequences" in inputs:
        per_rank = f", {inputs['sequences_per_rank']:,} per rank" if "sequences_per_rank" in inputs else ""
        parts.append(f"{inputs['sequences']:,} sequences of {inputs['seq_len']}{per_rank}")
    return "; ".join(parts)


def _step_of(result: LRFinderResult) -> str:
    # Steps count from 1 here, as in the progress log.
    return "-" if result.diverged_at is None else str(result.diverged_at + 1)


def _lr_at(result: LRFinderResult) -> str:
    return f"{result.lrs[result.diverged_at]:.2e}" if result.diverged_at is not None else "-"


def new_output_dir(requested: str | None, *, overwrite: bool, root: str | Path = "distlr-runs") -> tuple[Path, bool]:
    """Create and return the directory results go to, and whether it was created here.

    With no ``requested`` path: a new timestamped folder under ``root``. A requested directory
    that already holds a result is refused unless ``overwrite`` is set.

    Raises:
        FileExistsError: the directory holds earlier results and ``overwrite`` is False.
        PermissionError / NotADirectoryError: the directory cannot be written.
    """
    if requested is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(root) / stamp
        path, n = base, 1
        while path.exists():
            path, n = Path(f"{base}-{n}"), n + 1
    else:
        path = Path(requested)
        found = [name for name in OUTPUTS if (path / name).exists()]
        if found and not overwrite:
            raise FileExistsError(
                f"output_dir={str(path)!r} already holds {', '.join(found)}; choose another --output-dir "
                "or pass --overwrite"
            )
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"output_dir={str(path)!r} exists and is not a directory")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"output_dir={str(path)!r} cannot be created ({err.strerror or err}); choose a writable "
                      "--output-dir") from None
    if not os.access(path, os.W_OK):
        raise PermissionError(f"output_dir={str(path)!r} is not writable; choose a writable --output-dir")
    return path, created


def _lr_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def free_name(path: Path, also: tuple[str, ...] = ()) -> Path:
    """``path``, or ``stem-N.suffix`` with the first N that is free: nothing is overwritten.
    ``also``: other suffixes that name must be free with (a result and its figure share one)."""
    n = 1
    candidate = path
    while any(c.exists() for c in (candidate, *(candidate.with_suffix(s) for s in also))):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def remove_if_empty(path: Path) -> None:
    """Remove a directory this run made and left empty (a run that failed or was interrupted)."""
    try:
        path.rmdir()  # only succeeds when empty
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write to; renamed onto ``path`` only if the block succeeds,
    removed if it fails, so no half-written file is ever left at ``path``. The file gets the
    usual permissions (0666 less the umask), as ``open()`` would give it, not the temp file's 0600.

    Raises:
        FileNotFoundError: ``path``'s directory does not exist (naming ``path``).
    """
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: there is no directory {str(path.parent)!r}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    # The only portable way to read the umask is to set it; it is set straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file and a rename (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path

"""Rank 0's view of a range test while it runs: a tqdm bar, or one fixed-width log line a few steps.

tqdm is what Hugging Face Trainer and Accelerate users see beside it (it comes with
transformers). ``progress=None`` decides by the terminal: a bar when stderr is one, log lines
when it is not or under SLURM (whose logs would keep every redraw); the log lines go through the
``distlr`` logger either way.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

logger = logging.getLogger(__name__)

LOG_EVERY = 10
"""Steps between two log lines when no bar is drawn (``find(log_every=...)``, ``--log-every``)."""


def check_display_args(*, progress: Any, log_every: Any) -> None:
    """Raise TypeError / ValueError naming ``progress`` or ``log_every`` when they are not allowed."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress={progress!r} must be True, False or None (a bar on a terminal)")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every={log_every!r} is not allowed; use an int >= 1")


def wants_bar(progress: bool | None, stream: TextIO | None = None) -> bool:
    """``progress`` as given, or for None: a bar when ``stream`` (stderr) is a terminal, outside SLURM."""
    if progress is not None:
        return progress
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and "SLURM_JOB_ID" not in os.environ


def format_step(index: int, num_steps: int, lr: float, loss: float, smoothed: float) -> str:
    """One fixed-width line per step: ``step 037/100 | lr 3.16e-03 | loss 2.4132 | smooth 2.4410``;
    a step past ``max_lr`` (an extended range) shows as ``step 105/100+``."""
    width = len(str(num_steps))
    past = "+" if index >= num_steps else " "
    return f"step {index + 1:0{width}d}/{num_steps}{past}| lr {lr:.2e} | loss {loss:.4f} | smooth {smoothed:.4f}"


class ProgressReporter:
    """A tqdm bar (``bar``), or a log line every ``log_every`` steps and at the last ones."""

    def __init__(self, num_steps: int, *, bar: bool, log_every: int = LOG_EVERY, stream: TextIO | None = None) -> None:
        self.num_steps, self.log_every = num_steps, log_every
        self._bar = None
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=num_steps, desc="range test", unit="step", file=stream or sys.stderr,
                             dynamic_ncols=True, leave=True)

    def step(self, index: int, lr: float, loss: float, smoothed: float) -> None:
        if self._bar is not None:
            if index >= self._bar.total:  # past max_lr: the range was extended
                self._bar.total = index + 1
            self._bar.set_postfix_str(f"lr {lr:.2e} loss {loss:.4f}", refresh=False)
            self._bar.update(index + 1 - self._bar.n)
        elif (index % self.log_every == 0 or index + 1 >= self.num_steps) and logger.isEnabledFor(logging.INFO):
            logger.info(format_step(index, self.num_steps, lr, loss, smoothed))

    def warn(self, message: str) -> None:
        """A warning during the range test, on a line of its own, not inside the bar."""
        if self._bar is not None:
            self._bar.clear()
        logger.warning("%s", message)
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

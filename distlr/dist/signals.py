"""Signals during a range test: SIGTERM is an interrupt like Ctrl-C, and a restore, once begun,
is finished before any interrupt is let through.

SIGTERM is what torchrun sends the surviving ranks when one fails, what SLURM's ``scancel``
and ``timeout`` send. Handled like Ctrl-C, it lets ``find()`` restore the state and remove the
snapshot on its way out. Python runs handlers only in the main thread; elsewhere these context
managers do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM; handled like Ctrl-C (the state is restored on the way out)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``Terminated`` (a ``KeyboardInterrupt``); the handler
    that was there before comes back after it."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Defer SIGINT and SIGTERM until the block is done, then raise the first that came.

    For work that must not be left half done: a restore (a half-restored model is worse than
    either state) and the writing of a snapshot. ``KeyboardInterrupt`` after the block for
    SIGINT, ``Terminated`` for SIGTERM.
    """
    if not _in_main_thread():
        yield
        return
    arrived: list[int] = []

    def defer(signum: int, frame: FrameType | None) -> None:
        arrived.append(signum)

    previous: dict[int, Any] = {sig: signal.signal(sig, defer) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if arrived:
        if arrived[0] == signal.SIGTERM:
            raise Terminated("signal SIGTERM (held back until the state was whole)")
        raise KeyboardInterrupt

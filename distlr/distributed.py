"""Every collective distlr uses, in one place.

Each function here is a collective: **every rank must call it, in the same order**, or the job
hangs. With one process (``world_size == 1``) they reduce to local arithmetic and touch no
process group. Flags travel as int tensors (NCCL reduces no bools).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DIST_BACKENDS = ("auto", "nccl", "gloo")

# Codes rank 0 broadcasts after every step: go on, stop (and why), or retry the LR (an fp16
# step skipped for overflow is no point on the curve).
CONTINUE, STOP_DIVERGED, STOP_NON_FINITE, RETRY, STOP_OVERFLOW = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job. Passed explicitly; never read from a global."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class CollectiveError(RuntimeError):
    """A collective of the sweep failed: another rank died, hung past the timeout, or left."""


_TRANSPORT_MARKS = ("gloo", "NCCL", "Timed out", "timed out", "Connection closed", "Connection reset")


@contextlib.contextmanager
def named_failure(ctx: DistContext, what: str, step: int) -> Iterator[None]:
    """Turn a communication failure inside the block into a ``CollectiveError`` that says which
    rank was waiting, for what, at which step, and where to look.

    gloo and NCCL report a dead or stalled peer as a bare transport error. Only such errors are
    renamed (``torch.distributed.DistError``, or a RuntimeError from gloo/NCCL); an exception of
    the model's own passes through untouched.
    """
    try:
        yield
    except RuntimeError as err:
        if not ctx.distributed or not (isinstance(err, dist.DistError) or any(m in str(err) for m in _TRANSPORT_MARKS)):
            raise
        raise CollectiveError(
            f"rank {ctx.rank}: the {what} of step {step} failed; another rank died, hung past the "
            f"collective timeout or left the sweep (look for its own error above): {err}"
        ) from err


def all_reduce_step_stats(ctx: DistContext, stats: torch.Tensor, step: int = 0) -> None:
    """Sum this step's packed statistics over all ranks, in place, without reading them.

    ``stats`` is one float tensor (weighted loss sum, item count, flags) so the whole step costs
    one all-reduce. Collective: every rank must call this, in the same order.
    """
    if ctx.distributed:
        with named_failure(ctx, "all-reduce of the loss", step):
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)


def broadcast_stop(ctx: DistContext, code: int, step: int = 0) -> int:
    """Rank 0's stop code, on every rank; rank 0 does not read back what it sent.

    Collective: every rank must call this, in the same order.
    """
    if not ctx.distributed:
        return code
    flag = torch.tensor([code], dtype=torch.int32, device=ctx.device)
    with named_failure(ctx, "stop-decision broadcast", step):
        dist.broadcast(flag, src=0)
    return code if ctx.is_main else int(flag.item())


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any. Collective: every rank must call this, in the same order."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable), on every rank. Collective: every rank must call this, in the same order."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device)
    return box[0]


class RankFailure(RuntimeError):
    """Another rank failed; this rank stops with the same message instead of hanging."""


def raise_if_any_failed(ctx: DistContext, error: BaseException | None) -> None:
    """Make a failure on any rank a failure on every rank, with the same message.

    Call it after a step that can fail on some ranks only (checking arguments, writing a
    snapshot): the rank that failed re-raises its own error, the others raise a RuntimeError
    naming the rank and the cause, so no rank walks on into a collective the others never
    reach. Collective: every rank must call this, in the same order.
    """
    if not ctx.distributed:
        if error is not None:
            raise error
        return
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, message)
    failed = [(rank, msg) for rank, msg in enumerate(gathered) if msg is not None]
    if not failed:
        return
    if error is not None:
        raise error
    rank, msg = failed[0]
    raise RankFailure(f"rank {rank} failed: {msg}")

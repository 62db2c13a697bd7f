"""Every collective distlr uses, in one place.

Each function here is a collective: **every rank must call it, in the same order**, or the job
hangs. With one process (``world_size == 1``) they reduce to local arithmetic and touch no
process group. Flags travel as int tensors (NCCL reduces no bools). A communication that fails
is named by where it happened (``communication``), never by the text of its error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


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


class DistlrError(RuntimeError):
    """A failure distlr explains in words (the command line prints it without a traceback)."""


class CollectiveError(DistlrError):
    """A communication between the ranks failed: another rank died, hung past the timeout, or left."""


class RankFailure(DistlrError):
    """Another rank failed; this rank stops with the same message instead of hanging."""


@contextlib.contextmanager
def communication(ctx: DistContext, what: str, step: int | None = None) -> Iterator[None]:
    """Name a failure inside the block as a failed communication: a ``CollectiveError`` that
    says which rank was waiting, for what, at which step, and where to look.

    Wrap only code whose failure is a failure to communicate: distlr's collectives below, and
    the backward pass of a DDP model (DDP all-reduces its gradients there). A model's forward
    is never inside, so an error of the model's own keeps its type and message, whatever the
    message says. Errors distlr already explained pass through.
    """
    try:
        yield
    except RuntimeError as err:
        if not ctx.distributed or isinstance(err, DistlrError):
            raise
        at = "" if step is None else f" of step {step + 1}"  # counted from 1, as the progress log counts
        raise CollectiveError(
            f"rank {ctx.rank}: the {what}{at} failed; another rank died, hung past the collective timeout "
            f"or left the range test (look for its own error above): {err}"
        ) from err


def all_reduce_step_stats(ctx: DistContext, stats: torch.Tensor, step: int = 0) -> None:
    """Sum this step's packed statistics over all ranks, in place.

    ``stats`` is one float tensor (weighted loss sum, item count, flags), so a step costs one
    all-reduce, and every rank ends up holding the same sums. Collective: every rank must call
    this, in the same order.
    """
    if ctx.distributed:
        with communication(ctx, "all-reduce of the loss", step):
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any. Collective: every rank must call this, in the same order."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=ctx.device)
    with communication(ctx, "all-reduce of a flag"):
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable), on every rank. Collective: every rank must call this, in the same order."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    with communication(ctx, "broadcast from rank 0"):
        dist.broadcast_object_list(box, src=0, device=ctx.device)
    return box[0]


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank. Collective: every rank must call this, in the same order."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    with communication(ctx, "exchange between the ranks"):
        dist.all_gather_object(gathered, obj)
    return gathered


def barrier(ctx: DistContext, what: str) -> None:
    """Wait until every rank is here. Collective: every rank must call this, in the same order."""
    if ctx.distributed:
        with communication(ctx, what):
            dist.barrier()


def raise_if_any_failed(ctx: DistContext, error: BaseException | None) -> None:
    """Make a failure on any rank a failure on every rank, with the same message.

    The rank that failed re-raises its own error; the others raise ``RankFailure`` naming the
    rank and the cause, so no rank walks on into a collective the others never reach.
    Collective: every rank must call this, in the same order.
    """
    if not ctx.distributed:
        if error is not None:
            raise error
        return
    message = None if error is None else f"{type(error).__name__}: {error}"
    failed = [(rank, msg) for rank, msg in enumerate(gather_objects(ctx, message)) if msg is not None]
    if not failed:
        return
    if error is not None:
        raise error
    rank, msg = failed[0]
    raise RankFailure(f"rank {rank} failed: {msg}")


@contextlib.contextmanager
def agree_on_failure(ctx: DistContext) -> Iterator[None]:
    """Run a block that can fail on some ranks only (checking arguments, writing a snapshot);
    if it fails anywhere, it fails everywhere (``raise_if_any_failed``).

    An ``Exception`` is shared with the other ranks; a ``KeyboardInterrupt`` is not (it ends
    this rank at once). Collective: every rank must enter and leave the block, in the same order.

    Example:
        >>> with agree_on_failure(DistContext()):
        ...     pass
    """
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - whatever it was, every rank must hear of it
        error = err
    raise_if_any_failed(ctx, error)


def agree_on_arguments(ctx: DistContext, what: str, values: dict[str, Any]) -> None:
    """Every rank must have passed the same ``values``; if not, every rank raises the same
    ValueError naming each argument that differs and each rank's value.

    Arguments that differ between ranks would make the ranks run different range tests: one would
    wait in a collective that another never reaches. Collective: every rank must call this,
    in the same order.
    """
    if not ctx.distributed:
        return
    gathered = gather_objects(ctx, {name: repr(value) for name, value in values.items()})
    differ = [name for name in values if len({g[name] for g in gathered}) > 1]
    if differ:
        detail = "; ".join(f"{name}: " + ", ".join(f"rank {r}: {g[name]}" for r, g in enumerate(gathered))
                           for name in differ)
        raise ValueError(f"the ranks passed different {what} ({detail}); every rank must pass the same")

"""Every collective distlr uses, in one place.

Each function here is a collective: **every rank must call it, in the same order**, or the job
hangs. With one process (``world_size == 1``) they reduce to local arithmetic and touch no
process group. Flags travel as int tensors (NCCL reduces no bools). A communication that fails
is named by where it happened (``communication``), never by the text of its error.
"""

from __future__ import annotations

import contextlib
import pickle
from collections import deque
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
    message says. Errors distlr already explained, and running out of memory, pass through.
    """
    try:
        yield
    except RuntimeError as err:
        if not ctx.distributed or isinstance(err, DistlrError) or is_out_of_memory(err):
            raise  # running out of memory in DDP's backward is this rank's own failure, not the link's
        at = "" if step is None else f" of step {step + 1}"  # counted from 1, as the progress log counts
        raise CollectiveError(
            f"rank {ctx.rank}: the {what}{at} failed; another rank died, hung past the collective timeout "
            f"or left the range test (look for its own error above): {err}"
        ) from err


_FINISHED: deque[Any] = deque(maxlen=16)
"""The handles of distlr's last few collectives, held from Python. A gloo worker thread lets go
of its reference to a collective's handle just after finishing it; were that the last reference,
the handle would be destroyed on that thread, which takes the GIL to do so. If the interpreter is
already shutting down then, as in a script that ends right after a range test with its group
still alive (Accelerate's, a user's), the process aborts: "terminate called without an active
exception", exit -6. A 3-line torch script ending in ``dist.all_reduce(torch.ones(1))`` aborted in
7 of 40 runs, and in 0 of 40 with the handle kept. Held here, the last reference goes on Python's
own thread: when 16 newer collectives push it out (its worker let go of it long before), at
exit, or when distlr ends a group it made (``release_finished``). A handle holds its tensors and,
under gloo, the connections' context, but not the process group object: a group the user ends
with ``destroy_process_group`` is freed, and its sockets close when the handles go."""


def _finish(work: Any) -> None:
    """Wait for an ``async_op=True`` collective and keep its handle (``_FINISHED``)."""
    work.wait()
    _FINISHED.append(work)


def release_finished() -> None:
    """Let go of the kept handles (``_FINISHED``). Only safe once no worker thread can still hold
    them: after the group they ran on was destroyed, which joins its threads."""
    _FINISHED.clear()


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: CUDA's own error type, or the CPU allocator's RuntimeError (torch has
    no type of its own for it: "DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                        and "can't allocate memory" in str(err))


def all_reduce_step_stats(ctx: DistContext, stats: torch.Tensor, step: int = 0) -> None:
    """Sum this step's packed statistics over all ranks, in place.

    ``stats`` is one float tensor (weighted loss sum, item count, flags), so a step costs one
    all-reduce, and every rank ends up holding the same sums. Collective: every rank must call
    this, in the same order.
    """
    if ctx.distributed:
        with communication(ctx, "all-reduce of the loss", step):
            _finish(dist.all_reduce(stats, op=dist.ReduceOp.SUM, async_op=True))


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any. Collective: every rank must call this, in the same order."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=ctx.device)
    with communication(ctx, "all-reduce of a flag"):
        _finish(dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True))
    return bool(value.item())


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable), on every rank. Collective: every rank must call this, in the same order."""
    if not ctx.distributed:
        return obj
    with communication(ctx, "broadcast from rank 0"):
        payload = _pickled(obj, ctx.device) if ctx.is_main else None
        size = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.int64, device=ctx.device)
        _finish(dist.broadcast(size, src=0, async_op=True))
        if payload is None:
            payload = torch.empty(int(size.item()), dtype=torch.uint8, device=ctx.device)
        _finish(dist.broadcast(payload, src=0, async_op=True))
    return obj if ctx.is_main else _unpickled(payload)


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank. Collective: every rank must call this, in the same order."""
    if not ctx.distributed:
        return [obj]
    with communication(ctx, "exchange between the ranks"):
        payload = _pickled(obj, ctx.device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=ctx.device)
        sizes = [torch.empty_like(size) for _ in range(ctx.world_size)]
        _finish(dist.all_gather(sizes, size, async_op=True))
        lengths = torch.cat(sizes).tolist()  # one copy to the host, not one per rank
        longest = max(lengths)
        padded = torch.zeros(longest, dtype=torch.uint8, device=ctx.device)
        padded[: payload.numel()] = payload
        gathered = [torch.empty_like(padded) for _ in range(ctx.world_size)]
        _finish(dist.all_gather(gathered, padded, async_op=True))
    return [_unpickled(g[:n]) for g, n in zip(gathered, lengths)]


def _pickled(obj: Any, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)


def _unpickled(payload: torch.Tensor) -> Any:
    # Only what another rank of this job pickled, as torch's own object collectives do.
    return pickle.loads(payload.cpu().numpy().tobytes())


def barrier(ctx: DistContext, what: str) -> None:
    """Wait until every rank is here. Collective: every rank must call this, in the same order."""
    if ctx.distributed:
        with communication(ctx, what):
            _finish(dist.barrier(async_op=True))


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

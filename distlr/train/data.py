"""Reading batches for the range test: cycling a short loader with a new epoch each time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from distlr.dist.collectives import DistContext, agree_on_failure

logger = logging.getLogger(__name__)


def check_loader(loader: Any, *, name: str = "train_dataloader") -> None:
    """Reject what cannot be a loader, before anything runs.

    Raises:
        TypeError: ``loader`` is not iterable.
        ValueError: ``loader`` has a length of 0.
    """
    if not isinstance(loader, Iterable):
        raise TypeError(f"{name} must be an iterable of batches (e.g. a torch DataLoader); got {type(loader).__name__}")
    try:
        length = len(loader)
    except TypeError:
        return  # an iterable without a length: emptiness shows on the first fetch
    if length == 0:
        raise ValueError(f"{name} is empty (len 0): it yields no batches; check the dataset, batch_size and drop_last")


def read_fixed_batches(loader: Iterable[Any], count: int, ctx: DistContext) -> list[Any]:
    """The first ``count`` batches of ``loader`` (fewer if it holds fewer), read once and kept.

    Read with the global RNG set aside (``torch.random.fork_rng``), so a shuffling loader does
    not change the training batches that follow. Every rank must call this (a rank whose shard
    yields nothing fails every rank).

    Raises:
        ValueError: the loader yields no batch on some rank.
    """
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
        batches = [batch for _, batch in zip(range(count), it)]
        if hasattr(it, "close"):
            it.close()
    with agree_on_failure(ctx):
        if not batches:
            raise ValueError("val_loader yielded no batches on rank "
                             f"{ctx.rank}; check its dataset, batch_size and drop_last")
    return batches


def keep_generators(loader: Any, holders: tuple[str, ...] = ("sampler", "batch_sampler", "generator")
                    ) -> Callable[[], None]:
    """What reading a loader changes besides the global RNG, which the snapshot restores: the
    private ``torch.Generator`` of the loader and its samplers (the next shuffle order), found
    through the attributes ``holders`` a few levels deep. Returns what puts them back."""
    states = [(g, g.get_state()) for g in _generators(loader, holders)]

    def restore() -> None:
        for generator, state in states:
            generator.set_state(state)
    return restore


def _generators(loader: Any, holders: tuple[str, ...]) -> list[torch.Generator]:
    found: list[torch.Generator] = []
    seen: set[int] = set()
    level = [loader]
    for _ in range(4):
        deeper = []
        for holder in level:
            if holder is None or id(holder) in seen:
                continue
            seen.add(id(holder))
            if isinstance(holder, torch.Generator):
                found.append(holder)
                continue
            deeper += [getattr(holder, name, None) for name in holders]
        level = deeper
    return found


class BatchStream:
    """Endless batches from a loader; when it runs out, the next epoch starts.

    A ``sampler.set_epoch(epoch)`` (DistributedSampler and friends) is called for each new epoch
    so every pass is shuffled anew, and the user is told once that the loader was cycled
    (through ``warn``, which the progress bar uses to keep the message off its line).
    A one-shot iterator (a generator) cannot start again: running out of it is an error that
    says so.
    """

    def __init__(self, loader: Iterable[Any], *, warn: Callable[[str], None] | None = None,
                 keep: Callable[[Any], Callable[[], None]] = keep_generators) -> None:
        self.loader = loader
        self.cycled = False
        self._restore = keep(loader)  # the backend's: what reading this loader changes
        self._warn = warn or logger.warning
        # Made on the first fetch, not here: a DataLoader draws its shuffle seed from the torch RNG
        # when its iterator is created, and that must happen after the snapshot.
        self._it: Iterator[Any] | None = None
        self._read_this_epoch = 0
        self._read = 0

    def next(self) -> Any:
        """The next batch.

        Raises:
            ValueError: the loader yields nothing at all, or a one-shot iterator ran out.
        """
        if self._it is None:
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            if self._read_this_epoch == 0:
                raise ValueError(
                    "train_dataloader yielded no batches; check the dataset, batch_size and drop_last"
                ) from None
            batch = self._new_epoch()
        self._read_this_epoch += 1
        self._read += 1
        return batch

    def take(self, n: int) -> list[Any]:
        """The next ``n`` batches: the micro-batches of one optimizer step."""
        return [self.next() for _ in range(n)]

    def close(self) -> None:
        """Leave the loader as the range test found it (``keep``)."""
        it, self._it = self._it, None
        if hasattr(it, "close"):
            it.close()  # a generator's own cleanup runs now, before the state is put back
        self._restore()

    def _new_epoch(self) -> Any:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(getattr(sampler, "epoch", 0) + 1)
        ran_out_after, self._read_this_epoch = self._read_this_epoch, 0
        self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            raise ValueError(
                f"train_dataloader ran out after {self._read} batches and cannot start again: it is a one-shot "
                f"iterator ({type(self.loader).__name__}). Pass something that can be iterated again (a "
                "DataLoader, a list of batches), or lower num_steps so the range test needs fewer batches"
            ) from None
        if not self.cycled:
            self._warn(f"train_dataloader ran out after {ran_out_after} batches; cycling it (new epoch, new "
                       "shuffle) to reach num_steps")
        self.cycled = True
        return batch


def check_reshufflable(loader: Any) -> None:
    """Raise ValueError unless a range test can read ``loader``'s dataset at other batch sizes and in
    orders of its own (``reshuffled``): a ``DataLoader`` over a map-style dataset whose sampler
    is a plain random, sequential or distributed one (a weighted one would be dropped)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        raise ValueError(f"a series over batch sizes or repeats reads train_dataloader's dataset at other batch "
                         f"sizes and orders; a {type(loader).__name__} cannot be, pass a torch DataLoader over a "
                         "map-style Dataset")
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler, DistributedSampler)):
        raise ValueError(f"a series reads train_dataloader's dataset in shuffled orders of its own, which would drop "
                         f"its {type(loader.sampler).__name__}; pass a DataLoader with shuffle=True or False")


def reshuffled(loader: Any, ctx: DistContext, *, batch_size: int, seed: int) -> DataLoader:
    """The loader's dataset read again for one run of a series: ``batch_size`` per rank, this
    rank's shard, shuffled with ``seed`` (the same order on every rank and for every run with that
    seed); everything else as the loader has it (``_with_sampler``).

    Raises:
        ValueError: see ``check_reshufflable``.
    """
    check_reshufflable(loader)
    if ctx.distributed:
        sampler: Any = DistributedSampler(loader.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                          seed=seed, drop_last=loader.drop_last)
    else:
        sampler = RandomSampler(loader.dataset, generator=torch.Generator().manual_seed(seed))
    return _with_sampler(loader, sampler, batch_size)


def _with_sampler(loader: DataLoader, sampler: Any, batch_size: int) -> DataLoader:
    """``loader`` rebuilt over the same dataset with ``sampler`` and ``batch_size``: collate
    function, workers (init function, context, prefetching, persistence), pinning, timeout and
    drop_last are the loader's."""
    workers = loader.num_workers
    return DataLoader(
        loader.dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers if workers else False,
    )


def shard_loader(loader: Any, ctx: DistContext, *, seed: int = 0) -> Any:
    """A loader that reads only this rank's shard of the data.

    A ``DataLoader`` over a map-style dataset without a ``DistributedSampler`` is rebuilt with
    one (same batch size, collate_fn, workers, drop_last, pinning; shuffled if the original
    shuffled, with the same ``seed`` on every rank). A loader that already has one is used as
    is. Anything else (an IterableDataset, a custom batch sampler, a plain iterable) cannot be
    sharded from outside: it is used as given, with a warning, and must shard itself.
    """
    if not ctx.distributed:
        return loader
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler):
        _check_shard(loader, ctx)
    if not isinstance(loader, DataLoader):
        _warn_unsharded(ctx, f"train_dataloader is a {type(loader).__name__}, not a DataLoader")
        return loader
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        _warn_unsharded(ctx, "train_dataloader reads an IterableDataset")
        return loader
    if loader.batch_size is None or not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        _warn_unsharded(ctx, f"train_dataloader uses a custom sampler ({type(loader.batch_sampler).__name__})")
        return loader
    sampler = DistributedSampler(
        loader.dataset, num_replicas=ctx.world_size, rank=ctx.rank,
        shuffle=isinstance(loader.sampler, RandomSampler), seed=seed, drop_last=loader.drop_last,
    )
    sharded = _with_sampler(loader, sampler, loader.batch_size)
    _check_shard(sharded, ctx)
    return sharded


def _check_shard(loader: DataLoader, ctx: DistContext) -> None:
    """Raise if sharding left this rank no batch to read (a small dataset over many ranks)."""
    if len(loader) > 0:
        return
    per_rank = len(loader.sampler)
    raise ValueError(
        f"train_dataloader's {len(loader.dataset)} samples, shared by {ctx.world_size} ranks, give each rank "
        f"{per_rank}: fewer than batch_size={loader.batch_size} with drop_last={loader.drop_last}, so a rank "
        "would read no batch at all; use a smaller batch_size, more data or fewer ranks"
    )


def _warn_unsharded(ctx: DistContext, what: str) -> None:
    if ctx.is_main:
        logger.warning(
            "%s: every rank reads it as given, so make sure each rank gets its own shard "
            "(e.g. a DistributedSampler)", what,
        )

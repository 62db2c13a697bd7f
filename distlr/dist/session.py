"""The distributed session: who this process is, and the process group if distlr must make it.

Reads the launcher's environment (torchrun: RANK/WORLD_SIZE/LOCAL_RANK; SLURM: SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID) at the moment it is asked, initialises the default process group
only if the user has not (NCCL with CUDA, gloo on CPU), and tears down only what it created.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distlr.core.options import DEFAULT_TIMEOUT_S, DEVICE_CHOICES, DIST_BACKENDS, check_choice, check_device, check_timeout
from distlr.dist.launch import LaunchInfo, launch_info
from distlr.dist.collectives import DistContext, release_finished

if dist.is_available() and not dist.is_initialized():
    # Imported while no process group exists (a script imports distlr before it makes one), and
    # never later. This torch module (2.13) takes ``group.WORLD`` as a default argument when it
    # is first imported, and torch._dynamo imports it, which the first optimizer or DDP wrapper
    # made after ``init_process_group`` pulls in: the group is then held until the interpreter
    # shuts down, whatever destroys it. Its gloo threads still run there, and one letting go of
    # the last collective's tensors waits for the GIL, finds the interpreter finalizing and
    # aborts the process ("terminate called without an active exception"): 8 runs in 90 of a
    # plain torch script, 4 in 90 with distlr; none in 80 and in 50 with this module imported first.
    import torch.distributed.nn  # noqa: F401

logger = logging.getLogger(__name__)

_groups_made = 0
"""Process groups distlr has made in this process: each one's rendezvous keys get a namespace of
their own (``_rendezvous_store``). Every rank makes them in the same order, so the count agrees."""


@dataclass
class Session:
    """This process's place in the job, and the one owner of a process group distlr made.

    ``owns_group`` is True when this session created the group; ``close`` then ends it. A group
    that was already there (the user's, or another session's) is joined and never ended.
    """

    ctx: DistContext
    owns_group: bool = False
    launcher: str = "single"
    """How the job was started: "torchrun", "slurm", "single" (one plain process), or "user" (the
    process group was there already)."""
    keep_group: bool = False
    """Made for DeepSpeed: the group outlives the session, because DeepSpeed keeps it in module
    globals and would break every later engine in this process on a new one."""

    def close(self) -> None:
        """End the process group if this session created it; a joined group is left alone.

        Whatever holds the group (a DDP wrapper) must be let go of first.
        """
        if self.owns_group and not self.keep_group and dist.is_initialized():
            gc.collect()  # a wrapper kept alive only by a reference cycle lets go of the group first
            dist.destroy_process_group()
            release_finished()  # its threads are joined: the kept handles can go now
        self.owns_group = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_session(
    device: str | torch.device = "auto",
    *,
    dist_backend: str = "auto",
    dist_timeout: float = DEFAULT_TIMEOUT_S,
    make_group: bool = False,
    keep_group: bool = False,
) -> Session:
    """Join (or create) the job's process group and pick this rank's device.

    Under torchrun or SLURM with no process group yet, one is created: ``dist_backend="auto"``
    means NCCL when this rank uses CUDA and gloo otherwise. An existing group is used as is.

    Args:
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), ``"cpu"``, ...
        dist_backend: ``"auto"``, ``"nccl"`` or ``"gloo"``.
        dist_timeout: seconds a collective may wait before the job fails (> 0).
        make_group: make a one-process group without a launcher too (DeepSpeed and FSDP2 need one).
        keep_group: keep a group this session makes when it closes (DeepSpeed holds on to it).

    Raises:
        ValueError: a bad backend, timeout or device; SLURM without MASTER_ADDR/MASTER_PORT.
    """
    check_choice("dist_backend", dist_backend, DIST_BACKENDS)
    check_timeout(dist_timeout)
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        dev = resolve_device(device, local_rank)
        info = launch_info()
        return Session(DistContext(dist.get_rank(), local_rank, dist.get_world_size(), dev), owns_group=False,
                       launcher=info.launcher if info is not None else "user")
    info = launch_info()
    if info is None and not make_group:
        return Session(DistContext(device=resolve_device(device, 0)))
    single = info is None
    if single:
        info = LaunchInfo(0, 0, 1, "single")
    dev = resolve_device(device, info.local_rank)
    backend = dist_backend if dist_backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"dist_backend='nccl' needs CUDA devices but this rank runs on {dev}; use 'gloo' or 'auto'")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not single and name not in os.environ]
    if missing and info.launcher == "slurm":
        raise ValueError(
            "running under SLURM without torchrun needs MASTER_ADDR and MASTER_PORT in the environment "
            "(see launch/slurm.sbatch)"
        )
    if missing:
        raise ValueError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: a process group needs "
                         "where rank 0 listens; launch with torchrun, or set MASTER_ADDR and MASTER_PORT")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=dist_timeout)
    kwargs: dict = {"device_id": dev} if dev.type == "cuda" else {}
    if single:
        kwargs["init_method"] = f"tcp://127.0.0.1:{_free_port()}"
    else:
        kwargs["store"] = _rendezvous_store(info, timeout)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size, timeout=timeout, **kwargs)
    if info.rank == 0:
        logger.info("process group: %s, %d rank(s), timeout %.0f s", backend, info.world_size, dist_timeout)
    return Session(DistContext(info.rank, info.local_rank, info.world_size, dev), owns_group=True,
                   launcher=info.launcher, keep_group=keep_group)


def _rendezvous_store(info: LaunchInfo, timeout: datetime.timedelta) -> dist.Store:
    """The launcher's store, as ``env://`` would open it, with this group's keys under a prefix
    of their own.

    torchrun keeps one store for the whole job (in its agent), and torch gives every default
    group the same key names. A group the user makes after distlr's has ended would read the
    keys distlr's left there, such as its ranks' old gloo addresses, and hang or be refused (3
    runs in 6 before this). Under ``distlr/<n>/`` they never meet the user's."""
    global _groups_made
    _groups_made += 1
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=not agent_store and info.rank == 0, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"distlr/{_groups_made}", store)


def resolve_device(device: object, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this rank's CUDA device when CUDA is available, else the CPU.

    Raises:
        ValueError: an unknown device string, or a CUDA device when CUDA is not available.
    """
    if isinstance(device, torch.device):
        resolved = device
        if resolved.type not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r} is not supported; allowed: {', '.join(DEVICE_CHOICES)}")
    else:
        check_device(device)
        if device == "auto":
            return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available on this machine; use 'auto' or 'cpu'")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

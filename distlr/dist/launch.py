"""Who launched this process: read from the environment alone (no torch), so the command line
knows which rank prints before anything heavy is imported."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchInfo:
    """Rank layout found in the environment."""

    rank: int
    local_rank: int
    world_size: int
    launcher: str


def launch_info() -> LaunchInfo | None:
    """The torchrun or SLURM rank layout of this process, or None for a plain process.

    Raises:
        ValueError: an environment variable that should be an integer is not.
    """
    env = os.environ
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            return LaunchInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
        if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            return LaunchInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                              int(env["SLURM_NTASKS"]), "slurm")
    except ValueError as err:
        raise ValueError(f"malformed launcher environment variable: {err}") from None
    return None

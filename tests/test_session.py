"""Finding the launcher's rank layout and joining (or not) a process group, in one process."""

from __future__ import annotations

import pytest
import torch

from distlr.dist.session import launch_info, start_session

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
               "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    # A process group left by an earlier test would make every case here a different one.
    assert not torch.distributed.is_initialized(), "an earlier test leaked a process group"
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_plain_process_is_a_single_rank_job(clean_env):
    assert launch_info() is None
    session = start_session("cpu")
    assert (session.ctx.rank, session.ctx.world_size, session.owns_group) == (0, 1, False)
    assert session.ctx.device == torch.device("cpu")
    session.close()  # nothing to tear down, and no error


def test_torchrun_variables_give_the_rank_layout(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    info = launch_info()
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (5, 1, 8, "torchrun")


def test_slurm_variables_give_the_rank_layout(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_LOCALID", "3")
    info = launch_info()
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (3, 3, 4, "slurm")


def test_a_single_slurm_task_is_not_a_distributed_job(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert launch_info() is None


def test_slurm_without_a_rendezvous_address_says_what_to_set(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT"):
        start_session("cpu")


def test_malformed_launcher_variable_is_named(clean_env):
    clean_env.setenv("RANK", "zero")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="zero"):
        launch_info()


@pytest.mark.parametrize(
    "kwargs, words",
    [(dict(dist_backend="mpi"), ["dist_backend='mpi'", "gloo"]), (dict(dist_timeout=0), ["dist_timeout=0", "> 0"])],
)
def test_bad_session_arguments_are_named(clean_env, kwargs, words):
    with pytest.raises(ValueError) as info:
        start_session("cpu", **kwargs)
    for word in words:
        assert word in str(info.value)


def test_nccl_on_a_cpu_rank_is_refused_before_any_rendezvous(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="dist_backend='nccl' needs CUDA"):
        start_session("cpu", dist_backend="nccl")

"""Real torch.distributed jobs on CPU (gloo), launched with torchrun as users launch them.

Each launch runs several scenarios (tests/dist_worker.py) and every rank writes what it saw;
the tests compare ranks with each other and with one process. Every launch has a timeout: a
hang fails the test with the job's full output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dist_worker import EQUIV, equivalence_run
from helpers import REPO, torchrun

pytestmark = pytest.mark.timeout(400)
WORKER = str(REPO / "tests" / "dist_worker.py")


def read(out: Path, scenario: str, world: int) -> list[dict]:
    return [json.loads((out / f"{scenario}.rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    launch = torchrun([WORKER, str(out), "equivalence", "injected", "restore_memory", "restore_disk", "nan"], nproc=2)
    assert launch.returncode == 0, launch.explain()
    return out


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("three_ranks")
    # The user's own process group and DistributedSampler first, then distlr's own sharding.
    launch = torchrun([WORKER, str(out), "user_group_and_sampler", "equivalence"], nproc=3)
    assert launch.returncode == 0, launch.explain()
    return out


def assert_matches_one_process(result: dict, world: int) -> None:
    reference = equivalence_run(batch_size=8 * world)  # one process, the same samples per step
    k = reference["diverged_at"]
    assert k is not None, "the equivalence sweep is meant to diverge"
    assert result["stop_reason"] == reference["stop_reason"] == "diverged"
    assert result["diverged_at"] == k
    assert result["losses"][:k] == pytest.approx(reference["losses"][:k], rel=1e-5)
    assert result["lrs"] == reference["lrs"]
    assert result["optimal_lr"] == pytest.approx(reference["optimal_lr"], rel=1e-9)
    assert result["world_size"] == world and result["global_batch_size"] == 8 * world


@pytest.mark.parametrize("world", [2, 3])
def test_n_ranks_record_the_losses_and_stop_step_of_one_process_with_the_global_batch(world, two_ranks, three_ranks):
    out = two_ranks if world == 2 else three_ranks
    results = read(out, "equivalence", world)
    assert all(r == results[0] for r in results)  # every rank returns the identical result
    assert_matches_one_process(results[0], world)


def test_rank_dependent_losses_are_averaged_and_every_rank_agrees(two_ranks):
    ranks = read(two_ranks, "injected", 2)
    results = [r["result"] for r in ranks]
    assert results[0] == results[1]
    local0, local1 = ranks[0]["local"], ranks[1]["local"]
    assert local0 != local1
    # Each rank's loss carries 0.01 * (rank + 1); the recorded loss is the mean over ranks.
    assert results[0]["losses"] == pytest.approx([(a + b) / 2 for a, b in zip(local0, local1)], rel=1e-12)
    # Smoothing and the stop decision ran on rank 0 and reached every rank.
    assert len(results[0]["smoothed_losses"]) == len(results[0]["losses"]) == 15


def test_nan_on_one_rank_stops_every_rank_on_that_step_and_restores(two_ranks):
    ranks = read(two_ranks, "nan", 2)
    for record in ranks:
        result = record["result"]
        assert result["stop_reason"] == "non_finite" and result["diverged_at"] == 5
        assert len(result["losses"]) == 6 and result["losses"][-1] is None
        assert record["after"] == record["before"]
    assert ranks[0]["result"] == ranks[1]["result"]


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_each_rank_gets_its_own_state_back_bit_for_bit(two_ranks, mode):
    ranks = read(two_ranks, f"restore_{mode}", 2)
    assert ranks[0]["before"] != ranks[1]["before"]  # the ranks' states differ (RNG), each comes back
    for record in ranks:
        assert record["after"] == record["before"]
        assert record["left_on_disk"] == []  # a disk snapshot is removed once restored
    assert ranks[0]["result"] == ranks[1]["result"]


def test_distlr_tears_down_only_the_process_group_it_made(two_ranks, three_ranks):
    assert [r["group_alive"] for r in read(two_ranks, "final", 2)] == [False, False]
    assert [r["group_alive"] for r in read(three_ranks, "final", 3)] == [True, True, True]


def test_the_users_group_and_sampler_are_used_as_they_are(three_ranks):
    ranks = read(three_ranks, "user_group_and_sampler", 3)
    assert all(r["same_loader"] and r["group_alive"] for r in ranks)
    assert all(r["result"] == ranks[0]["result"] for r in ranks)
    assert_matches_one_process(ranks[0]["result"], 3)


def test_a_rank_that_raises_ends_the_job_promptly_with_its_message(tmp_path):
    launch = torchrun([WORKER, str(tmp_path), "raise"], nproc=2, timeout=120)
    assert launch.returncode not in (0, -9), launch.explain()
    assert "injected failure on rank 1 at forward call 3" in launch.output, launch.explain()
    assert launch.seconds < 60, launch.explain()


def test_torchrun_cli_end_to_end_on_the_demo_ddp_config(tmp_path):
    out = tmp_path / "run"
    launch = torchrun(["-m", "distlr", "--config", "configs/demo-ddp.yaml", "--num-steps", "30", "--no-progress",
                       "--output-dir", str(out)], nproc=2)
    assert launch.returncode == 0, launch.explain()
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_batch_size"] == 16 and result["num_steps"] == 30
    assert all(math.isfinite(x) for x in result["losses"])
    assert (out / "lr_finder.png").exists() and (out / "config.yaml").exists()
    assert launch.output.count("suggested lr:") == 1 or launch.output.count("no suggestion") == 1  # rank 0 only
    # A second run into the same directory is refused on every rank, and nothing is overwritten.
    before = (out / "result.json").read_text()
    again = torchrun(["-m", "distlr", "--config", "configs/demo-ddp.yaml", "--num-steps", "30",
                      "--output-dir", str(out)], nproc=2)
    assert again.returncode != 0, again.explain()
    assert again.output.count("already holds") == 1, again.explain()
    assert (out / "result.json").read_text() == before

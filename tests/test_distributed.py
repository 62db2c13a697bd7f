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

from dist_worker import equivalence_run
from helpers import REPO, torchrun

pytestmark = pytest.mark.timeout(400)
WORKER = str(REPO / "tests" / "dist_worker.py")


def read(out: Path, scenario: str, world: int) -> list[dict]:
    return [json.loads((out / f"{scenario}.rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    launch = torchrun([WORKER, str(out), "equivalence", "injected", "short_shard", "collectives"], nproc=2)
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


def test_distlr_tears_down_only_the_process_group_it_made(two_ranks, three_ranks):
    assert [r["group_alive"] for r in read(two_ranks, "final", 2)] == [False, False]
    assert [r["group_alive"] for r in read(three_ranks, "final", 3)] == [True, True, True]


def test_the_users_group_and_sampler_are_used_as_they_are(three_ranks):
    ranks = read(three_ranks, "user_group_and_sampler", 3)
    assert all(r["same_loader"] and r["group_alive"] for r in ranks)
    assert all(r["result"] == ranks[0]["result"] for r in ranks)
    assert_matches_one_process(ranks[0]["result"], 3)


def test_ranks_with_shards_of_different_length_each_cycle_their_own_and_agree(two_ranks):
    ranks = read(two_ranks, "short_shard", 2)
    assert ranks[0] == ranks[1]
    assert len(ranks[0]["losses"]) == 12
    assert any("cycled" in note for note in ranks[0]["notes"])  # only rank 1 ran out, rank 0 says so


def test_each_step_costs_one_all_reduce_and_one_broadcast(two_ranks):
    for record in read(two_ranks, "collectives", 2):
        ten, thirty = record["10"], record["30"]
        # Per find(), whatever its length: two checks that every rank is fine (the arguments,
        # the snapshot: all_gather_object), the result broadcast (broadcast_object_list) and one
        # "did any shard run out" all-reduce. Per step: one all-reduce and one broadcast.
        assert thirty["all_reduce"] - ten["all_reduce"] == 20
        assert thirty["broadcast"] - ten["broadcast"] == 20
        assert ten["all_reduce"] == 10 + 1 and ten["broadcast"] == 10
        assert ten.get("all_gather_object") == 2 and ten.get("broadcast_object_list") == 1
        assert "barrier" not in ten


# Fault injection: each case must end every rank well within the timeout, non-zero, with a
# message naming the rank and the cause.

def test_a_rank_that_raises_ends_the_job_promptly_with_its_message(tmp_path):
    launch = torchrun([WORKER, str(tmp_path), "raise"], nproc=2, timeout=120)
    assert launch.returncode not in (0, -9), launch.explain()
    assert "injected failure on rank 1 at forward call 3" in launch.output, launch.explain()
    assert launch.seconds < 60, launch.explain()


def test_a_rank_killed_with_sigkill_ends_the_job_promptly(tmp_path):
    launch = torchrun([WORKER, str(tmp_path), "fault:sigkill"], nproc=2, timeout=120)
    assert launch.returncode not in (0, -9), launch.explain()
    assert "rank      : 1" in launch.output and "Signal 9 (SIGKILL)" in launch.output, launch.explain()
    assert launch.seconds < 60, launch.explain()


def test_a_stalled_rank_ends_the_job_at_the_collective_timeout(tmp_path):
    # Rank 1 hangs in its forward; rank 0 waits in DDP's gradient all-reduce until the 5 s timeout.
    launch = torchrun([WORKER, str(tmp_path), "fault:stall:5"], nproc=2, timeout=150)
    assert launch.returncode not in (0, -9), launch.explain()
    assert "rank 0: the training step (its gradient all-reduce) of step 2 failed" in launch.output, launch.explain()
    assert "Timed out" in launch.output, launch.explain()
    assert launch.seconds < 90, launch.explain()


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


BAD_INPUT_WORDS = {
    "find_min_lr": ["ValueError", "min_lr=-1.0", "> 0"],
    "ds_missing_file": ["ValueError", "deepspeed_config='missing/ds_config.json': no such file"],
    "ds_bad_json": ["ValueError", "is not valid JSON"],
    "ds_auto_unresolved": ["ValueError", "'zero_optimization.reduce_bucket_size' is \"auto\"", "set it in the config"],
    "ds_optimizer_type": ["ValueError", "'Lamb'", "pass optimizer="],
    "ds_accumulation": ["ValueError", "accumulation_steps=4", "gradient_accumulation_steps=1"],
    "ds_amp": ["ValueError", "amp='bf16'", "engine runs no"],
    "ds_clipping": ["ValueError", "max_grad_norm=0.5", "gradient_clipping=1.0"],
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_inputs")
    launch = torchrun([WORKER, str(out), "bad_inputs"], nproc=2)
    assert launch.returncode == 0, launch.explain()
    return read(out, "bad_inputs", 2)


@pytest.mark.parametrize("case", list(BAD_INPUT_WORDS))
def test_bad_input_fails_the_same_way_on_every_rank(bad_inputs, case):
    messages = [rank[case] for rank in bad_inputs]
    assert messages[0] == messages[1]
    for word in BAD_INPUT_WORDS[case]:
        assert word in messages[0]


@pytest.mark.parametrize("case, words", [("find_num_steps_on_rank1", ["ValueError", "num_steps=1"]),
                                         ("criterion_on_rank1", ["TypeError", "criterion must be callable"]),
                                         ("disk_full_on_rank1", ["OSError", "snapshot='disk' needs about"]),
                                         ("ds_disk_full_on_rank1", ["OSError", "snapshot='disk' needs about"])])
def test_bad_input_on_one_rank_fails_every_rank_naming_that_rank(bad_inputs, case, words):
    rank0, rank1 = (rank[case] for rank in bad_inputs)
    for word in words:
        assert word in rank1 and word in rank0
    assert rank0.startswith("RankFailure: rank 1 failed:")


def test_a_snapshot_that_fails_on_one_rank_leaves_no_files_on_any(bad_inputs):
    assert [rank["left_on_disk"] for rank in bad_inputs] == [[], []]


def test_a_misspelled_deepspeed_key_is_warned_about_by_name_and_the_ranks_stay_in_step(bad_inputs):
    assert bad_inputs[0]["ds_misspelled_key"] is None  # a warning, not an error
    assert any("'gradient_cliping' (did you mean 'gradient_clipping'?)" in w for w in bad_inputs[0]["warnings"])
    assert bad_inputs[0]["after"] == bad_inputs[1]["after"]
    assert len(bad_inputs[0]["after"]["losses"]) >= 2

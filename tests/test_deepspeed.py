"""DeepSpeed ZeRO-1/2/3 on CPU (gloo, 2 ranks, launched with torchrun): the curve, the agreement
between ranks, the bitwise restore (memory and disk), HF GPT-2 under ZeRO-3, "auto" configs and
the tuned config.

One launch runs every scenario (a launch costs seconds of imports); DeepSpeed's op compilation
is kept out (torch optimizers on CPU, no shared-memory comm op).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from dist_worker import equivalence_run
from helpers import REPO, deepspeed_launcher, torchrun

pytestmark = pytest.mark.timeout(500)
WORKER = str(REPO / "tests" / "dist_worker.py")
STAGES = ["1", "2", "3"]


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    scenarios = [f"ds_curve:{s}" for s in STAGES] + ["ds_gpt2_zero3", "ds_auto", "ds_user_engine"]
    launch = torchrun([WORKER, str(out), *scenarios], nproc=2, timeout=420)
    assert launch.returncode == 0, launch.explain()
    return out


def read(out: Path, spec: str) -> list[dict]:
    name = spec.replace(":", "-")
    return [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_reference():
    return equivalence_run(batch_size=16)  # one process, the global batch of the 2-rank run


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_records_the_ddp_curve_and_stops_on_the_same_step(ds_run, ddp_reference, stage):
    ranks = read(ds_run, f"ds_curve:{stage}")
    assert ranks[0] == ranks[1]
    result = ranks[0]
    k = ddp_reference["diverged_at"]
    assert result["zero_stage"] == int(stage) and result["world_size"] == 2 and result["global_batch_size"] == 16
    assert result["diverged_at"] == k and result["stop_reason"] == "diverged"
    # ZeRO reduce-scatters fp32 gradients in a different order than DDP's all-reduce: agreement
    # to 1e-4 relative over the whole curve before divergence.
    assert result["losses"][:k] == pytest.approx(ddp_reference["losses"][:k], rel=1e-4)


def test_hf_gpt2_under_zero3_is_initialised_partitioned_and_restored(ds_run):
    ranks = read(ds_run, "ds_gpt2_zero3")
    for record in ranks:
        assert record["initialised"], "ZeRO-3 parameters differ from the weights the model was built with"
        assert record["restored"]
        assert all(2 * part == full for part, full in zip(record["partition_sizes"], record["full_sizes"]))
    assert ranks[0]["result"] == ranks[1]["result"]
    assert len(ranks[0]["result"]["losses"]) >= 5 and ranks[0]["result"]["zero_stage"] == 3


def test_auto_config_is_resolved_and_the_tuned_config_loads_into_deepspeed(ds_run):
    ranks = read(ds_run, "ds_auto")
    record = ranks[0]
    result, tuned = record["result"], record["tuned"]
    assert result == ranks[1]["result"]
    assert result["optimal_lr"] is not None, result["suggestion_note"]
    assert result["global_batch_size"] == 16
    assert any("scheduler was set aside" in note for note in result["notes"])
    assert tuned == result["deepspeed_config"]
    # The user's total_num_steps (5000) gives a warmup + cosine schedule peaking at the one-cycle
    # peak (result.peak_lr), not at the constant-LR suggestion.
    assert tuned["optimizer"]["params"]["lr"] == result["peak_lr"] >= result["optimal_lr"]
    assert tuned["scheduler"]["type"] == "WarmupCosineLR"
    assert tuned["scheduler"]["params"]["total_num_steps"] == 5000
    assert tuned["scheduler"]["params"]["warmup_num_steps"] == 250
    assert tuned["train_batch_size"] == "auto"  # what the user left to their trainer stays theirs
    lrs = record["lrs"]
    assert lrs is not None and lrs[0] < lrs[-1] <= result["peak_lr"] * (1 + 1e-9)
    # The user's file is only read.
    assert record["file_after"]["optimizer"]["params"]["lr"] == "auto"
    assert record["file_after"]["scheduler"]["type"] == "WarmupDecayLR"


def test_a_users_engine_and_its_scheduler_come_back_as_they_were(ds_run):
    ranks = read(ds_run, "ds_user_engine")
    for record in ranks:
        assert record["restored"] and record["same_scheduler"] and record["scheduler_state_same"] and record["lr_same"]
        assert record["result"]["zero_stage"] == 2
        assert any("scheduler was set aside" in note for note in record["result"]["notes"])
        # The tuned config starts from the engine's own config.
        assert record["result"]["deepspeed_config"]["scheduler"]["type"] in ("WarmupLR", "WarmupCosineLR")
    assert ranks[0]["result"] == ranks[1]["result"]


@pytest.mark.parametrize("config", ["zero1", "zero2", "zero3", "zero3-offload"])
def test_shipped_zero_configs_run_under_torchrun_and_write_the_tuned_config(tmp_path, config):
    ds_file = REPO / "configs" / f"ds_{config.replace('-', '_')}.json"
    original = ds_file.read_bytes()
    out = tmp_path / "run"
    launch = torchrun(["-m", "distlr", "--config", f"configs/{config}.yaml", "--num-steps", "40", "--no-progress",
                       "--total-steps", "2000", "--output-dir", str(out)], nproc=2)
    assert launch.returncode == 0, launch.explain()
    result = json.loads((out / "result.json").read_text())
    assert result["zero_stage"] == int(config[4]) and result["world_size"] == 2
    assert launch.output.count("suggested lr:") == 1, launch.explain()  # printed by rank 0 only
    tuned = json.loads((out / "ds_config.tuned.json").read_text())
    assert tuned == result["deepspeed_config"]
    assert tuned["optimizer"]["params"]["lr"] == result["peak_lr"]  # --total-steps: warmup-cosine to the peak
    assert tuned["scheduler"]["type"] == "WarmupCosineLR" and tuned["scheduler"]["params"]["total_num_steps"] == 2000
    assert tuned["zero_optimization"] == json.loads(original)["zero_optimization"]
    assert ds_file.read_bytes() == original  # the user's config is only read


def test_the_deepspeed_launcher_runs_distlr_as_a_module(tmp_path):
    out = tmp_path / "run"
    launch = deepspeed_launcher(["--module", "distlr", "--config", "configs/zero2.yaml", "--num-steps", "20",
                                 "--no-progress", "--output-dir", str(out)], nproc=2)
    assert launch.returncode == 0, launch.explain()
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["zero_stage"] == 2
    assert (out / "ds_config.tuned.json").exists()

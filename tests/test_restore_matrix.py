"""Exact restore, as a matrix: every exit path x every backend x both snapshot stores.

After the sweep, each rank's parameters, buffers, gradients, optimizer state and param-group
settings, LR scheduler, GradScaler (DeepSpeed: partitions, fp32 masters, loss scaler and step
counters), train/eval flags and RNG streams are bit-identical to what they were before it.

The single-process cells run in this process; the DDP cells share one 2-rank torchrun launch
and the ZeRO cells another (a launch costs seconds of imports). The cell itself is
``scenario_matrix`` in dist_worker.py, the same code in every case.
"""

from __future__ import annotations

import json

import pytest

from dist_worker import MATRIX_BACKENDS, MATRIX_EXITS, MATRIX_SNAPSHOTS, scenario_matrix
from helpers import REPO, torchrun

pytestmark = pytest.mark.timeout(600)
WORKER = str(REPO / "tests" / "dist_worker.py")
EXPECTED_OUTCOME = {"normal_end": "completed", "divergence": "diverged", "exception": "Boom",
                    "keyboard_interrupt": "KeyboardInterrupt", "nan_one_rank": "non_finite"}


def cells(backends) -> list[str]:
    return [f"matrix:{b}:{e}:{s}" for b in backends for e in MATRIX_EXITS for s in MATRIX_SNAPSHOTS]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, list[dict]]:
    """Every cell's record, one per rank: {"matrix:ddp:exception:disk": [rank0, rank1], ...}."""
    out = tmp_path_factory.mktemp("matrix")
    records: dict[str, list[dict]] = {}
    for spec in cells(["single"]):
        records[spec] = [scenario_matrix(out, *spec.split(":")[1:])]
    for backends in (["ddp"], ["zero1", "zero2", "zero3"]):
        specs = cells(backends)
        launch = torchrun([WORKER, str(out), *specs], nproc=2, timeout=540)
        assert launch.returncode == 0, launch.explain()
        for spec in specs:
            name = spec.replace(":", "-")
            records[spec] = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    return records


@pytest.mark.parametrize("snapshot", MATRIX_SNAPSHOTS)
@pytest.mark.parametrize("backend", MATRIX_BACKENDS)
@pytest.mark.parametrize("exit_path", MATRIX_EXITS)
def test_state_is_bit_identical_after_the_sweep(matrix, exit_path, backend, snapshot):
    ranks = matrix[f"matrix:{backend}:{exit_path}:{snapshot}"]
    for rank, record in enumerate(ranks):
        assert record["outcome"] == EXPECTED_OUTCOME[exit_path], f"rank {rank}"
        assert record["after"] == record["before"], f"rank {rank}: the state differs after {exit_path}"
        assert record["left_on_disk"] == [], f"rank {rank}: the snapshot left {record['left_on_disk']}"
    if len(ranks) > 1:
        assert ranks[0]["before"] != ranks[1]["before"]  # each rank has its own state to get back
        assert ranks[0]["result"] == ranks[1]["result"]  # and every rank got the same result
    if exit_path == "nan_one_rank":
        # NaN on the last rank at its 7th forward: every rank stops at step 6.
        assert all(r["result"]["diverged_at"] == 6 and len(r["result"]["losses"]) == 7 for r in ranks)

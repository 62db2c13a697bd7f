"""Two nodes as users launch them: two torchrun agents, started as separate processes the way
srun starts one per node, meet at a c10d rendezvous on this machine (one rank each) and run a
batch-size series, once through the command line and once through a user's script. The nodes
must agree on every run, and only rank 0's node prints and writes results."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import Launch, job_env, kill_marked

pytestmark = pytest.mark.timeout(360)
JOB_TIMEOUT = 300.0
"""Seconds both agents together may take; then every process of the job is killed: a hang fails."""
GRACE = 30.0
"""Seconds the other agent may go on after one has failed, before it is killed too."""

USER_SCRIPT = '''
import json, os, sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distlr import LRFinder

torch.manual_seed(0)
x = torch.randn(512, 8)
data = TensorDataset(x, x @ torch.randn(8) + 0.1 * torch.randn(512))
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
calls = []  # the micro-batches this rank ran itself, counted after each run of the series
model.register_forward_pre_hook(lambda module, args: calls.append(1))
counted = []

def mse(out, y):
    return nn.functional.mse_loss(out.squeeze(-1), y)

loader = DataLoader(data, batch_size=4, shuffle=True)  # distlr gives each rank its own shard
with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), mse) as finder:
    series = finder.series([8, 16], repeats=1, min_lr=1e-4, max_lr=10.0, num_steps=20,
                           on_run=lambda so_far: counted.append(len(calls)))
    world_size = torch.distributed.get_world_size()
record = {"rank": int(os.environ["RANK"]), "local_rank": int(os.environ["LOCAL_RANK"]), "world_size": world_size,
          "forward_calls": counted, "series": series.to_dict()}
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(record, f)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_env(tmp: Path, marker: str) -> dict[str, str]:
    # What helpers.run_job sets, and a temp directory of the node's own (node-local /tmp).
    return job_env(marker, {"TMPDIR": str(tmp)})


def _kill_job(agents: list[subprocess.Popen], marker: str) -> None:
    """SIGKILL the agents' process groups and every process that carries the job's marker:
    torchrun starts each worker in a session of its own, so a worker outlives a killed group
    (and is re-parented, out of the agent's process tree)."""
    for agent in agents:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    kill_marked(marker)
    for agent in agents:
        agent.wait()


def two_nodes(args: list[str], work: Path, *, timeout: float = JOB_TIMEOUT) -> list[Launch]:
    """Run ``args`` under two torchrun agents at once (``--nnodes=2 --nproc_per_node=1``, c10d
    rendezvous on a free local port), each in its own process group, working directory
    (``work/node<N>``) and temp directory, as on two nodes; the same command on both but for
    ``--node-rank``. Every process of the job is killed at ``timeout``, ``GRACE`` seconds after
    one agent failed, or when the test itself stops; a hang is a failure, never waited out."""
    run_id = f"distlr-test-{uuid.uuid4().hex[:12]}"
    endpoint = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    try:
        for node in (0, 1):
            home = work / f"node{node}"
            (home / "tmp").mkdir(parents=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                   f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                   f"--rdzv-id={run_id}", "--max-restarts=0", "--monitor-interval=0.1", *args]
            logs.append(home / "agent.log")
            with logs[-1].open("w") as log:
                procs.append(subprocess.Popen(cmd, cwd=home, env=_job_env(home / "tmp", run_id), stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        start = time.monotonic()
        deadline, killed = start + timeout, ""
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + GRACE)
            if time.monotonic() > deadline:
                killed = f"\n[test harness] killed after {time.monotonic() - start:.0f} s: the job hung"
                break
            time.sleep(0.2)
        seconds = time.monotonic() - start
    finally:
        _kill_job(procs, run_id)  # whatever is left: a hung rank, a worker its agent left behind
    return [Launch(p.returncode, log.read_text() + (killed if p.returncode == -signal.SIGKILL else ""), seconds)
            for p, log in zip(procs, logs)]


def _explain(nodes: list[Launch]) -> str:
    return "\n".join(f"===== node {n}: {job.explain()}" for n, job in enumerate(nodes))


def test_the_cli_runs_a_series_over_two_nodes_and_only_rank_0s_node_reports_and_writes(tmp_path):
    out = tmp_path / "out"
    nodes = two_nodes(["-m", "distlr", "--global-batch-sizes", "8,16", "--repeats", "1", "--num-steps", "20",
                       "--batch-size", "4", "--seq-len", "16", "--no-progress", "--output-dir", str(out)], tmp_path)
    assert [job.returncode for job in nodes] == [0, 0], _explain(nodes)
    # Which agent holds rank 0 is the rendezvous' choice, not --node-rank's (c10d ignores it).
    mains = [job for job in nodes if "process group: gloo, 2 rank(s)" in job.output]
    assert len(mains) == 1, _explain(nodes)
    [main], [other] = mains, [job for job in nodes if job is not mains[0]]
    # The summary table (a row per size: its split), the fit and the files, on rank 0's node alone.
    for line in (r"micro x ranks x accum", r"^ *8 \| +4 x 2 x 1 \|", r"^ *16 \| +4 x 2 x 2 \|", r"^fit: lr = ",
                 rf"^wrote {re.escape(str(out / 'series.json'))}"):
        assert re.search(line, main.output, re.M) and not re.search(line, other.output, re.M), _explain(nodes)
    assert "distlr: error" not in main.output + other.output
    series = json.loads((out / "series.json").read_text())
    assert series["complete"] is True and series["world_size"] == 2, series
    assert [(r["global_batch_size"], r["micro_batch_size"], r["accumulation_steps"]) for r in series["runs"]] == \
        [(8, 4, 1), (16, 4, 2)]
    assert {r["result"]["world_size"] for r in series["runs"]} == {2}
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "series.json", "series.png"]
    # Neither node wrote anywhere else: no default output folder in either working directory.
    for node in (0, 1):
        assert sorted(p.name for p in (tmp_path / f"node{node}").iterdir()) == ["agent.log", "tmp"]


def test_a_users_script_gets_the_same_series_on_both_nodes(tmp_path):
    script, out = tmp_path / "find_series.py", tmp_path / "out"
    script.write_text(USER_SCRIPT)
    out.mkdir()
    nodes = two_nodes([str(script), str(out)], tmp_path)
    assert [job.returncode for job in nodes] == [0, 0], _explain(nodes)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 0, 2)]
    first, second = (r["series"] for r in ranks)
    assert len(first["runs"]) == 2 and first["complete"] is True
    for a, b in zip(first["runs"], second["runs"]):
        got, want = b["result"], a["result"]
        assert (got["optimal_lr"], got["stop_reason"], got["diverged_at"], got["losses"]) == \
            (want["optimal_lr"], want["stop_reason"], want["diverged_at"], want["losses"])
        assert want["global_batch_size"] == a["global_batch_size"] and want["losses"]
    assert first == second
    # What each rank counted itself: the same micro-batches, one per ladder step and accumulation.
    steps = [len(r["result"]["losses"]) * r["accumulation_steps"] for r in first["runs"]]
    assert ranks[0]["forward_calls"] == ranks[1]["forward_calls"] == [steps[0], steps[0] + steps[1]], ranks

"""Real torch.distributed jobs on CPU (gloo), launched with torchrun as users launch them.

The scenarios below run on every rank of a torchrun job (tests/worker.py calls them by name);
each rank writes what it saw, and the tests compare the ranks with each other and with one
process. Every launch has a timeout: a hang fails the test with the job's full output.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from distlr import LRFinder, LRFinderResult, find_optimal_lr
from helpers import (EQUIV, RANK, Faulty, Scenarios, disk_looks_full_on, equivalence_run, errors_of, launch, mlp, mse,
                     read_ranks, regression_data, state_digest, torchrun)

pytestmark = pytest.mark.timeout(400)
MODULE = "test_distributed"
scenarios = Scenarios()


# -- scenarios (every rank runs them) ------------------------------------------------------------


@scenarios
def equivalence(out: Path) -> dict:
    return equivalence_run(batch_size=8)


@scenarios
def injected(out: Path) -> dict:
    """Each rank's loss is offset by 0.01 * (rank + 1): the recorded loss must be their mean."""
    local: list[float] = []

    def offset_loss(output, y):
        loss = mse(output, y) + 0.01 * (RANK + 1)
        local.append(loss.item())
        return loss

    model = mlp()
    loader = DataLoader(regression_data(n=1536), batch_size=8, shuffle=True)
    with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), offset_loss, device="cpu") as finder:
        result = finder.find(min_lr=1e-4, max_lr=1.0, num_steps=15, extend_range=False)
    return {"result": result.to_dict(), "local": local}


@scenarios
def short_shard(out: Path) -> dict:
    """Rank 0 reads 20 batches, rank 1 only 3 (a loader distlr cannot re-shard): no hang."""
    batches = list(DataLoader(regression_data(n=1536), batch_size=8))
    mine = batches[:20] if RANK == 0 else batches[20:23]
    model = mlp()
    with LRFinder(model, mine, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu") as finder:
        return finder.find(min_lr=1e-4, max_lr=1e-1, num_steps=12, extend_range=False).to_dict()


@scenarios
def collectives(out: Path) -> dict:
    """Count the collectives distlr issues from Python (DDP's gradient all-reduce runs in C++
    and is not counted), for a 10- and a 30-step sweep."""
    counts: dict[str, int] = {}
    names = ("all_reduce", "broadcast", "all_gather", "barrier")
    originals = {name: getattr(dist, name) for name in names}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return call

    model = mlp()
    loader = DataLoader(regression_data(n=1536), batch_size=8)
    per_run = {}
    with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), mse, device="cpu") as finder:
        for steps in (10, 30):
            counts.clear()
            for name in names:
                setattr(dist, name, counting(name))
            try:
                finder.find(min_lr=1e-5, max_lr=1e-3, num_steps=steps, extend_range=False)
            finally:
                for name, fn in originals.items():
                    setattr(dist, name, fn)
            per_run[steps] = dict(counts)
    return per_run


@scenarios
def fsdp2(out: Path, accumulation: str) -> dict:
    """The equivalence sweep with an FSDP2 model (each Linear a unit, then the root): each
    rank holds half of every parameter. With accumulation, 2 micro-batches of 4 per rank."""
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    steps = int(accumulation)
    loader = DataLoader(regression_data(n=1536), batch_size=8 // steps, shuffle=False)
    with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu") as finder:
        result = finder.find(**EQUIV, accumulation_steps=steps).to_dict()
    local = [p.to_local().numel() for p in model.parameters()]
    return {"result": result, "local": local, "full": [p.numel() for p in model.parameters()]}


@scenarios
def user_sampler(out: Path) -> dict:
    """The job's group and the user's DistributedSampler: distlr uses both as they are."""
    dataset = regression_data(n=1536)
    sampler = DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=RANK, shuffle=False)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    model = mlp()
    with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu") as finder:
        same_loader = finder.train_dataloader is loader
        result = finder.find(**EQUIV)
    # Leaving the block must leave the user's group alone.
    return {"result": result.to_dict(), "same_loader": same_loader, "group_alive": dist.is_initialized()}


@scenarios
def fault(out: Path, mode: str, timeout: str = "300") -> dict:
    """Rank 1 fails at its third forward: ``sigkill`` kills it (a rank that raises: test_cli.py)."""
    model = Faulty(mlp(), rank=1, at=3, mode=mode)
    loader = DataLoader(regression_data(n=1536), batch_size=8)
    with LRFinder(model, loader, criterion=mse, device="cpu", dist_timeout=float(timeout)) as finder:
        finder.find(min_lr=1e-4, max_lr=1e-2, num_steps=20)
    return {}


@scenarios
def own_error_mentions_a_timeout(out: Path) -> dict:
    """The model's own RuntimeError, whose text reads like a transport error, on every rank."""
    model = Faulty(mlp(), rank=None, at=3, mode="raise", message="gloo: Timed out reading the cache file")
    loader = DataLoader(regression_data(n=1536), batch_size=8)
    with LRFinder(model, loader, criterion=mse, device="cpu") as finder:
        try:
            finder.find(min_lr=1e-4, max_lr=1e-2, num_steps=20)
        except RuntimeError as err:
            return {"type": type(err).__name__, "message": str(err)}
    return {"type": None}


@scenarios
def arguments_differ(out: Path) -> dict:
    """``num_steps`` 40 on rank 0 and 20 on rank 1: both ranks must say so before any step."""
    model = mlp()
    before = state_digest(model)
    loader = DataLoader(regression_data(n=1536), batch_size=8)
    with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu") as finder:
        try:
            finder.find(min_lr=1e-4, max_lr=1e-1, num_steps=40 if RANK == 0 else 20)
            error = None
        except Exception as err:  # noqa: BLE001 - the error is what is recorded
            error = f"{type(err).__name__}: {err}"
        # And the ranks are still in step afterwards.
        after = finder.find(min_lr=1e-4, max_lr=1e-1, num_steps=8).to_dict()
    return {"error": error, "untouched": state_digest(model) == before, "after": after}


@scenarios
def find_optimal_lr_then_my_own_group(out: Path) -> dict:
    """Launched without a group: find_optimal_lr makes one, and must end it, so that the
    user's own init_process_group that follows works (on a fresh store: gloo re-made on the
    same env:// store may meet stale addresses)."""
    model = mlp()
    loader = DataLoader(regression_data(n=1536), batch_size=8)
    lr = find_optimal_lr(model, loader, criterion=mse, device="cpu", min_lr=1e-4, max_lr=10.0, num_steps=60,
                         smooth_factor=0.5)
    left_open = dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{out}/user-store", rank=RANK,
                            world_size=int(os.environ["WORLD_SIZE"]))
    total = torch.tensor([float(RANK + 1)])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return {"lr": lr, "left_open": left_open, "sum": total.item()}


@scenarios
def sigterm(out: Path, snapshot: str) -> dict:
    """Mid-sweep, rank 1 sends SIGTERM to torchrun, which passes it on to every rank (as when a
    rank fails, or on scancel). Every rank must restore its state and remove its snapshot."""
    torch.manual_seed(0)
    inner = mlp()
    optimizer = torch.optim.AdamW(inner.parameters())
    model = Faulty(inner, rank=None, at=4, mode="sigterm_launcher")
    snap_dir = out / f"sigterm-{snapshot}"
    loader = DataLoader(regression_data(n=1536), batch_size=8)
    before = state_digest(inner, optimizer)
    outcome = "completed"
    with LRFinder(model, loader, optimizer, mse, device="cpu", snapshot=snapshot, snapshot_dir=snap_dir) as finder:
        try:
            finder.find(min_lr=1e-4, max_lr=1e-2, num_steps=20)
        except KeyboardInterrupt as err:
            outcome = type(err).__name__
    return {"outcome": outcome, "restored": state_digest(inner, optimizer) == before,
            "left_on_disk": sorted(os.listdir(snap_dir)) if snap_dir.exists() else []}


@scenarios
def bad_inputs(out: Path) -> dict:
    """The same bad inputs on every rank (and some bad on rank 1 only): each must fail before
    any training step, with the same error on every rank, and nothing may hang."""
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("distlr").addHandler(handler)
    loader = DataLoader(regression_data(n=256), batch_size=8)

    def finder(**kwargs):
        model = mlp()
        return LRFinder(model, loader, kwargs.pop("optimizer", torch.optim.SGD(model.parameters(), lr=0.1)),
                        kwargs.pop("criterion", mse), device="cpu", **kwargs)

    def run(**find):
        def go():
            with finder() as f:
                f.find(**find)
        return go

    def disk_full_on_rank1():
        """Rank 1's disk is full; every rank must fail alike and leave no files."""
        with disk_looks_full_on(1), finder(snapshot="disk", snapshot_dir=out / "snap-ddp") as f:
            f.find(num_steps=5)

    record = errors_of({
        "find_min_lr": run(min_lr=-1.0),
        "find_num_steps_on_rank1": run(num_steps=1 if RANK == 1 else 10),
        "criterion_on_rank1": lambda: finder(criterion="mse" if RANK == 1 else mse),
        "disk_full_on_rank1": disk_full_on_rank1,
    })
    dist.barrier()
    record["left_on_disk"] = sorted(str(p) for p in (out / "snap-ddp").rglob("*")) if (out / "snap-ddp").exists() else []
    # After all that, the ranks are still in step: a normal sweep works and agrees.
    with finder() as f:
        record["after"] = f.find(**EQUIV).to_dict()
    return record


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    job = launch(MODULE, out, ["equivalence", "injected", "short_shard", "collectives", "arguments_differ",
                               "own_error_mentions_a_timeout", "bad_inputs", "fsdp2:1", "fsdp2:2"])
    assert job.returncode == 0, job.explain()
    return out


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("three_ranks")
    job = launch(MODULE, out, ["user_sampler", "equivalence"], nproc=3)
    assert job.returncode == 0, job.explain()
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
    results = read_ranks(out, "equivalence", world)
    assert all(r == results[0] for r in results)  # every rank returns the identical result
    assert_matches_one_process(results[0], world)


def test_rank_dependent_losses_are_averaged_and_every_rank_agrees(two_ranks):
    ranks = read_ranks(two_ranks, "injected")
    results = [r["result"] for r in ranks]
    assert results[0] == results[1]
    local0, local1 = ranks[0]["local"], ranks[1]["local"]
    assert local0 != local1
    # Each rank's loss carries 0.01 * (rank + 1); the recorded loss is the mean over ranks.
    assert results[0]["losses"] == pytest.approx([(a + b) / 2 for a, b in zip(local0, local1)], rel=1e-12)
    assert len(results[0]["smoothed_losses"]) == len(results[0]["losses"]) == 15


@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_an_fsdp2_model_records_the_curve_of_one_process_from_its_shards(two_ranks, accumulation):
    ranks = read_ranks(two_ranks, f"fsdp2:{accumulation}")
    assert ranks[0]["result"] == ranks[1]["result"]
    # Each rank holds its own rows of every parameter (dim 0 split between the ranks).
    assert [a + b for a, b in zip(ranks[0]["local"], ranks[1]["local"])] == ranks[0]["full"]
    assert ranks[0]["local"] != ranks[0]["full"]
    result, reference = ranks[0]["result"], equivalence_run(batch_size=16)
    k = reference["diverged_at"]
    assert result["diverged_at"] == k and result["global_batch_size"] == 16
    assert result["accumulation_steps"] == int(accumulation)
    # Reduce-scatter sums in another order than one process: agreement to 1e-4 relative.
    assert result["losses"][:k] == pytest.approx(reference["losses"][:k], rel=1e-4)


def test_the_cli_shards_a_hugging_face_model_with_fsdp_and_bf16(tmp_path):
    out = tmp_path / "run"
    job = torchrun(["-m", "distlr", "--fsdp", "--amp", "bf16", "--num-steps", "30", "--batch-size", "8",
                    "--no-progress", "--output-dir", str(out)], nproc=2)
    assert job.returncode == 0, job.explain()
    result = LRFinderResult.load(out / "result.json")
    assert result.world_size == 2 and result.global_batch_size == 16 and result.steps_run >= 5
    assert all(math.isfinite(x) for x in result.losses[:5])


def test_the_users_group_and_sampler_are_used_as_they_are(three_ranks):
    ranks = read_ranks(three_ranks, "user_sampler", 3)
    assert all(r["same_loader"] and r["group_alive"] for r in ranks)
    assert all(r["result"] == ranks[0]["result"] for r in ranks)
    assert_matches_one_process(ranks[0]["result"], 3)


def test_ranks_with_shards_of_different_length_each_cycle_their_own_and_agree(two_ranks):
    ranks = read_ranks(two_ranks, "short_shard")
    assert ranks[0] == ranks[1]
    assert len(ranks[0]["losses"]) == 12
    assert any("cycled" in note for note in ranks[0]["notes"])  # only rank 1 ran out, rank 0 says so


def test_each_step_costs_one_all_reduce_and_nothing_else(two_ranks):
    for record in read_ranks(two_ranks, "collectives"):
        ten, thirty = record["10"], record["30"]
        # Per step: one all-reduce of the packed statistics. Every rank runs the same stop rule
        # on the same sums, so no stop decision is broadcast.
        assert thirty["all_reduce"] - ten["all_reduce"] == 20
        assert ten.get("broadcast") == thirty.get("broadcast") == 2
        # Per find(), whatever its length: four exchanges that every rank is fine (the arguments,
        # that they agree, the backend and the snapshot), each its sizes then its bytes; the
        # result broadcast (its size, then its bytes); one "did any shard run out" all-reduce.
        assert ten["all_reduce"] == 10 + 1
        assert ten.get("all_gather") == thirty.get("all_gather") == 2 * 4
        assert "barrier" not in ten


def test_arguments_that_differ_between_ranks_are_named_on_every_rank_before_any_step(two_ranks):
    ranks = read_ranks(two_ranks, "arguments_differ")
    assert ranks[0]["error"] == ranks[1]["error"]
    message = ranks[0]["error"]
    assert message.startswith("ValueError: the ranks passed different find() arguments")
    assert "num_steps: rank 0: 40, rank 1: 20" in message
    assert all(r["untouched"] for r in ranks)
    assert ranks[0]["after"] == ranks[1]["after"]


def test_a_models_own_error_is_not_renamed_whatever_its_text(two_ranks):
    for record in read_ranks(two_ranks, "own_error_mentions_a_timeout"):
        assert record["type"] == "RuntimeError"
        assert record["message"] == "gloo: Timed out reading the cache file"


def test_find_optimal_lr_ends_the_group_it_made_so_the_user_can_make_theirs(tmp_path):
    job = launch(MODULE, tmp_path, ["find_optimal_lr_then_my_own_group"], group=False)
    assert job.returncode == 0, job.explain()
    ranks = read_ranks(tmp_path, "find_optimal_lr_then_my_own_group")
    assert [r["left_open"] for r in ranks] == [False, False]
    assert [r["sum"] for r in ranks] == [3.0, 3.0]
    assert ranks[0]["lr"] == ranks[1]["lr"]


def test_sigterm_restores_every_rank_and_removes_every_snapshot(tmp_path):
    # The disk snapshot, the one that used to stay behind; test_signals.py has both stores in one process.
    snapshot = "disk"
    job = launch(MODULE, tmp_path, [f"sigterm:{snapshot}"], timeout=120)
    assert job.returncode != -9, job.explain()  # ended by the signal, not by the harness
    try:
        ranks = read_ranks(tmp_path, f"sigterm:{snapshot}")
    except FileNotFoundError as missing:  # a rank ended before writing its record: say how
        pytest.fail(f"{missing}\n{job.explain()}")
    for rank, record in enumerate(ranks):
        assert record["outcome"] == "Terminated", (rank, job.explain())
        assert record["restored"], rank
        assert record["left_on_disk"] == [], rank


# Fault injection: each case must end every rank well within the harness timeout, non-zero,
# with a message naming the rank and the cause.

def test_a_rank_killed_with_sigkill_ends_the_job_promptly(tmp_path):
    job = launch(MODULE, tmp_path, ["fault:sigkill"], timeout=60)
    assert job.returncode not in (0, -9), job.explain()
    assert "rank      : 1" in job.output and "Signal 9 (SIGKILL)" in job.output, job.explain()


def test_torchrun_cli_end_to_end_on_the_demo_ddp_config(tmp_path):
    out = tmp_path / "run"
    job = torchrun(["-m", "distlr", "--config", "configs/demo-ddp.yaml", "--num-steps", "30", "--no-progress",
                    "--output-dir", str(out)], nproc=2)
    assert job.returncode == 0, job.explain()
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_batch_size"] == 16 and result["num_steps"] == 30
    assert all(math.isfinite(x) for x in result["losses"])
    assert (out / "lr_finder.png").exists() and (out / "config.yaml").exists()
    assert job.output.count("suggested lr:") + job.output.count("no suggestion") == 1  # rank 0 only
    # A second run into the same directory is refused on every rank, and nothing is overwritten.
    before = (out / "result.json").read_text()
    again = torchrun(["-m", "distlr", "--config", "configs/demo-ddp.yaml", "--num-steps", "30",
                      "--output-dir", str(out)], nproc=2)
    assert again.returncode != 0, again.explain()  # each rank exits 2; torchrun says 1
    assert again.output.count("already holds") == 1 and "[rank0]: Traceback" not in again.output, again.explain()
    assert (out / "result.json").read_text() == before


def test_a_stalled_rank_ends_the_job_at_the_collective_timeout_with_a_message_not_a_traceback(tmp_path):
    # Rank 1 hangs in its forward; rank 0 waits in DDP's gradient all-reduce until the 3 s timeout.
    job = torchrun(["-m", "distlr", "--model", "cli_factories:stalling_regression", "--data",
                    "cli_factories:regression_set", "--dist-timeout", "3", "--num-steps", "20", "--no-progress",
                    "--output-dir", str(tmp_path / "run")], nproc=2, timeout=90,
                   env={"PYTHONPATH": str(Path(__file__).parent)})
    assert job.returncode not in (0, -9), job.explain()
    # Rank 1 hangs in its third forward, step 3 counted from 1 as the progress log counts.
    assert "distlr: error: rank 0: the backward pass (with DDP's gradient all-reduce) of step 3 failed" in job.output
    assert "Timed out" in job.output and "[rank0]: Traceback" not in job.output, job.explain()


BAD_INPUT_WORDS = {
    "find_min_lr": ["ValueError", "min_lr=-1.0", "> 0"],
}


@pytest.mark.parametrize("case", list(BAD_INPUT_WORDS))
def test_bad_input_fails_the_same_way_on_every_rank(two_ranks, case):
    messages = [rank[case] for rank in read_ranks(two_ranks, "bad_inputs")]
    assert messages[0] == messages[1]
    for word in BAD_INPUT_WORDS[case]:
        assert word in messages[0]


@pytest.mark.parametrize("case, words", [("find_num_steps_on_rank1", ["ValueError", "num_steps=1"]),
                                         ("criterion_on_rank1", ["TypeError", "criterion must be callable"]),
                                         ("disk_full_on_rank1", ["OSError", "snapshot='disk' needs about"])])
def test_bad_input_on_one_rank_fails_every_rank_naming_that_rank(two_ranks, case, words):
    rank0, rank1 = (rank[case] for rank in read_ranks(two_ranks, "bad_inputs"))
    for word in words:
        assert word in rank1 and word in rank0
    assert rank0.startswith("RankFailure: rank 1 failed:")


def test_a_snapshot_that_fails_on_one_rank_leaves_no_files_on_any(two_ranks):
    ranks = read_ranks(two_ranks, "bad_inputs")
    assert [rank["left_on_disk"] for rank in ranks] == [[], []]
    assert ranks[0]["after"] == ranks[1]["after"] and len(ranks[0]["after"]["losses"]) >= 2

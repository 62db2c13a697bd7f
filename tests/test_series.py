"""The series runner: one range test per global batch size and repeat, in one job. The fit is
checked on synthetic suggestions; the runs under torchrun with 2 ranks: the state after every
run and after the series, the ranks' agreement, a point that diverges at once, refused sizes, and
the CLI's series.json and series.png."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import (Scenarios, digest, fingerprint, launch, mlp, mse, read_ranks, regression_data, state_digest,
                     torchrun)

pytestmark = pytest.mark.timeout(400)
MODULE = "test_series"
scenarios = Scenarios()
RANGE = dict(min_lr=1e-4, max_lr=10.0, num_steps=15)


# -- pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [0.5, 1.0, -0.3])
def test_the_fit_recovers_a_known_exponent_from_noisy_suggestions(exponent):
    from distlr.core.scaling import fit_power_law

    rng = random.Random(0)
    sizes = [b for b in (16, 32, 64, 128, 256, 512) for _ in range(3)]
    lrs = [2e-3 * (b / 16) ** exponent * math.exp(rng.gauss(0, 0.1)) for b in sizes]
    fit = fit_power_law(sizes, lrs)
    assert fit.points == 18 and fit.sizes == 6
    assert abs(fit.exponent - exponent) < 3 * fit.exponent_stderr < 0.1
    assert fit.predict(16) == pytest.approx(2e-3, rel=0.1)


def test_the_fit_leaves_out_runs_without_a_suggestion_and_needs_two_sizes():
    from distlr.core.scaling import fit_power_law

    assert fit_power_law([16, 16, 32], [1e-3, None, None]) is None
    fit = fit_power_law([16, 32, 64, 64], [1e-3, None, 4e-3, math.nan])
    assert fit.points == 2 and fit.exponent == pytest.approx(1.0) and fit.exponent_stderr is None  # 4x LR over 4x B


@pytest.mark.parametrize("size, world, micro, expected", [(64, 2, 8, (8, 4)), (24, 2, 8, (6, 2)), (16, 2, 8, (8, 1)),
                                                          (14, 2, 8, (7, 1)), (6, 3, 8, (2, 1))])
def test_a_global_batch_is_split_with_the_largest_micro_batch_allowed(size, world, micro, expected):
    from distlr.core.scaling import split_global_batch

    assert split_global_batch(size, world, micro) == expected


def test_a_size_the_ranks_cannot_form_names_the_nearest_that_can():
    from distlr.core.scaling import split_global_batch

    with pytest.raises(ValueError, match="15 cannot be formed by 2 ranks .* the nearest that can: 14 or 16"):
        split_global_batch(15, 2, 8)
    with pytest.raises(ValueError, match="the nearest that can: 4$"):
        split_global_batch(3, 4, 8)


# -- scenarios (every rank runs them) ------------------------------------------------------------


def _finder(model, optimizer):
    from distlr import LRFinder

    class Recording(LRFinder):
        """A finder that notes the state digest after each of the series' runs."""

        after_each: list[str] = []

        def find(self, *args, **kwargs):
            result = super().find(*args, **kwargs)
            self.after_each.append(state_digest(model, optimizer))
            return result

    loader = DataLoader(regression_data(n=1024), batch_size=8, shuffle=True)
    return Recording(model, loader, optimizer, mse, device="cpu")


@scenarios
def series(out: Path) -> dict:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with _finder(model, optimizer) as finder:
        before = fingerprint(model, optimizer)
        result = finder.series([16, 32, 64], repeats=2, target_global_batch_size=1024, **RANGE)
        return {"series": result.to_dict(), "before": digest(before), "after_each": finder.after_each,
                "after": state_digest(model, optimizer)}


@scenarios
def fsdp2(out: Path) -> dict:
    """The same series on an FSDP2 model: each rank restores its own shards after every run."""
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with _finder(model, optimizer) as finder:
        before = state_digest(model, optimizer)
        result = finder.series([16, 32], repeats=1, **RANGE)
        return {"series": result.to_dict(), "before": before, "after_each": finder.after_each}


@scenarios
def diverging(out: Path) -> dict:
    """Every run diverges on its first steps (an LR of 1e3 on SGD): recorded, the series goes on."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with _finder(model, optimizer) as finder:
        result = finder.series([16, 32], repeats=1, min_lr=1e3, max_lr=1e5, num_steps=10)
    return {"series": result.to_dict()}


@scenarios
def refused(out: Path) -> dict:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    errors = {}
    with _finder(model, optimizer) as finder:
        for name, kwargs in {"odd": dict(global_batch_sizes=[16, 15]), "repeats": dict(repeats=0),
                             "accumulation": dict(global_batch_sizes=[16], accumulation_steps=2)}.items():
            try:
                finder.series(**kwargs, **RANGE)
                errors[name] = None
            except ValueError as e:
                errors[name] = str(e)
        errors["runs"] = len(finder.after_each)
    return errors


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("series")
    job = launch(MODULE, out, ["series", "fsdp2", "diverging", "refused"])
    assert job.returncode == 0, job.explain()
    return out


def test_every_run_and_the_whole_series_leave_the_state_as_it_was_on_every_rank(two_ranks):
    for record in read_ranks(two_ranks, "series"):
        assert len(record["after_each"]) == 6
        assert set(record["after_each"]) == {record["before"]} and record["after"] == record["before"]


def test_an_fsdp2_model_is_swept_and_each_rank_gets_its_shards_back_after_every_run(two_ranks):
    ranks = read_ranks(two_ranks, "fsdp2")
    assert ranks[0]["series"] == ranks[1]["series"]
    assert [r["result"]["global_batch_size"] for r in ranks[0]["series"]["runs"]] == [16, 32]
    for record in ranks:
        assert record["after_each"] == [record["before"]] * 2


def test_the_ranks_agree_on_every_run_and_each_run_is_split_and_seeded_as_planned(two_ranks):
    ranks = read_ranks(two_ranks, "series")
    assert ranks[0]["series"] == ranks[1]["series"]
    series = ranks[0]["series"]
    plan = [(r["global_batch_size"], r["repeat"], r["seed"], r["micro_batch_size"], r["accumulation_steps"])
            for r in series["runs"]]
    assert plan == [(16, 0, 0, 8, 1), (16, 1, 1, 8, 1), (32, 0, 0, 8, 2), (32, 1, 1, 8, 2), (64, 0, 0, 8, 4),
                    (64, 1, 1, 8, 4)]
    assert [r["result"]["global_batch_size"] for r in series["runs"]] == [16, 16, 32, 32, 64, 64]
    # Two repeats read two data orders: their curves differ.
    assert series["runs"][0]["result"]["losses"] != series["runs"][1]["result"]["losses"]
    answered = [r for r in series["runs"] if r["result"]["optimal_lr"] is not None]
    if len({r["global_batch_size"] for r in answered}) >= 2:
        assert series["fit"]["points"] == len(answered)
        assert series["prediction"]["extrapolation"] is True and series["prediction"]["global_batch_size"] == 1024


def test_a_point_that_diverges_at_once_is_recorded_and_the_series_goes_on(two_ranks):
    series = read_ranks(two_ranks, "diverging")[0]["series"]
    assert [r["global_batch_size"] for r in series["runs"]] == [16, 32]
    for run in series["runs"]:
        assert run["result"]["stop_reason"] in ("diverged", "non_finite") and run["result"]["optimal_lr"] is None
    assert series["fit"] is None and series["spread"]["16"]["answered"] == 0


def test_impossible_sizes_and_arguments_are_refused_before_any_run_on_every_rank(two_ranks):
    ranks = read_ranks(two_ranks, "refused")
    assert ranks[0] == ranks[1]
    errors = ranks[0]
    assert "15 cannot be formed by 2 ranks" in errors["odd"] and "14 or 16" in errors["odd"]
    assert "repeats=0 is not allowed" in errors["repeats"]
    assert "accumulation_steps=2 with global_batch_sizes" in errors["accumulation"]
    assert "leave accumulation_steps out" in errors["accumulation"]
    assert errors["runs"] == 0


def test_the_cli_writes_series_json_and_series_png_under_torchrun(tmp_path):
    out = tmp_path / "run"
    job = torchrun(["-m", "distlr", "--config", "configs/series-demo.yaml", "--num-steps", "30",
                    "--global-batch-sizes", "16,32", "--output-dir", str(out), "--no-progress"], nproc=2)
    assert job.returncode == 0, job.explain()
    series = json.loads((out / "series.json").read_text())
    assert len(series["runs"]) == 4 and series["world_size"] == 2
    assert {r["result"]["world_size"] for r in series["runs"]} == {2}
    assert "fit: " in job.output and "global batch | micro x ranks x accum" in job.output
    assert (out / "series.png").read_bytes().startswith(b"\x89PNG")
    assert not (out / "result.json").exists()


def test_find_optimal_lr_with_repeats_returns_the_geometric_mean_of_the_series():
    from distlr import LRFinder, find_optimal_lr

    def loader():
        return DataLoader(regression_data(n=1024), batch_size=16, shuffle=True)

    kwargs = dict(repeats=3, min_lr=1e-4, max_lr=10.0, num_steps=40)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = state_digest(model, optimizer)
    lr = find_optimal_lr(model, loader(), optimizer=optimizer, criterion=mse, device="cpu", **kwargs)
    assert type(lr) is float and state_digest(model, optimizer) == before
    # The same three range tests by hand: the spread is on the series.
    with LRFinder(model, loader(), optimizer, mse, device="cpu") as finder:
        series = finder.series(None, **kwargs)
    found = [r.result.optimal_lr for r in series.runs if r.result.optimal_lr is not None]
    [spread] = series.spreads().values()
    assert len(series.runs) == 3 and spread.answered == len(found) >= 1
    assert lr == pytest.approx(math.exp(sum(map(math.log, found)) / len(found)), rel=1e-12) == spread.geometric_mean


@scenarios
def zero(out: Path) -> dict:
    """A user's ZeRO-2 engine: repeats at one size run; sizes needing another accumulation are refused."""
    from distlr import LRFinder
    from helpers import deepspeed_engine, ds_config

    model = mlp()
    engine = deepspeed_engine(model, ds_config(2), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    loader = DataLoader(regression_data(n=1024), batch_size=8, shuffle=True)
    with LRFinder(engine, loader, None, mse) as finder:
        try:
            finder.series([16, 32], **RANGE)
            refused = None
        except ValueError as e:
            refused = str(e)
        series = finder.series([16], repeats=2, **RANGE)
    return {"refused": refused, "series": series.to_dict()}


def test_under_deepspeed_repeats_run_and_sizes_needing_another_split_are_refused(tmp_path):
    pytest.importorskip("deepspeed")
    job = launch(MODULE, tmp_path, ["zero"])
    assert job.returncode == 0, job.explain()
    for record in read_ranks(tmp_path, "zero"):
        assert "need [1, 2] accumulation steps, but the DeepSpeed engine accumulates 1 micro-batch(es) a step" in record["refused"]
        runs = record["series"]["runs"]
        assert [(r["global_batch_size"], r["repeat"]) for r in runs] == [(16, 0), (16, 1)]
        assert all(len(r["result"]["losses"]) > 0 for r in runs)


def test_repeats_alone_keep_the_finders_accumulation():
    from distlr import LRFinder

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with LRFinder(model, DataLoader(regression_data(n=512), batch_size=8), optimizer, mse, device="cpu") as finder:
        series = finder.series(repeats=2, accumulation_steps=2, **RANGE)
    assert [(r.global_batch_size, r.micro_batch_size, r.accumulation_steps) for r in series.runs] == [(16, 8, 2)] * 2
    assert {r.result.global_batch_size for r in series.runs} == {16}


def test_a_loader_with_a_sampler_of_its_own_is_refused_before_any_run():
    from torch.utils.data import WeightedRandomSampler

    from distlr import LRFinder

    model = mlp()
    data = regression_data(n=256)
    loader = DataLoader(data, batch_size=8, sampler=WeightedRandomSampler([1.0] * 256, 256))
    before = state_digest(model)
    with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu") as finder:
        with pytest.raises(ValueError, match="would drop its WeightedRandomSampler; pass a DataLoader with shuffle"):
            finder.series([8, 16], **RANGE)
    assert state_digest(model) == before

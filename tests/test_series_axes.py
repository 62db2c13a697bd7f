"""Series beyond batch size. Width: does the LR transfer? Under 2 ranks, a standard MLP trained
with SGD (whose largest stable LR falls as 1/width) must show an exponent beyond its standard
error, and a muP MLP (``mup``'s MuReadout and MuAdamW) one within it; each run's model is
fresh from one seed and the user's own model comes back. Horizon: range tests of several
lengths. The bend of the batch law is checked on synthetic suggestions in test_scaling_fit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import Scenarios, launch, read_ranks, state_digest

pytestmark = pytest.mark.timeout(600)
MODULE = "test_series_axes"
scenarios = Scenarios()
WIDTHS = [64, 256, 1024]
RANGE = dict(min_lr=1e-5, max_lr=10.0, num_steps=60)


def teacher_task(seed: int = 0) -> TensorDataset:
    """A regression onto a fixed random two-layer tanh network: hard enough that the loss keeps
    falling until the LR is too high, so the turn-up (and the suggestion) tracks stability."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8192, 32, generator=g)
    w1, w2 = torch.randn(32, 256, generator=g) / 32 ** 0.5, torch.randn(256, 1, generator=g) / 256 ** 0.5
    return TensorDataset(x, torch.tanh(x @ w1) @ w2)


def standard_mlp(width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
    return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


class MuMLP(nn.Module):
    def __init__(self, width: int) -> None:
        import mup

        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.out = mup.MuReadout(width, 1, readout_zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


def mup_mlp(width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """muP as its authors' package sets it up: base shapes from widths 64 and 128, hidden weights
    re-initialised for them, and MuAdamW (which scales each group's LR by its width)."""
    import mup

    model = MuMLP(width)
    mup.set_base_shapes(model, MuMLP(64), delta=MuMLP(128))
    for layer in (model.body[0], model.body[2]):
        mup.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    return model, mup.MuAdamW(model.parameters(), lr=1e-3)


# -- scenarios (every rank runs them) ------------------------------------------------------------


@scenarios
def width(out: Path, kind: str) -> dict:
    from distlr import LRFinder

    factory = {"standard": standard_mlp, "mup": mup_mlp}[kind]
    model, optimizer = factory(WIDTHS[0])
    loader = DataLoader(teacher_task(), batch_size=128, shuffle=True)
    before, rng_before = state_digest(model, optimizer), torch.get_rng_state()
    with LRFinder(model, loader, optimizer, criterion=nn.MSELoss(), device="cpu") as finder:
        series = finder.series(widths=WIDTHS, model_factory=factory, repeats=2, target_width=4096, **RANGE,
                               progress=False)
    return {"series": series.to_dict(), "before": before, "after": state_digest(model, optimizer),
            "rng_kept": bool(torch.equal(rng_before, torch.get_rng_state()))}


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def width_runs(tmp_path_factory):
    pytest.importorskip("mup")
    out = tmp_path_factory.mktemp("widths")
    job = launch(MODULE, out, ["width:standard", "width:mup"], timeout=560)
    assert job.returncode == 0, job.explain()
    return out


def test_a_standard_mlps_lr_moves_with_width_beyond_its_standard_error(width_runs):
    ranks = read_ranks(width_runs, "width:standard")
    assert ranks[0]["series"] == ranks[1]["series"]  # every rank has the same series
    series = ranks[0]["series"]
    assert series["axis"] == "width" and series["values"] == WIDTHS and len(series["runs"]) == 6
    transfer = series["transfer"]
    assert transfer["verdict"] == "moves", transfer["sentence"]
    assert transfer["exponent_high"] < 0  # smaller LRs for wider models, beyond the 95 % interval
    spread = series["spread"]
    assert spread["64"]["geometric_mean"] > 4 * spread["1024"]["geometric_mean"]
    prediction = series["prediction"]
    assert prediction["extrapolation"] and prediction["lr_low"] < prediction["lr"] < prediction["lr_high"]
    assert prediction["lr"] < spread["1024"]["geometric_mean"]  # wider still: lower still
    assert all(r["width"] in WIDTHS for r in series["runs"])
    assert all(rank["after"] == rank["before"] and rank["rng_kept"] for rank in ranks)  # the user's model is back


def test_a_mup_mlps_lr_transfers_across_widths(width_runs):
    ranks = read_ranks(width_runs, "width:mup")
    assert ranks[0]["series"] == ranks[1]["series"]
    transfer = ranks[0]["series"]["transfer"]
    assert transfer["verdict"] == "transfers", transfer["sentence"]
    assert transfer["exponent_low"] < 0 < transfer["exponent_high"] and transfer["seed_spread"] is not None
    assert all(rank["after"] == rank["before"] for rank in ranks)


def test_a_width_series_needs_a_factory_and_one_axis_at_a_time():
    from distlr import LRFinder

    model, optimizer = standard_mlp(8)
    loader = DataLoader(teacher_task(), batch_size=64)
    with LRFinder(model, loader, optimizer, criterion=nn.MSELoss()) as finder:
        with pytest.raises(ValueError, match="widths=... needs model_factory"):
            finder.series(widths=[8, 16])
        with pytest.raises(ValueError, match="global_batch_sizes and widths: a series varies one thing at a time"):
            finder.series([64, 128], widths=[8, 16], model_factory=standard_mlp)
        with pytest.raises(ValueError, match=r"num_steps_series=\[50\] is not allowed; use two or more"):
            finder.series(num_steps_series=[50])
        with pytest.raises(ValueError, match="num_steps=30 with num_steps_series"):
            finder.series(num_steps_series=[20, 40], num_steps=30)


def test_a_horizon_series_shows_the_suggestion_for_each_length(tmp_path):
    from distlr import LRFinder

    model, optimizer = standard_mlp(32)
    loader = DataLoader(teacher_task(), batch_size=64, shuffle=True)
    with LRFinder(model, loader, optimizer, criterion=nn.MSELoss()) as finder:
        series = finder.series(num_steps_series=[20, 40, 80], min_lr=1e-5, max_lr=10.0, progress=False)
    data = series.to_dict()
    assert data["axis"] == "num_steps" and data["values"] == [20, 40, 80]
    assert [r["result"]["num_steps"] for r in data["runs"]] == [20, 40, 80]
    assert all(r["result"]["optimal_lr"] is not None for r in data["runs"])
    assert data["fit"] is not None and data["transfer"] is None and data["bend"] is None
    from distlr.output.summary import series_summary

    table = series_summary(series)
    assert "   num_steps | micro x ranks x accum" in table and "short-horizon bias" in table
    assert all(f"{run.result.optimal_lr:.3e}" in table for run in series.runs)  # one run per length: its own row
    json.dumps(data, allow_nan=False)


def test_the_cli_runs_width_and_horizon_series_and_draws_them(tmp_path, capsys):
    from distlr.__main__ import main

    fast = ["--batch-size", "4", "--seq-len", "16", "--no-progress"]
    out = tmp_path / "widths"
    assert main(["--model", "cli_factories:tiny_lm", "--widths", "16,32", "--num-steps", "15", *fast,
                 "--output-dir", str(out)]) == 0
    series = json.loads((out / "series.json").read_text())
    assert series["axis"] == "width" and [r["width"] for r in series["runs"]] == [16, 32]
    assert (out / "series.png").read_bytes()[:4] == b"\x89PNG"
    assert "       width | micro x ranks x accum" in capsys.readouterr().out
    out = tmp_path / "horizon"
    assert main(["--num-steps-series", "10,20", *fast, "--output-dir", str(out)]) == 0
    series = json.loads((out / "series.json").read_text())
    assert series["axis"] == "num_steps" and [r["result"]["num_steps"] for r in series["runs"]] == [10, 20]
    # The saved config holds what was run, so it runs again: not the num_steps the series decided.
    assert "num_steps" not in (out / "config.yaml").read_text().replace("num_steps_series", "")
    assert main(["--config", str(out / "config.yaml"), "--output-dir", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    # A length or accumulation the series decides is refused when set, even at its default value.
    assert main(["--num-steps-series", "10,20", "--num-steps", "100", *fast]) == 2
    assert "num_steps=100 with num_steps_series" in capsys.readouterr().err
    assert main(["--global-batch-sizes", "8,16", "--accumulation-steps", "1", *fast]) == 2
    assert "accumulation_steps=1 with global_batch_sizes" in capsys.readouterr().err
    assert main(["--widths", "16,32", "--output-dir", str(tmp_path / "x")]) == 2
    assert "widths='16,32' needs --model as a 'package.module:function' factory" in capsys.readouterr().err


def test_a_config_file_at_the_default_runs_a_series_and_a_flag_or_another_value_is_refused():
    """config.yaml files saved before the series left num_steps and accumulation_steps out hold
    them at their defaults: they must run again. A flag, even at the default, is refused (it
    would be ignored), and so is any other value, from a file or a flag."""
    from distlr.cli.config import RunConfig

    RunConfig.from_dict({"num_steps_series": "10,20", "num_steps": 100})
    RunConfig.from_dict({"global_batch_sizes": "8,16", "accumulation_steps": 1})
    with pytest.raises(ValueError, match=r"num_steps=100 with num_steps_series: .* leave num_steps out"):
        RunConfig.from_dict({"num_steps_series": "10,20", "num_steps": 100}, flags={"num_steps"})
    with pytest.raises(ValueError, match=r"num_steps=50 with num_steps_series"):
        RunConfig.from_dict({"num_steps_series": "10,20", "num_steps": 50})
    with pytest.raises(ValueError, match=r"accumulation_steps=2 with global_batch_sizes"):
        RunConfig.from_dict({"global_batch_sizes": "8,16", "accumulation_steps": 2})

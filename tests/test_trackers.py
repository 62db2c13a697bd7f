"""The result where users look: TensorBoard, MLflow and W&B (offline), read back with each
tracker's own reader; from the CLI (--report-to), from LRFinder.report, and from a Trainer's
args.report_to (with lr_finder.json and the PNG in its output_dir, never written over)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import REPO, mlp, mse, regression_data

pytestmark = pytest.mark.timeout(300)


def tensorboard_curve(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    out = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    out["images"] = tags["images"]
    return out


def assert_tensorboard_has(result: dict, log_dir: Path) -> None:
    curve = tensorboard_curve(log_dir)
    expected = [(round(1000 * math.log10(lr)), loss) for lr, loss in zip(result["lrs"], result["losses"])]
    assert [s for s, _ in curve["lr_finder/loss"]] == [s for s, _ in expected]
    assert [v for _, v in curve["lr_finder/loss"]] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert curve["images"] == ["lr_finder/plot"]


def mlflow_run(tracking_uri: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    [experiment] = client.search_experiments()
    [run] = client.search_runs([experiment.experiment_id])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "lr_finder")]
    curve = json.loads(Path(client.download_artifacts(run.info.run_id, "lr_finder/curve.json")).read_text())
    return run, artifacts, curve


def wandb_run(directory: Path) -> tuple[dict, bytes]:
    [run] = list(directory.glob("wandb/offline-run-*"))
    [table] = list(run.glob("files/media/table/lr_finder/curve_*.table.json"))
    [log] = list(run.glob("run-*.wandb"))
    return json.loads(table.read_text()), log.read_bytes()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("trackers")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "WANDB_SILENT": "true",
           "HOME": str(tmp)}
    env.pop("WANDB_MODE", None)
    out = tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "distlr", "--num-steps", "25", "--no-extend-range", "--output-dir", str(out),
                           "--report-to", "tensorboard,mlflow,wandb", "--no-progress"],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, json.loads((out / "result.json").read_text()), proc.stdout, env["MLFLOW_TRACKING_URI"]


def test_the_cli_logs_the_curve_keyed_by_lr_to_tensorboard(cli_run):
    out, result, stdout, _ = cli_run
    assert f"logged to tensorboard: {out / 'lr_finder'}" in stdout
    assert_tensorboard_has(result, out / "lr_finder")


def test_the_cli_logs_a_run_of_its_own_to_mlflow_with_the_suggestion_as_a_summary(cli_run):
    _, result, stdout, uri = cli_run
    run, artifacts, curve = mlflow_run(uri)
    assert run.info.run_name == "lr-finder" and "logged to mlflow: run " + run.info.run_id in stdout
    assert run.data.metrics["suggested_lr"] == pytest.approx(result["optimal_lr"], rel=1e-12)
    assert set(artifacts) == {"lr_finder/curve.json", "lr_finder/result.json", "lr_finder/lr_finder.png"}
    rows = [dict(zip(curve["columns"], row)) for row in curve["data"]]
    assert [r["lr"] for r in rows] == pytest.approx(result["lrs"], rel=5e-3) and len(rows) == 25  # json: 3 digits


def test_the_cli_logs_an_offline_wandb_run_with_the_curve_and_the_summary(cli_run):
    out, result, stdout, _ = cli_run
    table, log = wandb_run(out)
    assert "(offline)" in stdout
    assert table["columns"] == ["lr", "loss", "smoothed_loss"]
    assert [row[0] for row in table["data"]] == pytest.approx(result["lrs"], rel=5e-3)
    assert [row[1] for row in table["data"]] == pytest.approx(result["losses"])
    # The run's own log (protobuf records) holds the summary key and its JSON value.
    assert b"suggested_lr" in log and json.dumps(result["optimal_lr"]).encode() in log


def test_a_misspelled_tracker_fails_before_any_step_naming_the_closest(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distlr", "--output-dir", str(tmp_path / "run"),
                           "--report-to", "tensorbord"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "report_to='tensorbord' is not a tracker distlr logs to; did you mean 'tensorboard'?" in proc.stderr
    assert "step" not in proc.stdout and not (tmp_path / "run").exists()


def test_lrfinder_report_logs_the_last_result(tmp_path):
    pytest.importorskip("tensorboard")
    from distlr import LRFinder

    model = mlp()
    loader = DataLoader(regression_data(n=512), batch_size=16, shuffle=True)
    with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu") as finder:
        with pytest.raises(RuntimeError, match="call find\\(\\) first"):
            finder.report("tensorboard", log_dir=tmp_path)
        result = finder.find(min_lr=1e-4, max_lr=1.0, num_steps=20)
        assert finder.report("tensorboard", log_dir=tmp_path) == [f"tensorboard: {tmp_path / 'lr_finder'}"]
    assert_tensorboard_has(result.to_dict(), tmp_path / "lr_finder")


def test_a_trainer_gets_lr_finder_files_in_its_output_dir_and_follows_its_report_to(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from test_transformers import trainer_for

    from distlr.integrations.transformers import find_lr

    out = tmp_path / "out"
    out.mkdir()
    (out / "lr_finder.png").write_bytes(b"the user's own file")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "logs"))  # as for the Trainer's own logs
    trainer = trainer_for(out, report_to=["tensorboard"])
    first = find_lr(trainer, min_lr=1e-5, max_lr=1.0, num_steps=15)
    second = find_lr(trainer, min_lr=1e-5, max_lr=1.0, num_steps=15)
    # lr_finder.png was there: each result and its figure take the next free name, together.
    assert (out / "lr_finder.png").read_bytes() == b"the user's own file" and not (out / "lr_finder.json").exists()
    for name, result in (("lr_finder-1", first), ("lr_finder-2", second)):
        assert json.loads((out / f"{name}.json").read_text())["losses"] == result.losses
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert_tensorboard_has(first.to_dict(), tmp_path / "logs" / "lr_finder")
    assert_tensorboard_has(second.to_dict(), tmp_path / "logs" / "lr_finder-1")  # a run of its own

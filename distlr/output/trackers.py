"""The result where users look: TensorBoard, MLflow and Weights & Biases (opt in, rank 0 only).

Each tracker gets the curve keyed by learning rate, the figure, and ``suggested_lr`` (with the
peak, stop reason and range) as a summary, in a run of its own (``lr-finder``), so that the
range test's points are never steps of the user's training run:

- ``tensorboard``: a ``SummaryWriter`` in ``<log_dir>/lr_finder`` (``lr_finder-1``, ... for
  later range tests); the curve as the scalar
  ``lr_finder/loss`` (and ``lr_finder/smoothed_loss``) at step ``round(1000 * log10(lr))``,
  so that TensorBoard's x-axis reads as log10(LR) x 1000; the figure; the suggestion as text
  and as an hparams summary.
- ``mlflow``: a run named ``lr-finder`` (nested under the active run, if any) in the tracking
  store MLflow is configured with (``MLFLOW_TRACKING_URI``, else its default); the curve as the
  table ``lr_finder/curve.json``, the figure, ``result.json``, and the summary as metrics that
  are logged once.
- ``wandb``: a run with ``job_type="lr_finder"``, offline unless ``WANDB_MODE`` says
  otherwise (so that no job waits for a login); the curve as a table and a line chart of loss
  against LR, the figure, and the summary in ``run.summary``.

Which trackers are installed is checked before the range test (``check``); the packages are the
``trackers`` extra.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distlr.core.options import closest
from distlr.core.result import LRFinderResult
from distlr.output.files import free_name

logger = logging.getLogger("distlr")

TRACKERS = ("tensorboard", "mlflow", "wandb")
"""Each tracker's name is also the module it needs."""
RUN_NAME = "lr-finder"
X_SCALE = 1000
"""TensorBoard's x-axis is an integer step: a point at LR ``lr`` is logged at
``round(1000 * log10(lr))``, distinct for ladders up to a few thousand points a decade."""


def parse(report_to: str | Iterable[str] | None) -> tuple[str, ...]:
    """``report_to`` as tracker names: a comma-separated string or a list; "none" (or empty)
    is none; "all" is every supported tracker that is installed (as Hugging Face reads it).

    Raises:
        ValueError: a name that is not a supported tracker (with the closest one).
    """
    if report_to is None:
        return ()
    items = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        return tuple(name for name in TRACKERS if _installed(name))
    for name in names:
        if name not in TRACKERS:
            close = closest(name, TRACKERS)
            hint = f"; did you mean {close!r}?" if close else ""
            raise ValueError(f"report_to={name!r} is not a tracker distlr logs to{hint} "
                             f"(allowed: {', '.join(TRACKERS)}, all, none)")
    return tuple(dict.fromkeys(names))


def check(names: Iterable[str]) -> None:
    """Raise ImportError naming each tracker in ``names`` whose package is not installed."""
    missing = [name for name in names if not _installed(name)]
    if missing:
        raise ImportError(f"report_to={','.join(missing)}: not installed; pip install 'distlr[trackers]' "
                          f"(or {' '.join(missing)})")


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def summary_of(result: LRFinderResult) -> dict[str, float]:
    """The numbers a tracker keeps once per range test (absent ones left out)."""
    values = {"suggested_lr": result.optimal_lr, "peak_lr": result.peak_lr, "min_lr": result.min_lr,
              "max_lr": result.max_lr, "steps_run": len(result.losses)}
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


class Reported(list):
    """Where each tracker put the result (a list of lines), and ``failed``: one line per tracker
    that could not take it (its name and the cause)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: list[str] = []


def log(result: LRFinderResult, names: Iterable[str], *, figure: Path | None, log_dir: Path) -> Reported:
    """Send ``result`` to each tracker in ``names``; return where each one put it.

    Fails soft: the result is already on disk when this runs, so a tracker that raises (a bad
    tracking URI, a full disk, a server down) is a warning naming it and the cause, recorded in
    the return value's ``failed``, and the other trackers still get the result.

    ``figure``: the plot PNG, if drawn. ``log_dir``: where TensorBoard writes (and W&B keeps
    its offline run).
    """
    reported = Reported()
    for name in names:
        try:
            reported.append(_LOGGERS[name](result, figure, Path(log_dir)))
        except Exception as err:  # noqa: BLE001 - any tracker failure, named and kept from the result
            cause = (str(err).strip().splitlines() or [""])[0][:300]
            reported.failed.append(f"{name}: {type(err).__name__}: {cause}")
            logger.warning("distlr: warning: reporting to %s failed (%s: %s); the result itself is written",
                           name, type(err).__name__, cause)
    return reported


def _curve(result: LRFinderResult) -> list[tuple[float, float, float]]:
    return list(zip(result.lrs, result.losses, result.smoothed_losses))


def _tensorboard(result: LRFinderResult, figure: Path | None, log_dir: Path) -> str:
    from torch.utils.tensorboard import SummaryWriter

    path = free_name(log_dir / "lr_finder")  # a run directory of its own, even for a second range test
    writer = SummaryWriter(log_dir=str(path))
    try:
        for lr, loss, smoothed in _curve(result):
            if lr > 0 and math.isfinite(loss):
                step = round(X_SCALE * math.log10(lr))
                writer.add_scalar("lr_finder/loss", loss, step)
                writer.add_scalar("lr_finder/smoothed_loss", smoothed, step)
        if figure is not None and figure.is_file():
            import numpy as np
            from matplotlib.image import imread

            image = (imread(figure)[..., :3] * 255).astype(np.uint8)
            writer.add_image("lr_finder/plot", image, dataformats="HWC")
        writer.add_text("lr_finder/suggestion", _sentence(result))
        numbers = summary_of(result)
        writer.add_hparams({"min_lr": result.min_lr, "max_lr": result.max_lr, "num_steps": result.num_steps},
                           {f"lr_finder/{k}": v for k, v in numbers.items() if k not in ("min_lr", "max_lr")},
                           run_name=".")
    finally:
        writer.close()
    return f"tensorboard: {path}"


def _mlflow(result: LRFinderResult, figure: Path | None, log_dir: Path) -> str:
    import mlflow

    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=RUN_NAME, nested=nested) as run:
        mlflow.set_tags({"distlr.stop_reason": result.stop_reason, "distlr.method": result.suggestion_method})
        mlflow.log_metrics(summary_of(result))
        lrs, losses, smoothed = zip(*_curve(result)) if result.lrs else ((), (), ())
        mlflow.log_table({"lr": list(lrs), "loss": list(losses), "smoothed_loss": list(smoothed)},
                         artifact_file="lr_finder/curve.json")
        mlflow.log_dict(json.loads(result.to_json()), "lr_finder/result.json")
        if figure is not None and figure.is_file():
            mlflow.log_artifact(str(figure), artifact_path="lr_finder")
    return f"mlflow: run {run.info.run_id} ({mlflow.get_tracking_uri()})"


def _wandb(result: LRFinderResult, figure: Path | None, log_dir: Path) -> str:
    import wandb

    log_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(log_dir), name=RUN_NAME,
                     job_type="lr_finder", reinit="create_new",
                     config={"min_lr": result.min_lr, "max_lr": result.max_lr, "num_steps": result.num_steps})
    try:
        table = wandb.Table(columns=["lr", "loss", "smoothed_loss"], data=[list(p) for p in _curve(result)])
        logged: dict[str, Any] = {"lr_finder/curve": table,
                                  "lr_finder/loss_vs_lr": wandb.plot.line(table, "lr", "loss", title="loss vs LR")}
        if figure is not None and figure.is_file():
            logged["lr_finder/plot"] = wandb.Image(str(figure))
        run.log(logged)
        for key, value in summary_of(result).items():
            run.summary[key] = value
        run.summary["stop_reason"] = result.stop_reason
    finally:
        run.finish()
    return f"wandb: {run.dir} ({run.settings.mode})"


def _sentence(result: LRFinderResult) -> str:
    if result.optimal_lr is None:
        return f"no suggestion: {result.suggestion_note}"
    return f"suggested lr {result.optimal_lr:.3e} ({result.suggestion_method}); stop: {result.stop_reason}"


_LOGGERS = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}

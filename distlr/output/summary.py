"""The few lines rank 0 prints when a range test or a series ends."""

from __future__ import annotations

from typing import Any

from distlr.core.result import LRFinderResult
from distlr.core.series import SeriesResult


def summary(result: LRFinderResult, cli: dict[str, Any] | None = None) -> str:
    """What the command line, ``find_lr`` and ``from_accelerator`` print: the result's full
    summary, with what the command line read and told."""
    lines = result.summary(full=True).split("\n")
    if cli and cli.get("inputs"):
        at = next(i for i, line in enumerate(lines) if line.startswith("range test:")) + 1
        lines.insert(at, f"data:         {describe_inputs(cli['inputs'])}")
    lines.extend(f"note:         {note}" for note in (cli or {}).get("notes") or [])
    return "\n".join(lines)


def series_summary(series: SeriesResult) -> str:
    """The terminal table of a series: each point's split and spread, the fit, what it says
    (the bend of a batch series, whether a width series transfers), the prediction."""
    from distlr.output.plot import AXES

    _, symbol = AXES[series.axis]
    label = {"global_batch_size": "global batch", "width": "width", "num_steps": "num_steps"}[series.axis]
    first = {v: run for v, run in zip(series.values(), series.runs)}
    lines = [f"{label:>12} | micro x ranks x accum | suggested lr (geo-mean)   min        max        answered"]
    for value, spread in series.spreads().items():
        run = first[value]
        split = f"{run.micro_batch_size} x {series.world_size} x {run.accumulation_steps}"
        lines.append(f"{value:>12} | {split:>20} | {_lr_or_dash(spread.geometric_mean):>23}   "
                     f"{_lr_or_dash(spread.min):<10} {_lr_or_dash(spread.max):<10} {spread.answered}/{spread.repeats}")
    fit = series.fit
    if fit is None:
        lines.append(f"fit: fewer than two {label}s gave a suggestion")
    else:
        err = "" if fit.exponent_stderr is None else f" ± {fit.exponent_stderr:.2f}"
        reading = {"global_batch_size": " (square-root scaling: 0.5, linear: 1)",
                   "width": " (0: the LR transfers across widths)",
                   "num_steps": " (the range test's short-horizon bias)"}[series.axis]
        exponent = round(fit.exponent, 3) + 0.0  # + 0.0: equal suggestions give -4e-16, printed as 0.000, not -0.000
        lines.append(f"fit: lr = {fit.coefficient:.3e} * {symbol}^{exponent:.3f}{err} over {fit.points} runs{reading}")
    if series.bend is not None:
        lines.append(f"bend: {series.bend.describe()}")
    transfer = series.transfer()
    if transfer is not None:
        lines.append(f"transfer: {transfer['sentence']}")
    prediction = series.prediction()
    if prediction is not None:
        where = ("EXTRAPOLATED outside the values run" if prediction["extrapolation"] else "within the values run")
        band = ("" if prediction.get("lr_low") is None
                else f", {prediction['lr_low']:.3e} to {prediction['lr_high']:.3e} ({prediction['level']:.0%})")
        law = "the same LR at every width" if prediction["law"] == "flat" else "the fit"
        lines.append(f"predicted lr at {label} {prediction['value']}: {prediction['lr']:.3e}{band}, from {law} "
                     f"({where})")
    if not series.complete:
        lines.append(f"incomplete: {len(series.runs)} of {series.planned} runs finished")
    return "\n".join(lines)


def describe_inputs(inputs: dict) -> str:
    """One line of what the command line read: ``12,345 tokens from 2 files (token files), 192
    sequences of 64, 96 per rank``."""
    parts = [str(inputs.get("source", "data"))]
    if "tokens" in inputs:
        files = inputs.get("files") or []
        where = f" from {len(files)} file(s)" if files else ""
        parts.insert(0, f"{inputs['tokens']:,} tokens{where}")
    if "sequences" in inputs:
        per_rank = f", {inputs['sequences_per_rank']:,} per rank" if "sequences_per_rank" in inputs else ""
        parts.append(f"{inputs['sequences']:,} sequences of {inputs['seq_len']}{per_rank}")
    return "; ".join(parts)


def _lr_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"

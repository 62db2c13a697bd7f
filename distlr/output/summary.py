"""The few lines rank 0 prints when a range test or a series ends."""

from __future__ import annotations

from typing import Any

from distlr.core.result import LRFinderResult
from distlr.core.scaling import SeriesResult


def summary(result: LRFinderResult, cli: dict[str, Any] | None = None) -> str:
    """A few lines for the terminal: the suggestion (or why there is none), how firm it is,
    what was wrong with the range, how the run ended."""
    lines = []
    if result.optimal_lr is not None:
        lines.append(f"suggested lr: {result.optimal_lr:.3e}  ({result.suggestion_method}; constant LR)")
        if result.peak_lr is not None:
            plateau = (result.schedule or {}).get("wsd", {}).get("plateau_lr")
            wsd = f"; warmup-stable-decay plateau {plateau:.3e}" if plateau is not None else ""
            lines.append(f"schedule:     one-cycle / warmup-cosine peak {result.peak_lr:.3e}{wsd}")
        spread = result.confidence
        if spread is not None:
            lines.append(f"band:         {spread['low']:.2e} .. {spread['high']:.2e} ({spread['spread']:.1f}x): where "
                         "another range test (another data order) lands 4 times in 5; --repeats 3 narrows it")
    else:
        lines.append(f"no suggestion ({result.suggestion_method}): {result.suggestion_note}")
    others = ", ".join(
        f"{name} {lr:.2e}" if lr is not None else f"{name} -" for name, lr in result.suggestions.items()
    )
    lines.append(f"all rules:    {others}")
    extended = f" and {result.extended_steps} past max_lr" if result.extended_steps else ""
    ended = {
        "completed": f"ran all {result.num_steps} steps{extended}",
        "diverged": f"loss diverged at step {_step_of(result)} (lr {_lr_at(result)}), stopped",
        "non_finite": f"loss was not finite at step {_step_of(result)} (lr {_lr_at(result)}), stopped",
    }[result.stop_reason]
    batch = f", global batch {result.global_batch_size}" if result.global_batch_size else ""
    lines.append(f"range test:   {ended}; {result.world_size} rank(s){batch}; {result.elapsed_s:.1f} s")
    if cli and cli.get("inputs"):
        lines.append(f"data:         {describe_inputs(cli['inputs'])}")
    lines.extend(f"range:        {note}" for note in result.range_notes)
    lines.extend(f"note:         {note}" for note in [*result.notes, *((cli or {}).get("notes") or [])])
    return "\n".join(lines)


def series_summary(series: SeriesResult) -> str:
    """The terminal table of a series: each batch size's split and spread, the fit, the prediction."""
    runs = {run.global_batch_size: run for run in series.runs}
    lines = ["global batch | micro x ranks x accum | suggested lr (geo-mean)   min        max        answered"]
    for size, spread in series.spreads().items():
        run = runs[size]
        split = f"{run.micro_batch_size} x {series.world_size} x {run.accumulation_steps}"
        lines.append(f"{size:>12} | {split:>20} | {_lr_or_dash(spread.geometric_mean):>23}   "
                     f"{_lr_or_dash(spread.min):<10} {_lr_or_dash(spread.max):<10} {spread.answered}/{spread.repeats}")
    fit = series.fit
    if fit is None:
        lines.append("fit: fewer than two batch sizes gave a suggestion")
    else:
        err = "" if fit.exponent_stderr is None else f" ± {fit.exponent_stderr:.2f}"
        lines.append(f"fit: lr = {fit.coefficient:.3e} * B^{fit.exponent:.3f}{err} over {fit.points} runs "
                     "(square-root scaling: 0.5, linear: 1)")
    prediction = series.prediction()
    if prediction is not None:
        where = ("EXTRAPOLATED outside the swept sizes" if prediction["extrapolation"]
                 else "within the swept sizes")
        lines.append(f"predicted lr at global batch {prediction['global_batch_size']}: {prediction['lr']:.3e} ({where})")
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


def _step_of(result: LRFinderResult) -> str:
    # Steps count from 1 here, as in the progress log.
    return "-" if result.diverged_at is None else str(result.diverged_at + 1)


def _lr_at(result: LRFinderResult) -> str:
    return f"{result.lrs[result.diverged_at]:.2e}" if result.diverged_at is not None else "-"


def _lr_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"

"""The loss-vs-LR plot, headless. It draws what the result holds and computes nothing."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from distlr.core.result import LRFinderResult
from distlr.core.series import SeriesResult
from distlr.output.files import atomic_path


def plot_result(
    result: LRFinderResult, output_path: str | Path, *, log_scale: bool = True, show_suggestion: bool = True
) -> Path:
    """Draw raw and smoothed loss against LR to ``output_path`` (PNG, or any format by suffix).

    Marks the suggested LR and the divergence point when there are any. Uses the Agg canvas
    directly, so no display is needed and the global matplotlib backend is left alone.

    Returns:
        The path written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is a core dependency
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from err

    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="0.7", linewidth=1, label="loss")
    if result.smoothed_losses:
        ax.plot(result.lrs, result.smoothed_losses, color="C0", linewidth=1.5, alpha=0.6,
                label="EMA (stop decision; lags)")
    if result.trend_losses:
        ax.plot(result.lrs, result.trend_losses, color="C0", linewidth=2,
                label="zero-lag trend (its turn-up is what the suggestion reads)")
    if result.val_losses:
        ax.plot([result.lrs[i] for i in result.val_steps], result.val_losses, "s-", color="C4", markersize=3,
                linewidth=1, label="validation loss")
    if result.extended_steps:
        ax.axvspan(result.max_lr, result.lrs[-1], color="0.5", alpha=0.08, linewidth=0,
                   label=f"range extended past max_lr={result.max_lr:.2g} ({result.extended_steps} steps)")
    if log_scale:
        ax.set_xscale("log")
    if show_suggestion and result.optimal_lr is not None and result.best_lr_idx is not None:
        y = (result.trend_losses or result.smoothed_losses or result.losses)[result.best_lr_idx]
        spread = result.confidence
        if spread is not None:
            ax.axvspan(spread["low"], spread["high"], color="C3", alpha=0.12, linewidth=0,
                       label=f"band: another range test's suggestion, 4 times in 5 ({spread['spread']:.1f}x)")
        ax.axvline(result.optimal_lr, color="C3", linestyle="--", linewidth=1)
        ax.plot([result.optimal_lr], [y], "o", color="C3",
                label=f"suggested {result.optimal_lr:.2e} ({result.suggestion_method}, constant)")
        if result.peak_lr is not None and result.peak_lr != result.optimal_lr:
            ax.axvline(result.peak_lr, color="C2", linestyle="-.", linewidth=1,
                       label=f"one-cycle / cosine peak {result.peak_lr:.2e}")
    if result.diverged_at is not None:
        ax.axvline(result.lrs[result.diverged_at], color="C1", linestyle=":", linewidth=1,
                   label=f"stopped: {result.stop_reason} at step {result.diverged_at + 1}")
    _limit_y(ax, result)
    footer = _footer(result)
    if footer:
        fig.text(0.01, 0.01, "\n".join(footer), fontsize="x-small", color="C3", va="bottom")
    ax.set_xlabel("learning rate" + (" (log scale)" if log_scale else ""))
    ax.set_ylabel("loss (mean over all ranks)")
    ax.set_title(f"LR range test: {len(result.losses)} steps, {result.world_size} rank(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout(rect=(0, 0.01 + 0.022 * len(footer), 1, 1))  # room for the footer lines
    path = Path(output_path)
    # An interrupted save never leaves half a PNG behind.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    return path


def _footer(result: LRFinderResult) -> list[str]:
    """The lines under the plot: why there is no suggestion, what was wrong with the range."""
    notes = list(result.range_notes)
    if result.optimal_lr is None and result.suggestion_note:
        notes.insert(0, f"no suggestion ({result.suggestion_method}): {result.suggestion_note}")
    return [line for note in notes for line in textwrap.wrap(note, 110)]


def _limit_y(ax, result: LRFinderResult) -> None:
    # Follow the descent and the minimum: from a little below the lowest smoothed loss to a
    # little above where the smoothed curve started its fall. The run-up to divergence and raw
    # spikes can sit far above and would flatten the part a reader needs.
    end = result.diverged_at if result.diverged_at is not None else len(result.losses)
    curve = [v for v in (result.trend_losses or result.smoothed_losses or result.losses)[:end] if math.isfinite(v)]
    if len(curve) < 2:
        return
    lowest = min(range(len(curve)), key=curve.__getitem__)
    high = max(curve[: lowest + 1])
    # The smoothed curve lags the raw one, which can fall further: include the raw losses, but
    # not their lowest 2 % (single batches that happened to be easy).
    raw = sorted(v for v in result.losses[:end] if math.isfinite(v))
    low = min(curve[lowest], raw[len(raw) // 50] if raw else curve[lowest])
    span = (high - low) or abs(high) or 1.0
    ax.set_ylim(low - 0.05 * span, high + 0.25 * span)


AXES = {"global_batch_size": ("global batch size", "B"), "width": ("width", "width"),
        "num_steps": ("num_steps", "T")}
"""Each series axis as the plot and the table name it, and its symbol in a fit."""
AXIS_TITLES = {"num_steps": "range-test length, num_steps"}
"""An axis whose name alone does not say what it is, as the plot's x-axis names it."""
REFERENCE_SLOPES = {
    "global_batch_size": ((0.5, ":", "square root"), (1.0, "--", "linear")),
    "width": ((0.0, ":", "transfers, as muP"), (-1.0, "--", "1/width, SP's stability limit")),
}
"""Published slopes to read a fit against: batch (Krizhevsky 2014; Goyal et al. 2017) and width
(Yang et al. 2022: flat under muP; under the standard parametrisation the largest stable LR
falls about as 1/width, for SGD through the readout and for Adam through every hidden layer)."""


def plot_series(series: SeriesResult, output_path: str | Path) -> Path:
    """One style for every axis of a series. Two panels: the smoothed curves overlaid, one
    colour per point of the axis (each repeat a line); and log-log suggested LR against the
    axis (global batch, width or num_steps), with the power-law fit, reference slopes
    (batch: square root and linear; width: flat, as muP promises, and 1/width, Adam's rule
    under the standard parametrisation), the bend where the batch law saturates, and the
    prediction at the target with its interval.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(12, 5), dpi=110)
    FigureCanvasAgg(fig)
    curves, scaling = fig.subplots(1, 2)
    name, symbol = AXES[series.axis]
    values = sorted(set(series.values()))
    colours = {v: f"C{i % 10}" for i, v in enumerate(values)}
    labelled: set[int] = set()
    for run, v in zip(series.runs, series.values()):
        result = run.result
        n = len(result.smoothed_losses)
        label = None if v in labelled else f"{name} {v}"
        labelled.add(v)
        curves.plot(result.lrs[:n], result.smoothed_losses, color=colours[v], alpha=0.8, label=label)
    curves.set_xscale("log")
    curves.set_xlabel("learning rate (log scale)")
    curves.set_ylabel("smoothed loss (mean over all ranks)")
    curves.set_title(f"range tests: {len(series.runs)} runs, {series.world_size} rank(s)"
                     + ("" if series.complete else f" (stopped: {len(series.runs)} of {series.planned})"))
    curves.grid(True, which="both", alpha=0.3)
    curves.legend(fontsize=8)
    losses = [v for run in series.runs for v in run.result.smoothed_losses if math.isfinite(v)]
    if losses:
        low, high = min(losses), sorted(losses)[int(0.95 * (len(losses) - 1))]
        curves.set_ylim(low - 0.05 * (high - low), high + 0.1 * (high - low))

    points = [(v, run.result.optimal_lr) for run, v in zip(series.runs, series.values()) if run.result.optimal_lr]
    for v, lr in points:
        scaling.scatter([v], [lr], color=colours[v], zorder=3)
    fit = series.fit
    prediction = series.prediction() if fit is not None else None
    if fit is not None:
        xs = [min(values), max(values)]
        if prediction is not None:
            xs = [min(xs[0], prediction["value"]), max(xs[1], prediction["value"])]
        err = "" if fit.exponent_stderr is None else f" ± {fit.exponent_stderr:.2f}"
        scaling.plot(xs, [fit.predict(x) for x in xs], color="k", label=f"fit: lr ∝ {symbol}^{fit.exponent:.2f}{err}")
        middle = math.sqrt(min(values) * max(values))
        for power, style, why in REFERENCE_SLOPES.get(series.axis, ()):
            ys = [fit.predict(middle) * (x / middle) ** power for x in xs]
            scaling.plot(xs, ys, color="grey", linestyle=style, label=f"{symbol}^{power:g} ({why})")
        bend = series.bend
        if bend is not None and bend.verdict == "bends":
            scaling.axvspan(bend.bend_low, bend.bend_high, color="C2", alpha=0.12,
                            label=f"LR stops rising: B ≈ {bend.bend:,.0f}")
        if prediction is not None:
            word = "extrapolated" if prediction["extrapolation"] else "interpolated"
            x, lr = prediction["value"], prediction["lr"]
            if prediction.get("lr_low") is not None:
                scaling.errorbar([x], [lr], yerr=[[lr - prediction["lr_low"]], [prediction["lr_high"] - lr]],
                                 color="C3", capsize=4, zorder=4)
            law = ", the same LR at every width" if prediction["law"] == "flat" else ""
            scaling.scatter([x], [lr], marker="x", color="C3", zorder=5,
                            label=f"{word}{law}: {lr:.2e} at {symbol}={x}"
                            + ("" if prediction.get("lr_low") is None else f" ({prediction['level']:.0%} interval)"))
    scaling.set_xscale("log", base=2)
    ticks = sorted(set(values) | ({prediction["value"]} if prediction is not None else set()))
    scaling.set_xticks(ticks, [f"{t:,}" for t in ticks])  # the values run, not powers of 2
    scaling.xaxis.set_minor_locator(NullLocator())
    scaling.set_yscale("log")
    scaling.set_xlabel(f"{AXIS_TITLES.get(series.axis, name)} (log scale)")
    scaling.set_ylabel("suggested learning rate (log scale)")
    transfer = series.transfer()
    scaling.set_title(f"suggestion vs {name}" + ("" if transfer is None else f": {transfer['verdict'].replace('_', ' ')}"))
    scaling.grid(True, which="both", alpha=0.3)
    if points or fit is not None:
        scaling.legend(fontsize=8)
    else:
        scaling.text(0.5, 0.5, "no run gave a suggestion", ha="center", transform=scaling.transAxes)
    fig.tight_layout()
    path = Path(output_path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    return path

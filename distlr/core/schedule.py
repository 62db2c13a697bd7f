"""A training schedule built on a suggested learning rate, in the forms users paste.

Pure math: no torch, no I/O. ``recommend_schedule`` turns one peak LR into a one-cycle schedule
and a warmup + cosine schedule, each spelled out for PyTorch (``OneCycleLR`` arguments), Hugging
Face (``TrainingArguments`` fields) and DeepSpeed (a ``scheduler`` block). The result is a plain
dict that ``json.dumps`` writes as is.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def recommend_schedule(
    peak_lr: float,
    *,
    total_steps: int | None = None,
    warmup_ratio: float = 0.05,
    one_cycle_pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    min_lr_ratio: float = 0.0,
    plateau_lr: float | None = None,
    decay_ratio: float = 0.2,
) -> dict[str, Any]:
    """Recommend a schedule whose highest LR is ``peak_lr``.

    One-cycle starts at ``peak_lr / div_factor``, climbs to ``peak_lr`` over the first
    ``one_cycle_pct_start`` of training and anneals to ``initial_lr / final_div_factor`` (the
    ``torch.optim.lr_scheduler.OneCycleLR`` convention). Warmup + cosine climbs linearly from 0 to
    ``peak_lr`` over ``warmup_ratio`` of training, then follows a half cosine down to
    ``peak_lr * min_lr_ratio``. Step counts need the run's number of optimizer steps: without
    ``total_steps`` they are left None (JSON null) and a note says to fill them in.

    Args:
        peak_lr: the highest LR of the schedule, usually the suggested LR; positive and finite.
        total_steps: optimizer steps of the real training run (not of the range test), or None.
        warmup_ratio: fraction of ``total_steps`` spent warming up, in [0, 1).
        one_cycle_pct_start: fraction of ``total_steps`` the one-cycle LR spends rising, in (0, 1).
        div_factor: ``peak_lr / initial_lr`` of the one-cycle schedule, >= 1.
        final_div_factor: ``initial_lr / final_lr`` of the one-cycle schedule, >= 1.
        min_lr_ratio: the cosine schedule's final LR as a fraction of ``peak_lr``, in [0, 1).

    Returns:
        A dict with keys ``peak_lr``, ``total_steps``, ``one_cycle``, ``warmup_cosine``,
        ``torch`` (``{"OneCycleLR": kwargs}``), ``huggingface`` (``TrainingArguments`` fields:
        ``learning_rate``, ``lr_scheduler_type``, ``warmup_steps`` and, with a floor,
        ``lr_scheduler_kwargs``),
        ``deepspeed`` (``{"scheduler": block, "alternatives": {name: block}}``) and ``notes`` (a
        list of sentences). Only str, int, float, None, list and dict values.

    Raises:
        ValueError: naming the argument, its value and what is allowed.

    Example:
        >>> s = recommend_schedule(1e-3, total_steps=1000)
        >>> s["one_cycle"]["initial_lr"], s["warmup_cosine"]["warmup_steps"]
        (4e-05, 50)
        >>> s["deepspeed"]["scheduler"]["type"]
        'WarmupCosineLR'
    """
    _check_number("peak_lr", peak_lr, low=0.0, low_open=True, allowed="a finite float > 0")
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1
    ):
        raise ValueError(f"total_steps={total_steps!r} is not allowed; allowed: None or an int >= 1")
    _check_number("warmup_ratio", warmup_ratio, low=0.0, high=1.0, allowed="a float in [0, 1)")
    _check_number(
        "one_cycle_pct_start", one_cycle_pct_start, low=0.0, high=1.0, low_open=True, allowed="a float in (0, 1)"
    )
    _check_number("div_factor", div_factor, low=1.0, allowed="a finite float >= 1")
    _check_number("final_div_factor", final_div_factor, low=1.0, allowed="a finite float >= 1")
    _check_number("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0, allowed="a float in [0, 1)")
    if plateau_lr is not None:
        _check_number("plateau_lr", plateau_lr, low=0.0, low_open=True, allowed="None or a finite float > 0")
    _check_number("decay_ratio", decay_ratio, low=0.0, high=1.0, low_open=True, allowed="a float in (0, 1)")

    peak_lr, warmup_ratio, min_lr_ratio = float(peak_lr), float(warmup_ratio), float(min_lr_ratio)
    pct_start, div_factor, final_div_factor = float(one_cycle_pct_start), float(div_factor), float(final_div_factor)
    total = None if total_steps is None else int(total_steps)
    warmup_steps = None if total is None else round(total * warmup_ratio)
    initial_lr = peak_lr / div_factor
    final_lr = initial_lr / final_div_factor
    min_lr = peak_lr * min_lr_ratio

    notes: list[str] = []
    if total is None:
        notes.append(
            "total_steps was not given, so every step count is null: set them to the number of "
            "optimizer steps of the training run before use"
        )
        notes.append(
            f"huggingface.warmup_steps holds the ratio {warmup_ratio:g}, which transformers >= 5 reads "
            f"as a fraction of training; on transformers 4 pass warmup_ratio={warmup_ratio:g} instead"
        )
    notes.append(
        "DeepSpeed's WarmupCosineLR scales the optimizer's lr by its ratios: set the DeepSpeed "
        f"optimizer's params.lr to peak_lr ({peak_lr:.6g})"
    )
    if warmup_steps == 0:
        notes.append("warmup rounds to 0 steps; DeepSpeed's warmup schedulers still warm up for at least 2 steps")

    out = {
        "peak_lr": peak_lr,
        "total_steps": total,
        "one_cycle": {
            "max_lr": peak_lr,
            "initial_lr": initial_lr,
            "final_lr": final_lr,
            "pct_start": pct_start,
            "div_factor": div_factor,
            "final_div_factor": final_div_factor,
        },
        "warmup_cosine": {
            "peak_lr": peak_lr,
            "warmup_ratio": warmup_ratio,
            "warmup_steps": warmup_steps,
            "min_lr": min_lr,
        },
        "torch": {
            "OneCycleLR": {
                "max_lr": peak_lr,
                "total_steps": total,
                "pct_start": pct_start,
                "div_factor": div_factor,
                "final_div_factor": final_div_factor,
                "anneal_strategy": "cos",
            }
        },
        "huggingface": _huggingface_fields(peak_lr, warmup_ratio, warmup_steps, min_lr_ratio),
        "deepspeed": _deepspeed_blocks(peak_lr, initial_lr, total, warmup_steps, pct_start, min_lr_ratio),
        "notes": notes,
    }
    if plateau_lr is not None:
        out["wsd"] = {"plateau_lr": float(plateau_lr), "warmup_ratio": warmup_ratio, "decay_ratio": float(decay_ratio),
                      "decay_shape": "linear"}
    return out


def _huggingface_fields(
    peak_lr: float, warmup_ratio: float, warmup_steps: int | None, min_lr_ratio: float
) -> dict[str, Any]:
    # transformers 5.2 removed warmup_ratio; an int warmup_steps means the same to every version.
    warmup: int | float = warmup_ratio if warmup_steps is None else warmup_steps
    fields: dict[str, Any] = {"learning_rate": peak_lr, "lr_scheduler_type": "cosine", "warmup_steps": warmup}
    if min_lr_ratio > 0:
        # Plain "cosine" decays to 0; this variant takes the floor as a fraction of learning_rate.
        fields["lr_scheduler_type"] = "cosine_with_min_lr"
        fields["lr_scheduler_kwargs"] = {"min_lr_rate": min_lr_ratio}
    return fields


def _deepspeed_blocks(
    peak_lr: float,
    initial_lr: float,
    total: int | None,
    warmup_steps: int | None,
    pct_start: float,
    min_lr_ratio: float,
) -> dict[str, Any]:
    # DeepSpeed rejects warmup_num_steps < 1, so a warmup that rounds to zero becomes one step.
    ds_warmup = None if warmup_steps is None else max(1, warmup_steps)
    rise: int | None = None
    fall: int | None = None
    if total is not None:
        # DeepSpeed's OneCycle divides by the rising half's length, so neither half may be empty.
        rise = max(1, round(total * pct_start))
        fall = max(1, total - rise)
    return {
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total,
                "warmup_num_steps": ds_warmup,
                # Ratios of the optimizer's own lr, which the tuned config sets to peak_lr.
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": min_lr_ratio,
                # DeepSpeed's default warmup is logarithmic; linear matches the PyTorch and Hugging
                # Face forms above, so all three describe the same curve.
                "warmup_type": "linear",
            },
        },
        "alternatives": {
            "OneCycle": {
                "type": "OneCycle",
                "params": {
                    "cycle_min_lr": initial_lr,
                    "cycle_max_lr": peak_lr,
                    "cycle_first_step_size": rise,
                    "cycle_second_step_size": fall,
                    # After the cycle DeepSpeed holds cycle_min_lr; it has no final_div_factor.
                    "decay_lr_rate": 0.0,
                    # On by default, it would overwrite Adam's betas (beta2 included) every step.
                    "cycle_momentum": False,
                },
            },
            "WarmupDecayLR": {
                "type": "WarmupDecayLR",
                "params": {
                    "total_num_steps": total,
                    "warmup_min_lr": 0.0,
                    "warmup_max_lr": peak_lr,
                    "warmup_num_steps": ds_warmup,
                    "warmup_type": "linear",
                },
            },
        },
    }


def _check_number(
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    allowed: str,
) -> None:
    # Upper bounds are open: a ratio of 1 would leave no steps for the rest of the schedule.
    if (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value < high
    ):
        return
    raise ValueError(f"{name}={value!r} is not allowed; allowed: {allowed}")

"""A training schedule built on a suggested learning rate, in the forms users paste.

Pure math: no torch, no I/O. ``recommend_schedule`` turns one peak LR into a one-cycle schedule
and a warmup + cosine schedule, each spelled out for PyTorch (``OneCycleLR`` arguments), Hugging
Face (``TrainingArguments`` fields) and DeepSpeed (a ``scheduler`` block), and a plateau LR into
a warmup-stable-decay schedule in the same three forms. The result is a plain dict that
``json.dumps`` writes as is. ``LrShape`` is each schedule's LR at a step, as a fraction of its
highest (what ``LRFinderResult.make_scheduler`` hands ``LambdaLR``), and ``set_peak_lr`` moves
an optimizer and its scheduler to a new LR.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, get_args

ScheduleKind = Literal["onecycle", "warmup_cosine", "wsd"]
"""The schedules ``make_scheduler`` builds: one-cycle and warmup + cosine peak at ``peak_lr``,
warmup-stable-decay holds the WSD plateau."""
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)
DecayShape = Literal["linear", "cosine", "1-sqrt"]
"""The shape of WSD's final decay, with transformers' names (``get_wsd_schedule``'s ``decay_type``)."""
DECAY_SHAPES: tuple[str, ...] = get_args(DecayShape)
WARMUP_FRACTION = 0.05
"""The share of training the warmup-cosine and WSD schedules warm up for: 5 %, as in the
suggestion benchmark's WSD protocol, on which the plateau divisor was chosen."""
WSD_DECAY_FRACTION = 0.2
"""The share of training WSD spends decaying: the suggestion benchmark's WSD protocol, on which
the plateau divisor was chosen (Hagele et al. 2024 find 10-20 % enough)."""


def recommend_schedule(
    peak_lr: float,
    *,
    total_steps: int | None = None,
    warmup_ratio: float = WARMUP_FRACTION,
    one_cycle_pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    min_lr_ratio: float = 0.0,
    plateau_lr: float | None = None,
    decay_ratio: float = WSD_DECAY_FRACTION,
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
            # transformers >= 5 names: warmup_steps, an int, or a float < 1 read as a fraction.
            "warmup_steps": warmup_ratio if warmup_steps is None else warmup_steps,
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
                # On by default it cycles Adam's beta1 (or SGD's momentum) too, which the range
                # test never measured; DeepSpeed's block below turns it off alike.
                "cycle_momentum": False,
            }
        },
        "huggingface": _huggingface_fields(peak_lr, warmup_ratio, warmup_steps, min_lr_ratio),
        "deepspeed": _deepspeed_blocks(peak_lr, initial_lr, total, warmup_steps, pct_start, min_lr_ratio),
        "notes": notes,
    }
    if plateau_lr is not None:
        out["wsd"] = _wsd_forms(float(plateau_lr), total, warmup_ratio, warmup_steps, float(decay_ratio), notes)
    return out


def _wsd_forms(plateau: float, total: int | None, warmup_ratio: float, warmup_steps: int | None,
               decay_ratio: float, notes: list[str]) -> dict[str, Any]:
    """Warmup-stable-decay with ``plateau`` held: linear warmup from 0, the plateau, then a linear
    decay to 0 over ``decay_ratio`` of training; with transformers' ``get_wsd_schedule`` names."""
    decay = None if total is None else max(1, round(total * decay_ratio))
    stable = None if total is None else max(0, total - warmup_steps - decay)
    warmup: int | float = warmup_ratio if warmup_steps is None else warmup_steps
    if total is None:
        notes.append("wsd: num_decay_steps and num_stable_steps need total_steps; with it they are "
                     f"{decay_ratio:g} and the rest of training after warmup")
    return {
        "plateau_lr": plateau,
        "warmup_steps": warmup,
        "num_stable_steps": stable,
        "num_decay_steps": decay,
        "decay_fraction": decay_ratio,
        "decay_type": "linear",
        "min_lr_ratio": 0.0,
        "torch": {"LambdaLR": "result.make_scheduler(optimizer, total_steps, kind='wsd')"},
        "huggingface": {"learning_rate": plateau, "lr_scheduler_type": "warmup_stable_decay", "warmup_steps": warmup,
                        "lr_scheduler_kwargs": {"num_decay_steps": decay, "decay_type": "linear",
                                                "min_lr_ratio": 0.0}},
        # DeepSpeed has no WSD scheduler: WarmupLR warms up and holds the plateau; the decay
        # comes from a client scheduler, deepspeed.initialize(lr_scheduler=result.make_scheduler(...)).
        "deepspeed": {"scheduler": {"type": "WarmupLR", "params": {
                          "warmup_min_lr": 0.0, "warmup_max_lr": plateau,
                          "warmup_num_steps": None if warmup_steps is None else max(1, warmup_steps),
                          "warmup_type": "linear"}},
                      "decay": "DeepSpeed has no decay phase for WarmupLR: pass lr_scheduler=result.make_scheduler("
                               "optimizer, total_steps, kind='wsd') to deepspeed.initialize instead of this block"},
    }


@dataclass(frozen=True)
class LrShape:
    """The LR at a step as a fraction of the schedule's highest, step for step as transformers'
    ``get_cosine_schedule_with_warmup`` (with ``min_lr_rate``) and ``get_wsd_schedule`` compute
    it: linear warmup from 0, then a half cosine to ``min_ratio`` (``warmup_cosine``), or the
    plateau and a decay of ``decay_shape`` over the last ``decay_steps`` (``wsd``). A frozen
    dataclass, so ``LambdaLR.state_dict`` saves it.

    Example:
        >>> shape = LrShape("wsd", total_steps=100, warmup_steps=10, decay_steps=20)
        >>> [shape(s) for s in (0, 5, 10, 79, 90, 100)]
        [0.0, 0.5, 1.0, 1.0, 0.5, 0.0]
    """

    kind: str
    total_steps: int
    warmup_steps: int
    decay_steps: int = 0
    min_ratio: float = 0.0
    decay_shape: str = "linear"

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            rise = step / max(1, self.warmup_steps)
            # transformers' WSD warms up from min_ratio; its cosine warms up from 0.
            return rise * (1.0 - self.min_ratio) + self.min_ratio if self.kind == "wsd" else rise
        if self.kind == "warmup_cosine":
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - self.min_ratio) + self.min_ratio)
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start:
            return 1.0
        if step >= self.total_steps:
            return self.min_ratio
        progress = (step - decay_start) / max(1, self.decay_steps)
        fall = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
                "1-sqrt": 1.0 - math.sqrt(progress)}[self.decay_shape]
        return max(0.0, fall * (1.0 - self.min_ratio) + self.min_ratio)


def set_peak_lr(optimizer: Any, scheduler: Any, lr: float) -> list[float]:
    """Move ``optimizer`` (and ``scheduler``, if given) to ``lr`` so that it sticks.

    The group the schedule gives the highest LR gets ``lr``; the others keep their ratio to it
    (muP's or a per-layer scheme's groups). A scheduler's LRs come from its ``base_lrs`` (or
    OneCycleLR's ``max_lr``), not from the group's current LR (which a warmup may have at 0), so
    those scale too, with each group's ``initial_lr``, OneCycleLR's ``max_lr``/``min_lr`` and the
    LR the scheduler last set: the next ``scheduler.step()`` keeps the new LR and the schedule's
    shape. Duck-typed, so it imports no torch. Returns each group's new highest LR.

    Raises:
        ValueError: a scheduler whose base LR for a group is 0 (there is nothing to scale).
    """
    groups = optimizer.param_groups
    children = [scheduler, *getattr(scheduler, "_schedulers", [])] if scheduler is not None else []
    if scheduler is None:
        highest = [float(g.get("initial_lr", g["lr"])) for g in groups]
    elif all("max_lr" in g for g in groups):  # OneCycleLR keeps its peak in the group
        highest = [float(g["max_lr"]) for g in groups]
    else:
        bases = next((c.base_lrs for c in children if getattr(c, "base_lrs", None)), None)
        highest = [float(b) for b in bases] if bases is not None else [float(g["lr"]) for g in groups]
    top = max(highest)
    new = [lr * h / top for h in highest] if top > 0 else [lr] * len(groups)
    if scheduler is None:
        for group, value in zip(groups, new):
            group["lr"] = value
            if "initial_lr" in group:
                group["initial_lr"] = value
        return new
    if any(h <= 0 for h in highest):
        raise ValueError(f"the scheduler's learning rates are {highest}: a schedule built on 0 cannot be scaled; "
                         "build the scheduler after result.apply(optimizer), or use result.make_scheduler(...)")
    factors = [n / h for n, h in zip(new, highest)]
    for group, factor in zip(groups, factors):
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] *= factor
    for child in children:
        for name in ("base_lrs", "_last_lr"):
            values = getattr(child, name, None)
            if isinstance(values, list) and len(values) == len(factors):
                setattr(child, name, [v * f for v, f in zip(values, factors)])
    return new


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

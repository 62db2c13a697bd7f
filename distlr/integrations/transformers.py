"""The range test inside a Hugging Face ``Trainer``: its loader, optimizer, loss, precision,
accumulation, clipping and DeepSpeed config, with everything it touches put back.

    from distlr.integrations.transformers import find_lr
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    result = find_lr(trainer, apply=True)     # before trainer.train()
    trainer.train()                           # at the suggested learning rate

What it uses, as the Trainer would: ``get_train_dataloader()`` (already sharded by the
Trainer's Accelerate; never sharded again), ``create_optimizer()`` (the optimizer given in
``Trainer(optimizers=(optimizer, scheduler))``, else one built from ``optimizer_cls_and_kwargs``
or ``args.optim`` with the Trainer's weight-decay groups; any subclass override),
``compute_loss`` (label smoothing, ``compute_loss_func``), and from
``TrainingArguments``: ``gradient_accumulation_steps``, ``max_grad_norm``, ``bf16``/``fp16``
and ``deepspeed`` (the config the Trainer resolved from them).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, get_args

from transformers import TrainerCallback

from distlr.core.options import check_choice
from distlr.core.result import LRFinderResult, Which
from distlr.finder import LRFinder, unrampable_advice
from distlr.output import trackers
from distlr.output.files import free_name, write_atomic
from distlr.output.plot import plot_result
from distlr.output.summary import summary

logger = logging.getLogger(__name__)

def find_lr(trainer: Any, *, apply: bool = False, which: Which | None = None,
            **find_kwargs: Any) -> LRFinderResult:
    """Run the range test with a ``transformers.Trainer``'s own parts; call it before ``train()``.

    Args:
        trainer: the ``Trainer`` (or a subclass: its ``compute_loss`` and ``create_optimizer``
            are used). The range test steps the optimizer ``train()`` will step: the one given
            in ``optimizers=(optimizer, scheduler)``, else one built from
            ``optimizer_cls_and_kwargs`` or ``args.optim``; the given one's state is put back.
        apply: put the result into the trainer, so that ``train()`` runs at it:
            ``args.learning_rate``, and an optimizer given to the Trainer set to it in place
            (each group's ``lr`` and ``initial_lr``, and the ``base_lrs`` of the scheduler given
            with it, whose peak it becomes; the schedule's shape and the groups' ratios stay).
            With no optimizer given, the trainer's optimizer and scheduler are left for
            ``train()`` to build at that LR (``optimizer_cls_and_kwargs`` gets it as ``lr``).
            When ``train()`` builds the scheduler from the arguments: warmup from the schedule
            recommendation if the arguments have none, and WSD's decay length. Under DeepSpeed
            the Hugging Face DeepSpeed config is rebuilt from the new arguments, as the Trainer
            does for a hyper-parameter search.
        which: which of the result's LRs ``apply`` sets: ``"constant"``, ``"peak"`` or
            ``"wsd"``; default ``which_lr(trainer.args)``, from ``args.lr_scheduler_type`` (the
            peak for the default linear schedule). Give ``"constant"`` with a constant scheduler
            of your own.
        **find_kwargs: ``LRFinder.find()`` arguments (``min_lr``, ``max_lr``, ``num_steps``, ...).
            Accumulation, clipping and precision come from ``trainer.args`` unless given.

    Returns:
        The ``LRFinderResult``, identical on every rank.

    Raises:
        ValueError: an optimizer whose LR cannot be ramped (``distlr.finder.UNRAMPABLE``), or
            arguments that contradict ``trainer.args``.

    Example:
        >>> result = find_lr(trainer, apply=True, num_steps=100)  # doctest: +SKIP
        >>> trainer.train()                                        # doctest: +SKIP
    """
    args = trainer.args
    _check_which(which)
    if _optimizer_from_args(trainer):
        optim = str(getattr(args.optim, "value", args.optim)).lower()
        advice = unrampable_advice(optim)
        if advice is not None:
            raise ValueError(f"TrainingArguments.optim={optim!r} cannot be ramped: {advice} (for find_lr: "
                             "TrainingArguments(optim='adamw_torch'), or 'sgd')")
    report_to = _report_to(args)
    touched = _Touched.capture(trainer)
    try:
        kwargs = _find_kwargs(trainer, find_kwargs)
        deepspeed_config = _deepspeed_config(args)
        optimizer = None
        if deepspeed_config is None or "optimizer" not in deepspeed_config:
            # The optimizer given to the Trainer, else the one train() would build (its groups:
            # no decay on norms and biases); a given optimizer's state is the finder's to put back.
            optimizer = trainer.create_optimizer()
        kwargs.setdefault("progress", True)  # a tqdm bar, as the Trainer's own
        with LRFinder(trainer.model, trainer.get_train_dataloader(), optimizer,
                      loss_fn=lambda model, batch: trainer.compute_loss(model, batch),
                      lr_scheduler=trainer.lr_scheduler, deepspeed_config=deepspeed_config) as finder:
            result = finder.find(**kwargs)
    finally:
        touched.restore(trainer)
    _report(args, result, report_to, is_main=trainer.is_world_process_zero())
    if apply:
        apply_result(trainer, result, which=which)
    return result


def _optimizer_from_args(trainer: Any) -> bool:
    """Whether ``train()`` builds its optimizer from ``args.optim``: no optimizer was given to
    the Trainer, nor an ``optimizer_cls_and_kwargs`` (transformers 4.43 on)."""
    return trainer.optimizer is None and getattr(trainer, "optimizer_cls_and_kwargs", None) is None


def _check_which(which: Which | None) -> None:
    if which is not None:
        check_choice("which", which, get_args(Which))


def _report_to(args: Any) -> list[str]:
    """The trackers of ``args.report_to`` that distlr logs to, checked before any step."""
    report_to = [name for name in (args.report_to or []) if name in trackers.TRACKERS]
    trackers.check(report_to)
    return report_to


def _report(args: Any, result: LRFinderResult, report_to: list[str], *, is_main: bool) -> None:
    """What ``find_lr`` and ``LRFinderCallback`` hand over once the range test ended: the files
    and trackers (``publish``) and the summary, on the main process."""
    try:
        publish(args, result, report_to, is_main=is_main)
    except Exception as err:  # rank 0 alone writes: a failure here must not part it from the others
        logger.warning("find_lr: could not write or log the result (%s); the result is returned as usual", err)
    if is_main:
        print(summary(result), flush=True)


def publish(args: Any, result: LRFinderResult, report_to: list[str], *, is_main: bool) -> list[Path]:
    """On the main process (``is_main``): ``lr_finder.json`` and ``lr_finder.png`` into
    ``args.output_dir`` (``-1``, ``-2``... when a file of that name is there already: nothing is
    overwritten), so that ``push_to_hub`` carries them, and the result to the trackers of
    ``report_to`` (TensorBoard beside the Trainer's own logs). Returns the files written."""
    if not is_main or not args.output_dir:
        return []
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = free_name(out / "lr_finder.json", also=(".png",))
    write_atomic(json_path, result.to_json())
    figure = plot_result(result, json_path.with_suffix(".png"))
    # Where the Trainer's TensorBoard callback writes: TENSORBOARD_LOGGING_DIR, else (v4)
    # args.logging_dir, else <output_dir>/runs.
    log_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None) or out / "runs"
    for where in trackers.log(result, report_to, figure=figure, log_dir=Path(log_dir).expanduser()):
        logger.info("find_lr: logged to %s", where)
    return [json_path, figure]


def _find_kwargs(trainer: Any, given: dict[str, Any]) -> dict[str, Any]:
    args = trainer.args
    kwargs = dict(given)
    kwargs.setdefault("accumulation_steps", int(args.gradient_accumulation_steps))
    if args.max_grad_norm and args.max_grad_norm > 0:
        kwargs.setdefault("max_grad_norm", float(args.max_grad_norm))
    kwargs.setdefault("amp", "bf16" if args.bf16 else "fp16" if args.fp16 else "no")
    if "total_steps" not in kwargs:
        kwargs["total_steps"] = _training_steps(trainer)
    if getattr(args, "deepspeed", None):
        # With DeepSpeed the config decides accumulation, clipping and precision.
        for key in ("accumulation_steps", "max_grad_norm", "amp"):
            if key not in given:
                kwargs.pop(key, None)
    return kwargs


def _deepspeed_config(args: Any) -> dict[str, Any] | None:
    """The DeepSpeed config the Trainer will train with: the one ``TrainingArguments`` resolved
    from the arguments (its "auto" values filled); distlr fills what is left."""
    if not getattr(args, "deepspeed", None):
        return None
    hf = getattr(args, "hf_deepspeed_config", None)
    return copy.deepcopy(hf.config) if hf is not None else None


class _Touched:
    """What ``find_lr`` touches on the trainer besides the model and the optimizer (which the
    finder's snapshot restores): the trainer's optimizer and scheduler slots (``create_optimizer``
    fills the first), its state, and its accelerator's step count."""

    def __init__(self, values: dict[str, Any], state: Any, step: int | None) -> None:
        self.values, self.state, self.step = values, state, step

    @classmethod
    def capture(cls, trainer: Any) -> _Touched:
        values = {name: getattr(trainer, name, None) for name in ("optimizer", "lr_scheduler")}
        step = getattr(getattr(trainer, "accelerator", None), "step", None)
        return cls(values, copy.deepcopy(trainer.state), step)

    def restore(self, trainer: Any) -> None:
        for name, value in self.values.items():
            setattr(trainer, name, value)
        trainer.state = self.state
        if self.step is not None:
            trainer.accelerator.step = self.step


def which_lr(args: Any) -> str:
    """Which of the result's numbers a Trainer's schedule trains at: the constant LR for
    ``constant*`` schedules, the WSD plateau for ``warmup_stable_decay`` (what the suggestion
    benchmark's WSD protocol measured), the one-cycle / cosine peak for every decaying one."""
    schedule = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if schedule.startswith("constant"):
        return "constant"
    return "wsd" if schedule == "warmup_stable_decay" else "peak"


def apply_result(trainer: Any, result: LRFinderResult, *, which: Which | None = None) -> None:
    """Make ``trainer.train()`` use the result (see ``find_lr``'s ``apply`` and ``which``).

    Raises:
        ValueError: the result has no suggestion (its ``suggestion_note`` says why).
    """
    if result.optimal_lr is None:
        raise ValueError(f"no learning rate to apply: {result.suggestion_note}")
    args = trainer.args
    which = which or which_lr(args)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    if optimizer is not None:
        # train() steps the optimizer it was given, at that optimizer's LR (not args'); the
        # scheduler given with it would bring its own base_lrs back at its first step.
        args.learning_rate = result.apply(optimizer, scheduler, which=which)
    else:
        args.learning_rate = result.lr_for(which)
        cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None)
        if cls_and_kwargs is not None:
            # create_optimizer() takes the LR from these kwargs (else the class's default), not from args.
            optimizer_cls, optimizer_kwargs = cls_and_kwargs
            trainer.optimizer_cls_and_kwargs = (optimizer_cls, {**optimizer_kwargs, "lr": args.learning_rate})
    if scheduler is None:  # train() builds it from the arguments
        _fill_schedule_args(trainer, result)
    if getattr(args, "deepspeed", None):
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
        args.hf_deepspeed_config.trainer_config_process(args)
    logger.info("find_lr: learning_rate=%.3e for trainer.train()", args.learning_rate)


def _fill_schedule_args(trainer: Any, result: LRFinderResult) -> None:
    """For the scheduler ``train()`` builds from the arguments: warmup from the recommendation
    if the arguments have none, and the decay length transformers' WSD needs."""
    args = trainer.args
    if not args.warmup_steps and result.schedule is not None:
        warmup = result.schedule["huggingface"].get("warmup_steps")
        if isinstance(warmup, (int, float)) and warmup > 0:
            args.warmup_steps = warmup
    if which_lr(args) == "wsd":
        # The recommendation's share of this run's steps.
        kwargs = dict(args.lr_scheduler_kwargs or {})
        if "num_decay_steps" not in kwargs:
            total = _training_steps(trainer)
            if total is not None:
                kwargs["num_decay_steps"] = max(1, round(total * result.schedule["wsd"]["decay_fraction"]))
                kwargs.setdefault("decay_type", result.schedule["wsd"]["decay_type"])
                args.lr_scheduler_kwargs = kwargs


def _training_steps(trainer: Any) -> int | None:
    """The optimizer steps ``train()`` will run: ``max_steps``, or the epochs over the loader."""
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    try:
        per_epoch = len(trainer.get_train_dataloader()) // max(1, args.gradient_accumulation_steps)
    except TypeError:
        return None
    return max(1, round(per_epoch * args.num_train_epochs))


class LRFinderCallback(TrainerCallback):
    """Run the range test when ``train()`` begins, for stacks that build the Trainer from a
    config and cannot call ``find_lr`` before ``train()``: ``trainer.add_callback(LRFinderCallback())``.

    ``on_train_begin`` comes after the Trainer built its optimizer and scheduler (or took
    yours): the range test steps that optimizer, and with ``apply=True`` (the default) its
    learning rates and the scheduler's (``base_lrs``, the last LR it set, which the Trainer
    logs) are rescaled to the suggestion, ``which`` as in ``find_lr``. The files, trackers and
    summary are ``find_lr``'s. The loss is the model's own (with ``args.label_smoothing_factor``);
    a Trainer's ``compute_loss`` override or ``compute_loss_func`` is only seen by ``find_lr``.
    ``.result`` holds the result.
    """

    def __init__(self, apply: bool = True, which: Which | None = None, **find_kwargs: Any) -> None:
        _check_which(which)
        self.apply, self.which, self.find_kwargs = apply, which, find_kwargs
        self.result: LRFinderResult | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,  # noqa: ANN001
                       train_dataloader=None, **kwargs):
        report_to = _report_to(args)
        loss_fn = None
        if args.label_smoothing_factor:
            from transformers.trainer_pt_utils import LabelSmoother

            smoother = LabelSmoother(epsilon=args.label_smoothing_factor)

            def loss_fn(module, batch):
                labels = batch.pop("labels")
                return smoother(module(**batch), labels, shift_labels=True)
        finder_kwargs = dict(self.find_kwargs)
        finder_kwargs.setdefault("accumulation_steps", int(args.gradient_accumulation_steps))
        finder_kwargs.setdefault("amp", "bf16" if args.bf16 else "fp16" if args.fp16 else "no")
        if args.max_grad_norm and args.max_grad_norm > 0:
            finder_kwargs.setdefault("max_grad_norm", float(args.max_grad_norm))
        with LRFinder(model, train_dataloader, optimizer, loss_fn=loss_fn, lr_scheduler=lr_scheduler) as finder:
            self.result = finder.find(**finder_kwargs)
        _report(args, self.result, report_to, is_main=state.is_world_process_zero)
        if self.apply and self.result.optimal_lr is not None:
            # result.apply moves the scheduler with the optimizer: its base_lrs, and the last LR
            # it set, which the Trainer logs as learning_rate.
            args.learning_rate = self.result.apply(optimizer, lr_scheduler, which=self.which or which_lr(args))
        return control

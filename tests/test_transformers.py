"""A real Hugging Face Trainer (a tiny GPT-2 built from its config): find_lr with the Trainer's
own loader, optimizer (the one given to it, or optimizer_cls_and_kwargs) and loss; apply=True
makes train() run at the suggestion; the model and a given optimizer come back bit for bit; the
callback moves the scheduler with the optimizer and writes find_lr's files. In one process, under
torchrun with 2 ranks, and under DeepSpeed ZeRO-2/3."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import Scenarios, assert_same_bits, fingerprint, launch, read_ranks, state_digest

pytestmark = pytest.mark.timeout(500)
MODULE = "test_transformers"
scenarios = Scenarios()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    model.loss_type = "ForCausalLM"
    return model


def rows(n: int = 512, seq: int = 16) -> list[dict]:
    text = ("The learning rate is the one number users take away from a range test. " * 200).encode()
    ids = torch.tensor(list(text[: n * seq]), dtype=torch.long).view(n, seq)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def trainer_for(out: Path, callbacks=(), *, model=None, trainer_kwargs=None, **args):
    from transformers import Trainer, TrainingArguments

    settings = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=4, report_to=[],
                    logging_strategy="no", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    settings.update(args)
    return Trainer(model=model if model is not None else tiny_gpt2(), args=TrainingArguments(**settings),
                   train_dataset=rows(), callbacks=list(callbacks), **(trainer_kwargs or {}))


def counting_sgd():
    """A fresh SGD class that counts the steps taken with any of its instances: the range test
    is seen to step it."""

    class CountingSGD(torch.optim.SGD):
        steps = 0

        def step(self, closure=None):
            CountingSGD.steps += 1
            return super().step(closure)

    return CountingSGD


class Steps:
    """A callback recording, at every step of train(), what the optimizer train() steps is (its
    class, unwrapped from Accelerate's), the LR it steps with, the LR its group was built with
    (``initial_lr``), its momentum, and the scheduler's last LR."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            def __init__(self):
                self.seen: list[dict] = []

            def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
                group = optimizer.param_groups[0]
                self.seen.append({"cls": type(getattr(optimizer, "optimizer", optimizer)), "lr": group["lr"],
                                  "initial_lr": group.get("initial_lr"), "momentum": group.get("momentum"),
                                  "scheduler_lr": lr_scheduler.get_last_lr()[0]})

        return Recorder()


def logged_lr(trainer, step: int) -> float:
    """The learning_rate the Trainer logged at ``step``."""
    return next(h["learning_rate"] for h in trainer.state.log_history if h.get("step") == step and "learning_rate" in h)


class LearningRates:
    """A callback recording the LR each param group was built with (``initial_lr``, set by the
    scheduler) at every step of train()."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            def __init__(self):
                self.seen: list[list[float]] = []

            def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
                self.seen.append([g.get("initial_lr", g["lr"]) for g in optimizer.param_groups])

        return Recorder()


@scenarios
def trainer_apply(out: Path, zero: str = "") -> dict:
    """find_lr(apply=True), then train(): every rank, with DeepSpeed ZeRO-``zero`` if given."""
    from distlr.integrations.transformers import find_lr

    extra = {}
    if zero:
        extra["deepspeed"] = {"zero_optimization": {"stage": int(zero), "stage3_param_persistence_threshold": 0},
                              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "bf16": {"enabled": False},
                              "zero_allow_untested_optimizer": True}
    recorder = LearningRates()
    trainer = trainer_for(out / f"trainer{zero}", callbacks=[recorder], **extra)
    before = state_digest(trainer.model)
    result = find_lr(trainer, apply=True, min_lr=1e-5, max_lr=10.0, num_steps=40)
    if zero == "3":
        # ZeRO-3 partitioned the parameters in place: their values are compared gathered.
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
            after = state_digest(trainer.model)
    else:
        after = state_digest(trainer.model)
    lr = trainer.args.learning_rate
    trainer.train()
    return {"result": result.to_dict(), "untouched": before == after, "lr": lr, "seen": recorder.seen}


def test_apply_leaves_the_model_as_it_was_and_train_runs_at_the_suggestion(tmp_path):
    from distlr.integrations.transformers import find_lr

    recorder = LearningRates()
    trainer = trainer_for(tmp_path, callbacks=[recorder])
    before = fingerprint(trainer.model)
    loader_iteration = trainer.get_train_dataloader().iteration
    result = find_lr(trainer, apply=True, min_lr=1e-5, max_lr=10.0, num_steps=40)
    assert_same_bits(before, fingerprint(trainer.model))
    assert result.optimal_lr is not None, result.suggestion_note
    # The Trainer's default schedule decays: it trains at the one-cycle / warmup-cosine peak.
    assert trainer.args.learning_rate == result.peak_lr
    assert trainer.optimizer is None and trainer.lr_scheduler is None
    assert result.global_batch_size == 8 and result.max_lr == 10.0
    trainer.train()
    assert recorder.seen and all(lr == pytest.approx(result.peak_lr) for step in recorder.seen for lr in step)
    assert trainer.get_train_dataloader().iteration == loader_iteration


def test_apply_gives_a_warmup_stable_decay_trainer_the_plateau_and_its_decay(tmp_path):
    from distlr.integrations.transformers import find_lr

    recorder = LearningRates()
    trainer = trainer_for(tmp_path, callbacks=[recorder], lr_scheduler_type="warmup_stable_decay", max_steps=20)
    result = find_lr(trainer, apply=True, min_lr=1e-5, max_lr=10.0, num_steps=40)
    plateau = result.schedule["wsd"]["plateau_lr"]
    assert result.optimal_lr < plateau < result.peak_lr and trainer.args.learning_rate == plateau
    # transformers' WSD needs its decay length: 20 % of the 20 steps, filled in since it was missing.
    assert trainer.args.lr_scheduler_kwargs == {"num_decay_steps": 4, "decay_type": "linear"}
    trainer.train()
    assert recorder.seen and all(lr == pytest.approx(plateau) for step in recorder.seen for lr in step)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # decayed to 0 at the end


def test_the_loss_is_the_trainers_own_with_label_smoothing(tmp_path):
    from distlr.integrations.transformers import find_lr

    trainer = trainer_for(tmp_path, label_smoothing_factor=0.1)
    result = find_lr(trainer, min_lr=1e-7, max_lr=1e-6, num_steps=3)  # LRs too small to move the loss
    first = next(iter(trainer.get_train_dataloader()))  # the loader is back where find_lr found it
    trainer.model.train()
    with torch.no_grad():
        smoothed = trainer.compute_loss(trainer.model, dict(first)).item()
        plain = trainer.model(**first).loss.item()
    assert result.losses[0] == pytest.approx(smoothed, rel=1e-5)
    assert abs(smoothed - plain) > 1e-3  # the smoothing is really in it


def test_apply_keeps_the_optimizer_and_scheduler_given_to_the_trainer(tmp_path):
    from transformers import get_linear_schedule_with_warmup

    from distlr.integrations.transformers import find_lr

    sgd = counting_sgd()
    model = tiny_gpt2()
    optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9)
    batch = {k: torch.stack([r[k] for r in rows(8)]) for k in ("input_ids", "attention_mask", "labels")}
    model(**batch).loss.backward()
    optimizer.step()  # momentum buffers: state the range test must give back bit for bit
    optimizer.zero_grad()
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=4)
    steps = Steps()
    trainer = trainer_for(tmp_path, callbacks=[steps], model=model, logging_strategy="steps", logging_steps=1,
                          trainer_kwargs={"optimizers": (optimizer, scheduler)})
    before = fingerprint(model, optimizer)
    sgd.steps = 0
    result = find_lr(trainer, apply=True, min_lr=1e-5, max_lr=10.0, num_steps=30)
    peak = result.peak_lr
    assert peak is not None, result.suggestion_note
    # The range test stepped the user's SGD, and gave back its state and the model to the bit.
    assert sgd.steps == result.steps_run
    after = fingerprint(model, optimizer)
    groups_before, groups_after = before.pop("opt/groups"), after.pop("opt/groups")
    assert_same_bits(before, after)
    # apply set the LR on that optimizer, as the peak its linear schedule decays from; all else stays.
    assert [{k: v for k, v in g.items() if k not in ("lr", "initial_lr")} for g in groups_after] == \
           [{k: v for k, v in g.items() if k not in ("lr", "initial_lr")} for g in groups_before]
    assert trainer.optimizer is optimizer and trainer.lr_scheduler is scheduler
    assert scheduler.base_lrs == [pytest.approx(peak)] and trainer.args.learning_rate == pytest.approx(peak)
    trainer.train()
    assert [s["cls"] for s in steps.seen] == [sgd] * 4 and all(s["momentum"] == 0.9 for s in steps.seen)
    assert [s["lr"] for s in steps.seen] == pytest.approx([peak, 0.75 * peak, 0.5 * peak, 0.25 * peak])
    assert logged_lr(trainer, 1) == pytest.approx(peak)


def test_apply_gives_optimizer_cls_and_kwargs_the_lr(tmp_path):
    from transformers import Trainer

    from distlr.integrations.transformers import find_lr

    if "optimizer_cls_and_kwargs" not in inspect.signature(Trainer.__init__).parameters:
        pytest.skip("this transformers has no Trainer(optimizer_cls_and_kwargs=...)")

    sgd = counting_sgd()
    steps = Steps()
    trainer = trainer_for(tmp_path, callbacks=[steps], logging_strategy="steps", logging_steps=1,
                          trainer_kwargs={"optimizer_cls_and_kwargs": (sgd, {"momentum": 0.9})})
    result = find_lr(trainer, apply=True, min_lr=1e-5, max_lr=10.0, num_steps=30)
    assert result.peak_lr is not None, result.suggestion_note
    assert sgd.steps == result.steps_run  # the range test ran with the optimizer train() builds
    trainer.train()
    # train() builds that SGD at the peak (without "lr" in the kwargs it took SGD's default).
    assert [s["cls"] for s in steps.seen] == [sgd] * 4 and all(s["momentum"] == 0.9 for s in steps.seen)
    assert all(s["initial_lr"] == pytest.approx(result.peak_lr) for s in steps.seen)
    assert logged_lr(trainer, 1) == pytest.approx(steps.seen[0]["lr"])


def test_which_is_checked_before_any_step(tmp_path):
    from distlr.integrations.transformers import LRFinderCallback, find_lr

    with pytest.raises(ValueError, match="which='top' is not supported; allowed: 'constant', 'peak', 'wsd'"):
        find_lr(trainer_for(tmp_path), apply=True, which="top")
    with pytest.raises(ValueError, match="which='top'"):
        LRFinderCallback(which="top")


def test_the_callback_rescales_the_optimizer_and_scheduler_and_writes_the_files(tmp_path):
    from distlr.integrations.transformers import LRFinderCallback

    steps = Steps()
    finder = LRFinderCallback(min_lr=1e-5, max_lr=10.0, num_steps=30)
    trainer = trainer_for(tmp_path, callbacks=[finder, steps], learning_rate=5e-5, logging_strategy="steps",
                          logging_steps=1)
    trainer.train()
    result = finder.result
    assert result is not None and result.peak_lr is not None, result and result.suggestion_note
    # The default linear schedule without warmup: step 1 runs at the peak, and the Trainer logs
    # the LR the optimizer steps with, since the scheduler was moved with it.
    first = steps.seen[0]
    assert first["lr"] == pytest.approx(result.peak_lr) and first["scheduler_lr"] == first["lr"]
    assert logged_lr(trainer, 1) == first["lr"]
    assert all(s["initial_lr"] == pytest.approx(result.peak_lr) for s in steps.seen)
    # find_lr's files, in output_dir.
    assert json.loads((tmp_path / "lr_finder.json").read_text())["optimal_lr"] == result.optimal_lr
    assert (tmp_path / "lr_finder.png").stat().st_size > 0


@pytest.mark.parametrize("optim", ["lomo", "schedule_free_adamw"])
def test_an_optimizer_whose_lr_cannot_be_ramped_is_refused(tmp_path, optim):
    from distlr.integrations.transformers import find_lr

    trainer = trainer_for(tmp_path)
    trainer.args.optim = optim  # set after construction: the packages these need are not installed
    with pytest.raises(ValueError, match=f"optim='{optim}' cannot be ramped") as info:
        find_lr(trainer)
    # It says what to run instead.
    assert {"lomo": "run the range test with SGD",
            "schedule_free_adamw": "AdamW for AdamWScheduleFree"}[optim] in str(info.value)
    assert "start the schedule-free run from result.optimal_lr" in str(info.value) or optim == "lomo"


def test_a_schedule_free_optimizer_given_to_the_api_is_refused_with_what_to_do():
    schedulefree = pytest.importorskip("schedulefree")
    from distlr import LRFinder

    model = tiny_gpt2()
    with pytest.raises(ValueError, match="optimizer AdamWScheduleFree cannot be ramped: schedule-free") as info:
        LRFinder(model, rows(), schedulefree.AdamWScheduleFree(model.parameters()), device="cpu")
    assert "Run the range test with the optimizer they are built on (AdamW" in str(info.value)


@pytest.mark.parametrize("zero", ["", "2", "3"])
def test_find_lr_apply_and_train_under_torchrun(tmp_path, zero):
    if zero:
        pytest.importorskip("deepspeed")
    spec = f"trainer_apply:{zero}" if zero else "trainer_apply"
    job = launch(MODULE, tmp_path, [spec], group=False, timeout=400)
    assert job.returncode == 0, job.explain()
    ranks = read_ranks(tmp_path, spec)
    assert ranks[0]["result"] == ranks[1]["result"]
    result = ranks[0]["result"]
    assert result["world_size"] == 2 and result["global_batch_size"] == 16
    assert result["optimal_lr"] is not None, result["suggestion_note"]
    if zero:
        assert result["zero_stage"] == int(zero)
    for record in ranks:
        assert record["untouched"]
        assert record["lr"] == result["peak_lr"]
        assert record["seen"] and all(math.isclose(lr, record["lr"]) for step in record["seen"] for lr in step)

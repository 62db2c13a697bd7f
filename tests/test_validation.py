"""Validation-loss mode: ``find(val_loader=..., val_every=k, val_batches=n)``, in one process
and under torchrun with 2 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from distlr import LRFinder
from helpers import (RANK, RegressionNet, Scenarios, assert_same_bits, fingerprint, launch, mlp, mse, read_ranks,
                     regression_data)

MODULE = "test_validation"
scenarios = Scenarios()
SWEEP = dict(min_lr=1e-4, max_lr=1.0, num_steps=30, extend_range=False)


def _finder(model, **kw):
    loader = DataLoader(regression_data(n=512, seed=0), batch_size=16, shuffle=True)
    return LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), device="cpu", **kw)


def _val_loader(shuffle=False):
    return DataLoader(regression_data(n=96, seed=1), batch_size=32, shuffle=shuffle)


def test_validation_losses_come_every_val_every_steps_and_leave_training_unchanged():
    torch.manual_seed(0)
    plain = _finder(RegressionNet()).find(**SWEEP)
    torch.manual_seed(0)
    model = RegressionNet()
    finder = _finder(model)
    before = fingerprint(model, finder._spec.optimizer)
    # A shuffling val_loader too: it is read with the global RNG set aside.
    result = finder.find(**SWEEP, val_loader=_val_loader(shuffle=True), val_every=5, val_batches=2)
    assert result.val_steps == [4, 9, 14, 19, 24, 29]
    assert len(result.val_losses) == 6 and all(v > 0 for v in result.val_losses)
    # The training curve is the same bits as without validation: dropout draws nothing in eval
    # mode, BatchNorm's running statistics are read, not updated, and the RNG is not touched.
    assert result.losses == plain.losses
    assert_same_bits(before, fingerprint(model, finder._spec.optimizer))
    back = type(result).from_json(result.to_json())
    assert back.val_losses == result.val_losses and back.val_steps == result.val_steps


def test_the_validation_loss_is_the_eval_mode_mean_over_the_fixed_batches():
    torch.manual_seed(0)
    # Dropout, no BatchNorm: only eval mode gives the same loss twice (and BatchNorm's running
    # statistics would move in the training steps whatever the LR).
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1), nn.Flatten(0))
    val = list(_val_loader())[:2]
    with torch.no_grad():
        model.eval()
        expected = sum(nn.functional.mse_loss(model(x), y).item() * len(y) for x, y in val) / sum(len(y) for _, y in val)
        model.train()
    # LRs too small to move the weights: every validation loss is the untrained model's.
    result = _finder(model).find(min_lr=1e-14, max_lr=1e-13, num_steps=6, extend_range=False,
                                 val_loader=val, val_every=3, val_batches=2)
    assert result.val_losses == pytest.approx([expected, expected], rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(val_loader=5), "val_loader must be an iterable of batches"),
    (dict(val_loader=[], val_every=2), "val_loader is empty"),
    (dict(val_loader=[None], val_every=0), "val_every=0 is too small; allowed: an int >= 1"),
    (dict(val_loader=[None], val_batches=-1), "val_batches=-1 is too small; allowed: an int >= 1"),
])
def test_bad_validation_arguments_are_refused_before_a_step(kwargs, message):
    model = RegressionNet()
    before = fingerprint(model)
    with pytest.raises((TypeError, ValueError), match=message):
        _finder(model).find(**SWEEP, **kwargs)
    assert_same_bits(before, fingerprint(model))


def test_the_plot_draws_the_validation_loss(tmp_path):
    finder = _finder(RegressionNet())
    finder.find(**SWEEP, val_loader=_val_loader(), val_every=3)
    path = Path(finder.plot(tmp_path / "val.png"))
    assert path.stat().st_size > 10_000


# -- 2 ranks ------------------------------------------------------------------------------------


@scenarios
def validation(out: Path) -> dict:
    """Each rank measures its shard of the validation set; the recorded loss is the mean over both."""
    model = mlp()
    loader = DataLoader(regression_data(n=1536), batch_size=8, shuffle=False)
    val = DataLoader(regression_data(n=64, seed=1), batch_size=8, shuffle=False)
    with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu") as finder:
        result = finder.find(min_lr=1e-4, max_lr=1e-2, num_steps=12, extend_range=False, val_loader=val,
                             val_every=4, val_batches=2)
    return {"rank": RANK, "result": result.to_dict()}


def one_process_validation() -> dict:
    model = mlp()
    loader = DataLoader(regression_data(n=1536), batch_size=16, shuffle=False)
    val = DataLoader(regression_data(n=64, seed=1), batch_size=16, shuffle=False)
    with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu") as finder:
        return finder.find(min_lr=1e-4, max_lr=1e-2, num_steps=12, extend_range=False, val_loader=val,
                           val_every=4, val_batches=2).to_dict()


@pytest.mark.timeout(300)
def test_two_ranks_record_the_same_validation_loss_as_one_process_over_the_whole_set(tmp_path):
    job = launch(MODULE, tmp_path, ["validation"], nproc=2)
    assert job.returncode == 0, job.explain()
    ranks = read_ranks(tmp_path, "validation")
    assert ranks[0]["result"]["val_losses"] == ranks[1]["result"]["val_losses"]
    # Two ranks, each 2 batches of 8 of its half: the same 32 validation samples one process
    # reads as 2 batches of 16, and the same global batch of 16 a step.
    single = one_process_validation()
    assert ranks[0]["result"]["val_steps"] == single["val_steps"] == [3, 7, 11]
    assert ranks[0]["result"]["val_losses"] == pytest.approx(single["val_losses"], rel=1e-5)

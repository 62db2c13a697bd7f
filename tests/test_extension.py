"""The range follows the curve: past max_lr while the loss has not turned up, in one process
and under torchrun with 2 ranks (every rank extends alike and restores bit for bit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from distlr import LRFinder
from helpers import (RANK, Scenarios, assert_same_bits, fingerprint, launch, mlp, mse, read_ranks, regression_data,
                     state_digest)

MODULE = "test_extension"
scenarios = Scenarios()
# SGD on this regression falls between 0.03 and 0.2 and turns up near 0.3: a range ending at
# 0.1 stops while it still falls.
STILL_FALLING = dict(min_lr=1e-4, max_lr=0.1, num_steps=30)


def _finder(model, batch_size=32):
    loader = DataLoader(regression_data(n=1536), batch_size=batch_size, shuffle=False)
    return LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu")


def test_a_range_ending_while_the_loss_falls_goes_on_until_it_turns_up():
    model = mlp()
    finder = _finder(model)
    before = fingerprint(model, finder._spec.optimizer)
    result = finder.find(**STILL_FALLING)
    assert result.extended_steps > 0 and len(result.lrs) == 30 + result.extended_steps
    assert result.lrs[29] == 0.1 and result.lrs[-1] > 0.1
    ratio = result.lrs[29] / result.lrs[28]
    assert result.lrs[30] / result.lrs[29] == pytest.approx(ratio, rel=1e-9)
    # It ended because the loss turned up or the range test diverged, well before the cap.
    assert result.lrs[-1] < 10 * 0.1
    assert result.optimal_lr is not None and result.optimal_lr > 0.1 / 10
    note = next(n for n in result.range_notes if "had not turned up by max_lr" in n)
    assert f"{result.extended_steps} more step(s)" in note and "extend_range=False" in note
    assert_same_bits(before, fingerprint(model, finder._spec.optimizer))


def test_extend_range_false_keeps_to_the_range_and_says_what_it_missed():
    result = _finder(mlp()).find(**STILL_FALLING, extend_range=False)
    assert result.extended_steps == 0 and len(result.lrs) == 30 and result.lrs[-1] == 0.1
    assert any("still falling at max_lr=0.1" in n and "leave extend_range on" in n for n in result.range_notes)


def test_a_range_whose_loss_turned_up_is_not_extended():
    result = _finder(mlp()).find(min_lr=1e-4, max_lr=50.0, num_steps=40)
    assert result.extended_steps == 0 and result.stop_reason == "diverged"


def test_extend_range_must_be_a_bool():
    with pytest.raises(TypeError, match="extend_range='yes' must be True or False"):
        _finder(mlp()).find(**STILL_FALLING, extend_range="yes")


# -- 2 ranks ------------------------------------------------------------------------------------


@scenarios
def extended(out: Path) -> dict:
    model = mlp()
    finder = _finder(model, batch_size=16)
    before = state_digest(model, finder._spec.optimizer)
    with finder:
        result = finder.find(**STILL_FALLING)
    return {"rank": RANK, "result": result.to_dict(), "before": before,
            "after": state_digest(model, finder._spec.optimizer)}


@pytest.mark.timeout(300)
def test_two_ranks_extend_alike_stop_on_the_same_step_and_restore_bit_for_bit(tmp_path):
    job = launch(MODULE, tmp_path, ["extended"], nproc=2)
    assert job.returncode == 0, job.explain()
    ranks = read_ranks(tmp_path, "extended")
    a, b = ranks[0]["result"], ranks[1]["result"]
    assert a["extended_steps"] > 0 and a["extended_steps"] == b["extended_steps"]
    assert a["lrs"] == b["lrs"] and a["losses"] == b["losses"] and a["stop_reason"] == b["stop_reason"]
    assert a["optimal_lr"] == b["optimal_lr"]
    for rank in ranks:
        assert rank["before"] == rank["after"]
    # The same curve as one process reading the same global batch of 32.
    single = _finder(mlp(), batch_size=32).find(**STILL_FALLING)
    assert single.extended_steps == a["extended_steps"]
    assert a["losses"] == pytest.approx(single.losses, rel=1e-5)

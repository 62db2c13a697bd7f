"""Long and odd runs: each gives a sensible result and a clear note, never a crash."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from distlr import LRFinder
from distlr.__main__ import main
from helpers import RegressionNet, regression_data


class ScalarLoss(nn.Module):
    """A model that returns its own loss, shaped by ``curve(step)``: constant, rising, ..."""

    def __init__(self, curve):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.curve, self.step = curve, 0

    def forward(self, x, y):
        self.step += 1
        return self.w.sum() * 0 + self.curve(self.step)


def run(model, n=256, **find):
    loader = DataLoader(regression_data(n=n), batch_size=16)
    criterion = None if isinstance(model, ScalarLoss) else nn.MSELoss()
    kwargs = dict(min_lr=1e-5, max_lr=1.0, num_steps=30)
    kwargs.update(find)
    return LRFinder(model, loader, criterion=criterion, device="cpu").find(**kwargs)


def test_num_steps_far_beyond_the_loader_cycles_and_completes():
    result = run(RegressionNet(), n=32, num_steps=50, max_lr=1e-2, extend_range=False)  # 2 batches an epoch
    assert result.steps_run == 50 and result.stop_reason == "completed"
    assert any("cycled" in note for note in result.notes)


def test_two_steps_give_a_curve_and_say_there_are_too_few_points():
    # Two points 5 decades apart: one more step would pass 1000 x max_lr, so none is added.
    result = run(RegressionNet(), num_steps=2)
    assert result.steps_run == 2 and result.extended_steps == 0 and result.optimal_lr is None
    assert "points" in result.suggestion_note and "num_steps" in result.suggestion_note


@pytest.mark.parametrize("name, curve", [("constant", lambda step: 2.0), ("rising", lambda step: 1.0 + 0.01 * step)])
def test_a_loss_that_never_falls_gives_no_number_and_says_why(name, curve):
    result = run(ScalarLoss(curve), divergence_threshold=math.inf)
    assert result.optimal_lr is None and result.best_lr_idx is None
    if name == "constant":  # the range went on as far as it may, and nothing moved the loss
        assert result.steps_run == 30 + result.extended_steps and result.extended_steps > 0
        assert "does not respond to the LR" in result.suggestion_note
    else:  # it rose from the first step: it turned up before the range began
        assert result.steps_run == 30 and "lower min_lr" in result.suggestion_note
    assert all(v is None for v in result.suggestions.values())
    assert result.schedule is None


def test_a_loss_that_explodes_at_once_says_the_range_started_too_high():
    # 100x from the second step on: the first five steps cannot stop the sweep (WARMUP_STEPS),
    # and after them the loss holds still at its new level; the rule sees it turn up at once.
    result = run(ScalarLoss(lambda step: 1.0 if step == 1 else 100.0))
    assert result.optimal_lr is None and "lower min_lr" in result.suggestion_note


def test_a_loss_that_explodes_to_nan_at_once_says_it_diverged_too_early():
    result = run(ScalarLoss(lambda step: 1.0 if step == 1 else math.nan))
    assert result.stop_reason == "non_finite" and result.diverged_at == 1
    assert result.optimal_lr is None and "points" in result.suggestion_note


def test_a_loss_that_is_nan_at_step_1_blames_the_model_or_data_not_the_range():
    """The first loss comes before the first update, so no LR caused it: "lower min_lr" would
    send the user the wrong way (the peers' finders say so; distlr did too)."""
    result = run(ScalarLoss(lambda step: math.nan))
    assert result.stop_reason == "non_finite" and result.diverged_at == 0 and result.optimal_lr is None
    assert "not finite at step 1, before any optimizer step" in result.suggestion_note
    assert "lower min_lr" not in result.suggestion_note
    assert any("lowering min_lr would not help" in note for note in result.range_notes)


def test_frozen_parameters_and_batchnorm_buffers_run_normally():
    model = RegressionNet()
    model.body[0].requires_grad_(False)
    before = model.body[0].weight.detach().clone()
    result = run(model, max_lr=10.0, num_steps=60, smooth_factor=0.7)
    assert result.steps_run >= 10 and all(math.isfinite(x) for x in result.losses[:-1])
    assert (result.optimal_lr is None) == (result.suggestion_note is not None)
    assert torch.equal(model.body[0].weight, before) and not model.body[0].weight.requires_grad


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_users_model_directory_and_data_are_only_read(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "my-model"
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some text to read, never to write. " * 300)
    before = digest_tree(tmp_path)
    out = tmp_path / "run"
    assert main(["--model", str(model_dir), "--data", str(corpus), "--num-steps", "8", "--batch-size", "4",
                 "--seq-len", "32", "--no-progress", "--output-dir", str(out)]) == 0
    after = {k: v for k, v in digest_tree(tmp_path).items() if not k.startswith("run/")}
    assert after == before
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "lr_finder.png", "result.json"]

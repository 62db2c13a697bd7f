"""The user's stack, round two (issue 19): nanoGPT-style models, applying the result to any
optimizer and scheduler, the WSD schedule, the HF/Accelerate flag names, the short summary,
search spaces, muP and schedule-free optimizers. One process; the Accelerate accumulation and
the group the user makes afterwards are in test_accelerate.py and test_repeated_launches.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from distlr import LRFinder
from distlr.__main__ import main
from nanogpt import build as nanogpt

QUICK = dict(min_lr=1e-5, max_lr=1.0, num_steps=30, progress=False)


def token_pairs(n: int = 64, seq_len: int = 16, vocab: int = 512, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """(idx, targets) batches of 8, as nanoGPT's get_batch makes them: targets are idx shifted by one."""
    g = torch.Generator().manual_seed(seed)
    stream = (torch.arange(n * seq_len + 1) * 7 + torch.randint(0, 3, (n * seq_len + 1,), generator=g)) % vocab
    idx = torch.stack([stream[i * seq_len:(i + 1) * seq_len] for i in range(n)])
    targets = torch.stack([stream[i * seq_len + 1:(i + 1) * seq_len + 1] for i in range(n)])
    return [(idx[i:i + 8], targets[i:i + 8]) for i in range(0, n, 8)]


# -- model outputs ------------------------------------------------------------------------------


def test_a_nanogpt_model_returning_logits_then_loss_is_read_without_a_criterion():
    model = nanogpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = LRFinder(model, token_pairs(), device="cpu").find(**QUICK)
    assert result.steps_run >= 20 and result.optimal_lr is not None
    # The loss it read is the model's own cross-entropy: it starts near log(vocab) and falls.
    assert abs(result.losses[0] - math.log(512)) < 0.5 and min(result.losses) < result.losses[0] - 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Outputs(nn.Module):
    """Returns what ``shape`` says, around a real loss."""

    def __init__(self, shape: str) -> None:
        super().__init__()
        self.linear, self.shape = nn.Linear(4, 1), shape

    def forward(self, x, y):
        pred = self.linear(x).squeeze(-1)
        loss = nn.functional.mse_loss(pred, y)
        return {"loss-last": (pred, pred.detach(), loss), "two": (loss, loss.detach() * 2, pred),
                "none": (pred, pred * 2)}[self.shape]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, generator=g)) for _ in range(4)]


def test_the_one_scalar_of_a_tuple_is_the_loss_wherever_it_sits():
    result = LRFinder(Outputs("loss-last"), batches(), device="cpu").find(num_steps=5, extend_range=False,
                                                                          progress=False)
    assert result.steps_run == 5


@pytest.mark.parametrize("shape, says", [
    ("two", "with 2 scalar tensors (at positions [0, 1]), so which one is the loss cannot be told"),
    ("none", "tuple of 2 elements, none a scalar tensor"),
])
def test_a_tuple_with_several_scalars_or_none_is_refused_naming_the_conventions(shape, says):
    with pytest.raises(TypeError) as info:
        LRFinder(Outputs(shape), batches(), device="cpu").find(num_steps=5, progress=False)
    assert says in str(info.value)
    assert "(logits, loss) of nanoGPT" in str(info.value) and "output.loss (Hugging Face)" in str(info.value)


def test_the_cli_trains_a_nanogpt_factory_on_a_uint16_bin_file(tmp_path, capsys):
    tokens = (np.arange(40_000) * 7 + np.random.default_rng(0).integers(0, 3, 40_000)) % 512
    tokens.astype(np.uint16).tofile(tmp_path / "train.bin")
    out = tmp_path / "run"
    code = main(["--model", "nanogpt:build", "--data", str(tmp_path / "train.bin"), "--seq-len", "32",
                 "--batch-size", "8", "--num-steps", "30", "--min-lr", "1e-5", "--max-lr", "1",
                 "--output-dir", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["optimal_lr"] is not None and abs(result["losses"][0] - math.log(512)) < 0.5
    assert result["cli"]["inputs"]["tokens"] == 40_000 and result["cli"]["inputs"]["sequences"] == 1249


def test_the_cli_says_how_it_calls_a_factory_model_that_takes_no_targets(tmp_path, capsys):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    code = main(["--model", "cli_factories:logits_only", "--data", str(tmp_path / "train.bin"), "--seq-len", "16",
                 "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "forward takes 1 positional argument(s)" in err and "model(idx, targets)" in err
    assert not (tmp_path / "run").exists()


# -- applying the result anywhere ----------------------------------------------------------------


@pytest.fixture(scope="module")
def result():
    """A real range test's result on the nanoGPT model, with a training length for the schedule."""
    return LRFinder(nanogpt(), token_pairs(), device="cpu").find(**QUICK, total_steps=200)


def two_groups(lr: float = 3e-5) -> torch.optim.Optimizer:
    """AdamW over two param groups, the second at a tenth of the first (a per-layer scheme)."""
    model = nanogpt()
    head = list(model.lm_head.parameters())
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    return torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": head, "lr": lr / 10}])


def lrs_over(optimizer, scheduler, steps: int) -> list[list[float]]:
    """Each group's LR before every optimizer step, training on (zero gradients, as a real loop steps)."""
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def test_apply_sticks_through_a_cosine_scheduler_already_built(result):
    from transformers import get_cosine_schedule_with_warmup

    optimizer = two_groups(3e-5)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=100)
    peak = result.apply(optimizer, scheduler, which="peak")
    assert peak == result.peak_lr
    seen = lrs_over(optimizer, scheduler, 100)
    # Step 0: the warmup's 0; step 5: half the peak; step 10: the peak; the end: near 0. The
    # second group keeps its tenth all along, and the old 3e-5 never comes back.
    assert seen[0] == [0.0, 0.0]
    assert seen[5] == pytest.approx([peak / 2, peak / 20], rel=1e-9)
    assert seen[10] == pytest.approx([peak, peak / 10], rel=1e-9)
    assert seen[99][0] < peak * 1e-3 and seen[99][1] == pytest.approx(seen[99][0] / 10, rel=1e-9)


def test_apply_without_a_scheduler_sets_the_constant_lr_and_keeps_group_ratios(result):
    optimizer = two_groups(1e-3)
    assert result.apply(optimizer) == result.optimal_lr
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([result.optimal_lr, result.optimal_lr / 10])


@pytest.mark.parametrize("kind", ["onecycle", "warmup_cosine", "wsd"])
def test_make_scheduler_gives_the_schedule_transformers_and_torch_would(result, kind):
    """Step for step the LRs of OneCycleLR, transformers' cosine-with-warmup and WSD (linear
    decay) at the result's peak or plateau, with a cosine scheduler built on the optimizer before."""
    from transformers import get_cosine_schedule_with_warmup, get_wsd_schedule

    total = 200
    optimizer = two_groups()
    get_cosine_schedule_with_warmup(optimizer, 5, 50)  # the user's old scheduler: made, then replaced
    ours = lrs_over(optimizer, result.make_scheduler(optimizer, total, kind=kind), total)
    reference = two_groups()
    top = result.lr_for("wsd" if kind == "wsd" else "peak")
    for group, lr in zip(reference.param_groups, (top, top / 10)):
        group["lr"] = lr
    warmup, decay = round(total * 0.05), round(total * 0.2)
    built = {"onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(
                 reference, max_lr=[top, top / 10], total_steps=total, pct_start=0.3, div_factor=25.0,
                 final_div_factor=1e4, cycle_momentum=False),
             "warmup_cosine": lambda: get_cosine_schedule_with_warmup(reference, warmup, total),
             "wsd": lambda: get_wsd_schedule(reference, warmup, decay, num_training_steps=total,
                                             decay_type="linear")}[kind]()
    expected = lrs_over(reference, built, total)
    assert np.allclose(ours, expected, rtol=1e-9, atol=1e-15)
    assert max(row[0] for row in ours) == pytest.approx(top, rel=1e-9)


def test_the_wsd_block_holds_the_plateau_in_torch_hf_and_deepspeed_forms(result):
    wsd = result.schedule["wsd"]
    assert result.optimal_lr < wsd["plateau_lr"] < result.peak_lr
    assert (wsd["warmup_steps"], wsd["num_decay_steps"], wsd["num_stable_steps"]) == (10, 40, 150)
    hf = wsd["huggingface"]
    assert hf["lr_scheduler_type"] == "warmup_stable_decay" and hf["learning_rate"] == wsd["plateau_lr"]
    from transformers import TrainingArguments, get_scheduler

    args = TrainingArguments(output_dir="unused", report_to=[], **{k: v for k, v in hf.items()})
    optimizer = two_groups(hf["learning_rate"])
    via_hf = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                           num_training_steps=200, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    mine = two_groups()
    assert np.allclose(lrs_over(optimizer, via_hf, 200), lrs_over(mine, result.make_scheduler(mine, 200, "wsd"), 200))
    ds = wsd["deepspeed"]["scheduler"]
    assert ds["type"] == "WarmupLR" and ds["params"]["warmup_max_lr"] == wsd["plateau_lr"]
    assert "make_scheduler" in wsd["deepspeed"]["decay"]


def test_bad_arguments_to_apply_and_make_scheduler_name_what_is_allowed(result):
    optimizer = two_groups()
    with pytest.raises(ValueError, match="which='plateau' is not supported"):
        result.apply(optimizer, which="plateau")
    with pytest.raises(ValueError, match="kind='cosine' is not supported.*did you mean 'warmup_cosine'"):
        result.make_scheduler(optimizer, 100, kind="cosine")
    with pytest.raises(ValueError, match="total_steps=0 is not allowed"):
        result.make_scheduler(optimizer, 0)


# -- reading it in a notebook ----------------------------------------------------------------------


def test_the_summary_and_repr_are_a_few_lines(result):
    text = result.summary()
    assert len(text.splitlines()) <= 8 and text.startswith(f"suggested lr: {result.optimal_lr:.3e}")
    assert "warmup-stable-decay plateau" in text and "band:" in text and "range test:" in text
    assert repr(result).startswith("LRFinderResult(\nsuggested lr") and len(repr(result).splitlines()) <= 10
    assert len(result.summary(full=True).splitlines()) >= len(text.splitlines())


def test_a_search_space_is_log_uniform_around_the_suggestion(result):
    optuna = pytest.importorskip("optuna")
    space = result.search_space("optuna")
    low, high = space.bounds
    assert low <= result.optimal_lr / 3 and high >= max(result.optimal_lr * 3, result.peak_lr)
    study = optuna.create_study()
    picked = [space(study.ask())["learning_rate"] for _ in range(20)]
    assert all(low <= lr <= high for lr in picked) and len(set(picked)) == 20
    assert study.trials[0].distributions["learning_rate"].log is True
    with pytest.raises(ValueError, match="kind='hyperopt' is not supported"):
        result.search_space("hyperopt")


# -- the names users type ------------------------------------------------------------------------


def test_the_hugging_face_names_work_as_flags_and_yaml_keys(tmp_path):
    from distlr.cli.parse import parse_cli

    flags = parse_cli(["--gradient-accumulation-steps", "2", "--mixed_precision", "bf16",
                       "--per-device-train-batch-size", "4"])
    assert (flags.range_test.accumulation_steps, flags.range_test.amp, flags.batch_size) == (2, "bf16", 4)
    config = tmp_path / "run.yaml"
    config.write_text("gradient_accumulation_steps: 3\nmixed_precision: no\nper_device_train_batch_size: 2\n")
    yaml = parse_cli(["--config", str(config)])
    assert (yaml.range_test.accumulation_steps, yaml.range_test.amp, yaml.batch_size) == (3, "no", 2)
    # A flag overrides the YAML whichever name either uses.
    assert parse_cli(["--config", str(config), "--accumulation-steps", "5"]).range_test.accumulation_steps == 5


def test_one_setting_under_two_names_with_two_values_is_refused(tmp_path, capsys):
    assert main(["--batch-size", "8", "--per_device_train_batch_size", "4", "--output-dir", str(tmp_path / "r")]) == 2
    assert "gives batch_size='8' and per_device_train_batch_size='4', two names for the same setting" in (
        capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


# -- muP ---------------------------------------------------------------------------------------------


def mup_mlp(width: int) -> nn.Module:
    from mup import MuReadout

    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), MuReadout(width, 1))


def test_a_mup_range_test_moves_every_group_and_keeps_muadamws_ratios():
    """The muP recipe (docs/api.md): set_base_shapes, MuAdamW, a range test at the width you
    train. MuAdamW gives the hidden matrices lr / width_mult; the ladder moves the group with the
    largest LR and every other group keeps its ratio to it, in the range test and in apply()."""
    mup = pytest.importorskip("mup")
    torch.manual_seed(0)
    model = mup_mlp(64)
    mup.set_base_shapes(model, mup_mlp(8), delta=mup_mlp(16))
    optimizer = mup.MuAdamW(model.parameters(), lr=1e-3)
    before = [g["lr"] for g in optimizer.param_groups]
    ratios = sorted({g["lr"] / 1e-3 for g in optimizer.param_groups})
    assert ratios == [0.125, 1.0]  # width 64 over base 8: the hidden matrices at an eighth
    seen = []

    def loss_fn(module, batch):
        seen.append([g["lr"] for g in optimizer.param_groups])
        x, y = batch
        return nn.functional.mse_loss(module(x).squeeze(-1), y)

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 4, generator=g) for _ in range(8)]
    learnable = [(x, x.sum(1)) for x in xs]
    result = LRFinder(model, learnable, optimizer, loss_fn=loss_fn, device="cpu").find(
        min_lr=1e-4, max_lr=1.0, num_steps=25, extend_range=False, progress=False)
    top = max(range(len(optimizer.param_groups)), key=lambda i: optimizer.param_groups[i]["lr"])
    assert [row[top] for row in seen] == pytest.approx(result.lrs, rel=1e-12)
    for row in seen:
        assert sorted({lr / row[top] for lr in row}) == pytest.approx(ratios, rel=1e-9)
    assert [g["lr"] for g in optimizer.param_groups] == before  # restored
    assert result.optimal_lr is not None, result.suggestion_note
    result.apply(optimizer)
    assert sorted({g["lr"] / result.optimal_lr for g in optimizer.param_groups}) == pytest.approx(ratios)


def test_the_ray_search_space_says_how_to_get_ray_when_it_is_missing(result):
    try:
        import ray  # noqa: F401
        pytest.skip("ray is installed: the space is ray's own tune.loguniform")
    except ImportError:
        pass
    space = result.search_space("ray", low=1e-4, high=1e-2)
    assert space.bounds == (1e-4, 1e-2)
    with pytest.raises(ImportError, match=r"pip install 'ray\[tune\]'"):
        space(None)

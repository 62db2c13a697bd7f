"""The schedule recommendation: its numbers, its JSON, and that each form builds the real scheduler."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distlr.core.schedule import recommend_schedule


def assert_plain_json(value: object, path: str = "schedule") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{path} has a non-str key {key!r}"
            assert_plain_json(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_plain_json(item, f"{path}[{i}]")
    else:
        assert value is None or type(value) in (str, int, float, bool), f"{path} is a {type(value).__name__}"


def tiny_sgd(lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=lr, momentum=0.9)


def test_one_cycle_and_warmup_cosine_values():
    s = recommend_schedule(2e-3, total_steps=1000, min_lr_ratio=0.1)
    assert s["peak_lr"] == 2e-3 and s["total_steps"] == 1000
    assert s["one_cycle"] == {
        "max_lr": 2e-3,
        "initial_lr": pytest.approx(2e-3 / 25),
        "final_lr": pytest.approx(2e-3 / 25 / 1e4),
        "pct_start": 0.3,
        "div_factor": 25.0,
        "final_div_factor": 1e4,
    }
    assert s["warmup_cosine"] == {
        "peak_lr": 2e-3,
        "warmup_steps": 50,
        "min_lr": pytest.approx(2e-4),
    }
    assert s["torch"]["OneCycleLR"] == {
        "max_lr": 2e-3,
        "total_steps": 1000,
        "pct_start": 0.3,
        "div_factor": 25.0,
        "final_div_factor": 1e4,
        "anneal_strategy": "cos",
        "cycle_momentum": False,
    }


@pytest.mark.parametrize("total_steps", [None, 1, 1000])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_json_round_trip(total_steps, min_lr_ratio):
    s = recommend_schedule(3e-4, total_steps=total_steps, min_lr_ratio=min_lr_ratio)
    assert_plain_json(s)
    assert json.loads(json.dumps(s)) == s


def test_numpy_numbers_come_out_as_plain_python():
    s = recommend_schedule(np.float32(1e-3), total_steps=np.int64(200), warmup_ratio=np.float64(0.1))
    assert_plain_json(s)
    assert s["total_steps"] == 200 and s["warmup_cosine"]["warmup_steps"] == 20


def test_unknown_total_steps_leaves_nulls_and_says_so():
    s = recommend_schedule(1e-3)
    ds = s["deepspeed"]
    assert s["total_steps"] is None
    assert s["warmup_cosine"]["warmup_steps"] == 0.05  # transformers >= 5 reads a float < 1 as a fraction
    assert s["torch"]["OneCycleLR"]["total_steps"] is None
    assert ds["scheduler"]["params"]["total_num_steps"] is None
    assert ds["scheduler"]["params"]["warmup_num_steps"] is None
    assert ds["alternatives"]["OneCycle"]["params"]["cycle_first_step_size"] is None
    assert ds["alternatives"]["OneCycle"]["params"]["cycle_second_step_size"] is None
    assert ds["alternatives"]["WarmupDecayLR"]["params"]["total_num_steps"] is None
    assert ds["alternatives"]["WarmupDecayLR"]["params"]["warmup_num_steps"] is None
    # Without a step count, Hugging Face gets the ratio (transformers >= 5 reads a float < 1 so).
    assert s["huggingface"]["warmup_steps"] == 0.05
    assert any("total_steps was not given" in note and "null" in note for note in s["notes"])


def test_known_total_steps_fills_every_step_count():
    s = recommend_schedule(1e-3, total_steps=1000)
    ds = s["deepspeed"]
    assert s["warmup_cosine"]["warmup_steps"] == 50
    assert s["huggingface"]["warmup_steps"] == 50
    assert ds["scheduler"]["params"]["total_num_steps"] == 1000
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 50
    assert ds["alternatives"]["OneCycle"]["params"]["cycle_first_step_size"] == 300
    assert ds["alternatives"]["OneCycle"]["params"]["cycle_second_step_size"] == 700
    assert not any("null" in note for note in s["notes"])


def test_huggingface_fields():
    assert recommend_schedule(1e-3, total_steps=1000)["huggingface"] == {
        "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 50,
    }
    floored = recommend_schedule(1e-3, total_steps=1000, min_lr_ratio=0.1)["huggingface"]
    assert floored["lr_scheduler_type"] == "cosine_with_min_lr"
    assert floored["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}


def test_deepspeed_blocks_use_deepspeeds_parameter_names():
    ds = recommend_schedule(1e-3, total_steps=1000, min_lr_ratio=0.01)["deepspeed"]
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"] == {
        "total_num_steps": 1000,
        "warmup_num_steps": 50,
        "warmup_min_ratio": 0.0,
        "cos_min_ratio": 0.01,
        "warmup_type": "linear",
    }
    one_cycle = ds["alternatives"]["OneCycle"]
    assert one_cycle["type"] == "OneCycle"
    assert one_cycle["params"]["cycle_min_lr"] == pytest.approx(1e-3 / 25)
    assert one_cycle["params"]["cycle_max_lr"] == 1e-3
    assert set(one_cycle["params"]) == {
        "cycle_min_lr",
        "cycle_max_lr",
        "cycle_first_step_size",
        "cycle_second_step_size",
        "decay_lr_rate",
        "cycle_momentum",
    }
    decay = ds["alternatives"]["WarmupDecayLR"]
    assert decay["type"] == "WarmupDecayLR"
    assert decay["params"] == {
        "total_num_steps": 1000,
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 1e-3,
        "warmup_num_steps": 50,
        "warmup_type": "linear",
    }


def test_a_warmup_that_rounds_to_zero_stays_valid_for_deepspeed():
    s = recommend_schedule(1e-3, total_steps=10, warmup_ratio=0.01)
    assert s["warmup_cosine"]["warmup_steps"] == 0
    assert s["deepspeed"]["scheduler"]["params"]["warmup_num_steps"] == 1
    assert any("rounds to 0 steps" in note for note in s["notes"])


def test_torch_kwargs_build_one_cycle_lr():
    s = recommend_schedule(1e-2, total_steps=100)
    optimizer = tiny_sgd(lr=123.0)  # OneCycleLR must overwrite it
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, **s["torch"]["OneCycleLR"])
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(99):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen[0] == pytest.approx(s["one_cycle"]["initial_lr"])
    assert max(seen) == pytest.approx(s["one_cycle"]["max_lr"])
    assert seen[-1] == pytest.approx(s["one_cycle"]["final_lr"])


@pytest.mark.parametrize("total_steps", [1000, None])
def test_huggingface_fields_build_training_arguments(tmp_path, total_steps):
    transformers = pytest.importorskip("transformers")
    if total_steps is None and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 reads warmup_steps as an int only")
    fields = recommend_schedule(1e-3, total_steps=total_steps)["huggingface"]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], **fields)
    assert args.learning_rate == 1e-3
    assert args.get_warmup_steps(1000) == 50


def test_deepspeed_blocks_build_deepspeeds_schedulers():
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    s = recommend_schedule(1e-2, total_steps=100, min_lr_ratio=0.1)
    ds = s["deepspeed"]

    optimizer = tiny_sgd(lr=s["peak_lr"])  # the tuned config sets the optimizer's lr to peak_lr
    cosine = lr_schedules.WarmupCosineLR(optimizer, **ds["scheduler"]["params"])
    for _ in range(100):
        cosine.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(s["warmup_cosine"]["min_lr"])

    optimizer = tiny_sgd(lr=1.0)
    one_cycle = lr_schedules.OneCycle(optimizer, **ds["alternatives"]["OneCycle"]["params"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(s["one_cycle"]["initial_lr"])
    for _ in range(30):
        one_cycle.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(s["peak_lr"])

    optimizer = tiny_sgd(lr=1.0)
    decay = lr_schedules.WarmupDecayLR(optimizer, **ds["alternatives"]["WarmupDecayLR"]["params"])
    for _ in range(6):  # step() k sets iteration k - 1: the 5-step warmup is over at the 6th
        decay.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(s["peak_lr"])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"peak_lr": 0.0}, "peak_lr"),
        ({"peak_lr": -1e-3}, "peak_lr"),
        ({"peak_lr": math.nan}, "peak_lr"),
        ({"peak_lr": math.inf}, "peak_lr"),
        ({"peak_lr": True}, "peak_lr"),
        ({"peak_lr": "1e-3"}, "peak_lr"),
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": -5}, "total_steps"),
        ({"total_steps": 100.0}, "total_steps"),
        ({"total_steps": True}, "total_steps"),
        ({"warmup_ratio": -0.1}, "warmup_ratio"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"one_cycle_pct_start": 0.0}, "one_cycle_pct_start"),
        ({"one_cycle_pct_start": 1.0}, "one_cycle_pct_start"),
        ({"div_factor": 0.5}, "div_factor"),
        ({"final_div_factor": 0.0}, "final_div_factor"),
        ({"final_div_factor": math.inf}, "final_div_factor"),
        ({"min_lr_ratio": -0.1}, "min_lr_ratio"),
        ({"min_lr_ratio": 1.0}, "min_lr_ratio"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    kwargs = {"peak_lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}=.* is not allowed; allowed: "):
        recommend_schedule(kwargs.pop("peak_lr"), **kwargs)

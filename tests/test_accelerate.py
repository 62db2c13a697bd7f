"""A training script written for Hugging Face Accelerate: ``LRFinder.from_accelerator`` with what
``accelerator.prepare`` returned, under torchrun with 2 ranks. The range test goes through the
accelerator (backward, autocast, the prepared optimizer) and records the curve one process
records with the same global batch; afterwards the script's own loop trains on exactly as if
no sweep had run."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import (EQUIV, Scenarios, assert_same_bits, deepspeed_engine, digest, ds_config, engine_digest, errors_of,
                     fingerprint, launch, mlp, mse, read_ranks, regression_data, run_job, state_digest)
from test_distributed import assert_matches_one_process

pytestmark = pytest.mark.timeout(400)
MODULE = "test_accelerate"
scenarios = Scenarios()


def prepared(*, batch_size: int = 8, shuffle: bool = False, momentum: float = 0.0, **accelerator_args):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # One accelerator per scenario, in one process: forget the last one's settings (the
    # process group stays), as Accelerate's own tests do.
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu="deepspeed_plugin" not in accelerator_args, **accelerator_args)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    loader = DataLoader(regression_data(n=1536), batch_size=batch_size, shuffle=shuffle)
    return accelerator, *accelerator.prepare(model, optimizer, loader)


def train(accelerator, model, optimizer, loader, steps: int) -> list[float]:
    """The script's own loop, as Accelerate's examples write it."""
    losses = []
    for _, (x, y) in zip(range(steps), loader):
        with accelerator.accumulate(model):
            loss = mse(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def loader_state(accelerator, loader) -> dict:
    return {"iteration": loader.iteration, "step": accelerator.step,
            "sync_gradients": accelerator.gradient_state.sync_gradients,
            "in_dataloader": accelerator.gradient_state.in_dataloader}


# -- scenarios (every rank runs them) ------------------------------------------------------------


@scenarios
def equivalence(out: Path, accumulation: str, accelerator_accumulation: str) -> dict:
    """EQUIV through the accelerator: a global batch of 16 over 2 ranks, as micro-batch x
    accumulation, the accumulation given to ``find()`` (``accumulation``, 0 for not given) or
    only set on the Accelerator, which ``find()`` then follows."""
    from distlr import LRFinder

    given, theirs = int(accumulation), int(accelerator_accumulation)
    accelerator, model, optimizer, loader = prepared(batch_size=8 // max(given, theirs),
                                                     gradient_accumulation_steps=theirs)
    if theirs > 1:
        # The script is midway through its own accumulation: one micro-batch's gradient is
        # there, and the accelerator says gradients are not synced (so its optimizer's step and
        # zero_grad do nothing). The range test must start from clean gradients all the same.
        x, y = next(iter(loader))
        with accelerator.accumulate(model):
            accelerator.backward(mse(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        assert not accelerator.sync_gradients and model.module[0].weight.grad is not None
    before = fingerprint(model, optimizer)
    with LRFinder.from_accelerator(accelerator, model, optimizer, loader, mse) as finder:
        refused = errors_of({"amp": lambda: finder.find(num_steps=5, amp="bf16"),
                             "accumulation": lambda: finder.find(num_steps=5, accumulation_steps=theirs + 1)})
        result = finder.find(**EQUIV, **({"accumulation_steps": given} if given else {})).to_dict()
    assert_same_bits(before, fingerprint(model, optimizer))  # the script's gradient is back too
    return {**result, "refused": refused}


@scenarios
def script(out: Path, sweep: str) -> dict:
    """The script trains 3 steps, sweeps (or not), then trains 4 more: with the range test, the 4
    losses must be the ones without it, and everything it owns must be as it was."""
    from distlr import LRFinder

    accelerator, model, optimizer, loader = prepared(shuffle=True, momentum=0.9, gradient_accumulation_steps=2)
    before = train(accelerator, model, optimizer, loader, 3)
    record = {"before": before}
    if sweep == "yes":
        state, bits = loader_state(accelerator, loader), fingerprint(model, optimizer)
        with LRFinder.from_accelerator(accelerator, model, optimizer, loader, mse) as finder:
            result = finder.find(min_lr=1e-4, max_lr=10.0, num_steps=30)
        record["result"] = result.to_dict()
        record["state"] = [state, loader_state(accelerator, loader)]
        record["same_digest"] = state_digest(model, optimizer) == digest(bits)
    record["after"] = train(accelerator, model, optimizer, loader, 4)
    return record


@scenarios
def bf16(out: Path) -> dict:
    """An accelerator set to bf16: the range test runs in bf16 through ``accelerator.autocast``, and an
    ``amp`` that contradicts it is refused before any step, naming both."""
    from distlr import LRFinder

    accelerator, model, optimizer, loader = prepared(mixed_precision="bf16")
    seen = []
    model.module[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with LRFinder.from_accelerator(accelerator, model, optimizer, loader, mse) as finder:
        refused = errors_of({"amp": lambda: finder.find(num_steps=5, amp="fp16")})["amp"]
        steps_when_refused = len(seen)
        result = finder.find(min_lr=1e-4, max_lr=1.0, num_steps=10, extend_range=False)
    return {"refused": refused, "steps_when_refused": steps_when_refused, "dtypes": sorted({str(d) for d in seen}),
            "losses": result.losses}


def _deepspeed_plugin(stage: int):
    import deepspeed
    from accelerate.utils import DeepSpeedPlugin

    # As helpers.deepspeed_engine: no shared-memory comm op (a minute of JIT compiling on a CPU).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = ds_config(stage)
    config.pop("optimizer", None)  # the script's optimizer, as Accelerate wants it
    return config, DeepSpeedPlugin(hf_ds_config=config)


@scenarios
def zero(out: Path, stage: str) -> dict:
    """Accelerate running DeepSpeed: ``from_accelerator`` hands the engine to distlr's DeepSpeed
    backend; the curve is the one a user's own engine gives, and the engine comes back."""
    from distlr import LRFinder

    config, plugin = _deepspeed_plugin(int(stage))
    accelerator, engine, optimizer, loader = prepared(momentum=0.9, deepspeed_plugin=plugin)
    sweep = dict(min_lr=1e-4, max_lr=1.0, num_steps=12, extend_range=False)
    state, before = loader_state(accelerator, loader), engine_digest(engine)
    with LRFinder.from_accelerator(accelerator, engine, optimizer, loader, mse) as finder:
        result = finder.find(**sweep).to_dict()
    record = {"result": result, "restored": engine_digest(engine) == before,
              "state": [state, loader_state(accelerator, loader)]}
    model = mlp()
    own = deepspeed_engine(model, config, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    with LRFinder(own, DataLoader(regression_data(n=1536), batch_size=8), None, mse) as finder:
        record["own_engine"] = finder.find(**sweep).to_dict()
    return record


@scenarios
def miscounted(out: Path) -> dict:
    """Accelerate with DeepSpeed on a CPU counts one process in a 2-rank job: refused."""
    from distlr import LRFinder

    _, plugin = _deepspeed_plugin(2)
    accelerator, engine, optimizer, loader = prepared(deepspeed_plugin=plugin)
    try:
        LRFinder.from_accelerator(accelerator, engine, optimizer, loader, mse)
    except ValueError as e:
        return {"error": str(e), "counted": accelerator.num_processes}
    return {"error": None, "counted": accelerator.num_processes}


# -- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accelerate_job(tmp_path_factory):
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("accelerate")
    job = launch(MODULE, out, ["equivalence:1:1", "equivalence:2:1", "equivalence:0:4", "script:yes", "bf16"])
    assert job.returncode == 0, job.explain()
    baseline = launch(MODULE, out, ["script:no"])
    assert baseline.returncode == 0, baseline.explain()
    return out


@pytest.mark.parametrize("spec", ["equivalence:1:1", "equivalence:2:1", "equivalence:0:4"])
def test_the_accelerator_records_the_curve_of_one_process_with_the_global_batch(accelerate_job, spec):
    """0:4 is an Accelerator(gradient_accumulation_steps=4) and a find() that does not say:
    the range test runs on the global batch training uses (2 per micro-batch x 2 ranks x 4)."""
    results = read_ranks(accelerate_job, spec)
    assert results[0] == results[1]
    refused = results[0].pop("refused")
    assert refused["amp"] == "ValueError: amp='bf16' but the Accelerator's mixed_precision is 'no'; pass amp='no'"
    theirs = int(spec.split(":")[2])
    if theirs > 1:
        assert refused["accumulation"] == (
            f"ValueError: accumulation_steps={theirs + 1} but the Accelerator's gradient_accumulation_steps is "
            f"{theirs}: the range test runs on the batch training uses; leave accumulation_steps out (or pass "
            f"{theirs}), or build the Accelerator with gradient_accumulation_steps={theirs + 1}")
    else:
        assert refused["accumulation"] is None  # distlr accumulates by itself when the Accelerator does not
    assert results[0]["global_batch_size"] == 16
    assert_matches_one_process(results[0], world=2)


def test_the_scripts_own_loop_trains_on_as_if_no_sweep_had_run(accelerate_job):
    swept, plain = read_ranks(accelerate_job, "script:yes"), read_ranks(accelerate_job, "script:no")
    for rank in range(2):
        assert swept[rank]["result"]["losses"], "the range test recorded no curve"
        before_sweep, after_sweep = swept[rank]["state"]
        assert after_sweep == before_sweep
        assert swept[rank]["same_digest"]
        assert swept[rank]["before"] == plain[rank]["before"]
        assert swept[rank]["after"] == plain[rank]["after"]  # bit for bit: the same floats


def test_an_accelerator_in_bf16_sweeps_in_bf16_and_refuses_a_contradicting_amp(accelerate_job):
    for record in read_ranks(accelerate_job, "bf16"):
        assert record["refused"].startswith("ValueError: amp='fp16'") and "bf16" in record["refused"]
        assert record["steps_when_refused"] == 0
        assert record["dtypes"] == ["torch.bfloat16"]
        assert len(record["losses"]) == 10 and all(loss == loss for loss in record["losses"])


@pytest.fixture(scope="module")
def zero_job(tmp_path_factory):
    pytest.importorskip("accelerate")
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("accelerate_zero")
    # One rank: Accelerate with DeepSpeed counts a CPU job as one process (see miscounted).
    job = launch(MODULE, out, ["zero:2"], nproc=1)
    assert job.returncode == 0, job.explain()
    job = launch(MODULE, out, ["zero:3"], nproc=1)
    assert job.returncode == 0, job.explain()
    job = launch(MODULE, out, ["miscounted"])
    assert job.returncode == 0, job.explain()
    return out


@pytest.mark.parametrize("stage", ["2", "3"])
def test_an_accelerator_running_deepspeed_sweeps_its_engine_and_gives_it_back(zero_job, stage):
    [record] = read_ranks(zero_job, f"zero:{stage}", world=1)
    assert record["restored"]
    assert record["state"][0] == record["state"][1]
    ours, own = record["result"], record["own_engine"]
    assert len(ours["losses"]) == 12
    assert ours["losses"] == pytest.approx(own["losses"], rel=1e-6)


def test_an_accelerator_that_miscounts_the_ranks_is_refused_before_any_step(zero_job):
    for record in read_ranks(zero_job, "miscounted"):
        assert record["counted"] == 1
        assert "counts 1 process(es) but the job has 2 ranks" in record["error"]


def test_accelerate_launch_runs_the_cli_with_its_mixed_precision(tmp_path):
    """``accelerate launch -m distlr``: two ranks, and --mixed_precision bf16 becomes amp=bf16."""
    pytest.importorskip("accelerate")
    launcher = Path(sys.executable).parent / "accelerate"
    job = run_job([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "distlr", "--num-steps", "12", "--no-extend-range",
                   "--output-dir", str(tmp_path / "run"), "--no-progress"], timeout=300, cwd=tmp_path)
    assert job.returncode == 0, job.explain()
    assert "from accelerate launch (a flag or the YAML file overrides these): amp=bf16" in job.output
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["world_size"] == 2 and len(result["losses"]) == 12
    assert "amp: bf16" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize("env, given, expected", [
    ({}, (), {}),
    ({"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, (),
     {"amp": "bf16", "accumulation_steps": "4"}),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, ("amp",), {}),  # --amp given: the launcher's value is not read
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, (), {"deepspeed": "ds.json"}),
    ({"ACCELERATE_USE_FSDP": "true"}, (), {"fsdp": True}),
    ({"ACCELERATE_USE_FSDP": "true"}, ("deepspeed",), {}),
])
def test_the_settings_accelerate_launch_hands_over_become_defaults(env, given, expected):
    from distlr.cli.parse import from_accelerate_launch

    assert from_accelerate_launch(env, given) == expected


@pytest.mark.parametrize("env, words", [
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "--mixed_precision fp8: distlr runs no, bf16, fp16"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "--use_deepspeed without --deepspeed_config_file"),
])
def test_settings_distlr_cannot_follow_are_named(env, words):
    from distlr.cli.parse import from_accelerate_launch

    with pytest.raises(ValueError, match=re.escape(words)):
        from_accelerate_launch(env)

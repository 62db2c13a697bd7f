"""DeepSpeed ZeRO-1/2/3 on CPU (gloo, 2 ranks, launched with torchrun): the curve, the agreement
between ranks, the engine built from a config with the range test's arguments, HF GPT-2 under ZeRO-3,
"auto" configs and the tuned config, bad DeepSpeed input.

One launch runs most scenarios (a launch costs seconds of imports); DeepSpeed's op compilation
is kept out (torch optimizers on CPU, no shared-memory comm op).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from distlr import LRFinder  # noqa: E402
from helpers import (EQUIV, RANK, REPO, Scenarios, deepspeed_engine, deepspeed_launcher, disk_looks_full_on,  # noqa: E402
                     ds_config, engine_digest, equivalence_run, errors_of, launch, mlp, mse, read_ranks,
                     regression_data, torchrun)

pytestmark = pytest.mark.timeout(500)
MODULE = "test_deepspeed"
STAGES = ["1", "2", "3"]
scenarios = Scenarios()


# -- scenarios (every rank runs them) ------------------------------------------------------------


@scenarios
def curve(out: Path, stage: str) -> dict:
    """The DDP equivalence sweep under ZeRO-N (fp32, plain SGD): the curve must match."""
    loader = DataLoader(regression_data(n=1536), batch_size=8, shuffle=False)
    # DeepSpeed clips at 1.0 unless told otherwise; the DDP reference does not clip.
    config = ds_config(int(stage), gradient_clipping=0.0)
    with LRFinder(mlp(), loader, criterion=mse, device="cpu", deepspeed_config=config) as finder:
        return finder.find(**EQUIV).to_dict()


@scenarios
def gpt2_zero3(out: Path) -> dict:
    """A Hugging Face GPT-2 under ZeRO-3 is initialised with the weights it was built with,
    really partitioned, and comes back bit for bit after every sweep."""
    import deepspeed
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    model.loss_type = "ForCausalLM"
    built = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(1, 256, (64, 16), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]
    config = ds_config(3, optimizer={"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}})
    with LRFinder(model, DataLoader(rows, batch_size=4), device="cpu", deepspeed_config=config) as finder:
        result = finder.find(min_lr=1e-5, max_lr=1.0, num_steps=12)
        engine = finder._backend.engine  # built by the first find()
        after_first = engine_digest(engine)
        finder.find(min_lr=1e-5, max_lr=1.0, num_steps=6)
        after_second = engine_digest(engine)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        initialised = all(torch.equal(built[n], p) for n, p in engine.module.named_parameters())
    partitioned = [p.ds_tensor.numel() for p in engine.module.parameters()][:3]
    return {"result": result.to_dict(), "initialised": initialised, "restored": after_first == after_second,
            "partition_sizes": partitioned, "full_sizes": [v.numel() for v in list(built.values())[:3]]}


AUTO_CONFIG = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "steps_per_print": 10**9,
    "optimizer": {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": 5000}},
    "zero_optimization": {"stage": 2, "overlap_comm": False},
    "zero_allow_untested_optimizer": True,
}
"""A Hugging Face-style config full of "auto"."""


@scenarios
def auto(out: Path) -> dict:
    """The "auto" config from a file; the tuned copy must load back into DeepSpeed."""
    path = out / "ds_auto.json"
    if RANK == 0:
        path.write_text(json.dumps(AUTO_CONFIG))
    dist.barrier()
    loader = DataLoader(regression_data(n=1536), batch_size=8, shuffle=False)
    with LRFinder(mlp(), loader, criterion=mse, device="cpu", deepspeed_config=str(path)) as finder:
        # 60 steps: at 30 the noisy regression has too few points on its descent for an answer.
        result = finder.find(min_lr=1e-4, max_lr=10.0, num_steps=60, smooth_factor=0.5)
    tuned = result.deepspeed_config
    lrs = None
    if tuned is not None:
        fresh = mlp()
        engine = deepspeed_engine(fresh, {**tuned, "train_batch_size": 16, "train_micro_batch_size_per_gpu": 8,
                                          "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                                          "bf16": {"enabled": False},
                                          "optimizer": {**tuned["optimizer"],
                                                        "params": {"lr": tuned["optimizer"]["params"]["lr"]}}})
        lrs = []
        for _ in range(3):
            lrs.append(engine.get_lr()[0])
            engine.lr_scheduler.step()
        lrs.append(engine.lr_scheduler.get_lr()[0])
    return {"result": result.to_dict(), "tuned": tuned, "lrs": lrs, "file_after": json.loads(path.read_text())}


@scenarios
def auto_from_find(out: Path) -> dict:
    """The "auto" config as a dict, and the precision, accumulation and clipping given to
    find(): the engine is built with them (it used to be built before find() had them)."""
    loader = DataLoader(regression_data(n=1536), batch_size=8, shuffle=False)
    with LRFinder(mlp(), loader, criterion=mse, device="cpu", deepspeed_config=AUTO_CONFIG) as finder:
        result = finder.find(min_lr=1e-4, max_lr=1.0, num_steps=10, amp="bf16", accumulation_steps=2,
                             max_grad_norm=0.5)
        engine = finder._backend.engine
        return {"result": result.to_dict(), "bf16": engine.bfloat16_enabled(),
                "accumulation": engine.gradient_accumulation_steps(), "clipping": engine.gradient_clipping(),
                "micro_batch": engine.train_micro_batch_size_per_gpu()}


@scenarios
def user_engine(out: Path) -> dict:
    """The user's own engine, with its own LR scheduler: set aside for the range test, then back."""
    model = mlp()
    config = ds_config(2, gradient_clipping=0.0,
                       scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.05,
                                                                  "warmup_num_steps": 10}})
    config.pop("optimizer")
    engine = deepspeed_engine(model, config, torch.optim.SGD(model.parameters(), lr=0.05))
    loader = DataLoader(regression_data(n=1536), batch_size=8, shuffle=False)
    for x, y in list(loader)[:3]:
        engine.backward(mse(engine(x), y))
        engine.step()
    scheduler = engine.lr_scheduler
    lr_before, sched_before = engine.get_lr(), dict(scheduler.state_dict())
    before = engine_digest(engine)
    with LRFinder(engine, loader, criterion=mse, device="cpu") as finder:
        result = finder.find(**EQUIV)
    return {"result": result.to_dict(), "restored": engine_digest(engine) == before,
            "same_scheduler": engine.lr_scheduler is scheduler,
            "scheduler_state_same": dict(scheduler.state_dict()) == sched_before,
            "lr_same": engine.get_lr() == lr_before}


@scenarios
def bad_inputs(out: Path) -> dict:
    """Bad DeepSpeed input: the same error on every rank, before any training step."""
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("distlr").addHandler(handler)
    loader = DataLoader(regression_data(n=256), batch_size=8)
    bad_json = out / "bad.json"
    if RANK == 0:
        bad_json.write_text('{"zero_optimization": {"stage": 1},}')
    dist.barrier()
    small = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1},
             "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}

    def run(config, **find):
        def go():
            with LRFinder(mlp(), loader, None, mse, device="cpu", deepspeed_config=config,
                          snapshot=find.pop("snapshot", "memory"), snapshot_dir=out / "snap-ds") as finder:
                finder.find(**{"num_steps": 5, **find})
        return go

    def disk_full_on_rank1():
        with disk_looks_full_on(1):
            run(small, snapshot="disk")()

    record = errors_of({
        "missing_file": run("missing/ds_config.json"),
        "bad_json": run(str(bad_json)),
        "auto_unresolved": run({"zero_optimization": {"stage": 1, "reduce_bucket_size": "auto"}}),
        "optimizer_type": run({**small, "optimizer": {"type": "Lamb"}}),
        "accumulation": run(small, accumulation_steps=4),
        "amp": run(small, amp="bf16"),
        "clipping": run(small, max_grad_norm=0.5),
        "misspelled_key": run({**small, "gradient_cliping": 1.0}),
        "disk_full_on_rank1": disk_full_on_rank1,
    })
    dist.barrier()
    record["warnings"] = warnings
    record["left_on_disk"] = sorted(str(p) for p in (out / "snap-ds").rglob("*")) if (out / "snap-ds").exists() else []
    return record


@scenarios
def no_trace_in_the_process(out: Path) -> dict:
    """As in a plain process (no launcher, so no LOCAL_RANK): building and using a ZeRO-3 engine
    (which reads LOCAL_RANK in its forward pass) leaves the environment and DeepSpeed's op
    table as they were."""
    import deepspeed

    launcher_local_rank = os.environ.pop("LOCAL_RANK")
    try:
        before = {"LOCAL_RANK": os.environ.get("LOCAL_RANK"),
                  "shm_comm": deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm", "absent")}
        loader = DataLoader(regression_data(n=256), batch_size=8)
        with LRFinder(mlp(), loader, criterion=mse, device="cpu", deepspeed_config=ds_config(3)) as finder:
            result = finder.find(min_lr=1e-4, max_lr=1e-2, num_steps=5, extend_range=False)
            between = os.environ.get("LOCAL_RANK")  # after find(), before the finder is closed
        after = {"LOCAL_RANK": os.environ.get("LOCAL_RANK"),
                 "shm_comm": deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm", "absent")}
    finally:
        os.environ["LOCAL_RANK"] = launcher_local_rank
    return {"before": before, "after": after, "between": between, "steps": result.steps_run}


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    specs = [f"curve:{s}" for s in STAGES] + ["gpt2_zero3", "auto", "auto_from_find", "user_engine", "bad_inputs",
                                               "no_trace_in_the_process"]
    job = launch(MODULE, out, specs, timeout=420)
    assert job.returncode == 0, job.explain()
    return out


@pytest.fixture(scope="module")
def ddp_reference():
    return equivalence_run(batch_size=16)  # one process, the global batch of the 2-rank run


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_records_the_ddp_curve_and_stops_on_the_same_step(ds_run, ddp_reference, stage):
    ranks = read_ranks(ds_run, f"curve:{stage}")
    assert ranks[0] == ranks[1]
    result = ranks[0]
    k = ddp_reference["diverged_at"]
    assert result["zero_stage"] == int(stage) and result["world_size"] == 2 and result["global_batch_size"] == 16
    assert result["diverged_at"] == k and result["stop_reason"] == "diverged"
    # ZeRO reduce-scatters fp32 gradients in a different order than DDP's all-reduce: agreement
    # to 1e-4 relative over the whole curve before divergence.
    assert result["losses"][:k] == pytest.approx(ddp_reference["losses"][:k], rel=1e-4)


def test_hf_gpt2_under_zero3_is_initialised_partitioned_and_restored(ds_run):
    ranks = read_ranks(ds_run, "gpt2_zero3")
    for record in ranks:
        assert record["initialised"], "ZeRO-3 parameters differ from the weights the model was built with"
        assert record["restored"]
        assert all(2 * part == full for part, full in zip(record["partition_sizes"], record["full_sizes"]))
    assert ranks[0]["result"] == ranks[1]["result"]
    assert len(ranks[0]["result"]["losses"]) >= 5 and ranks[0]["result"]["zero_stage"] == 3


def test_auto_config_is_resolved_and_the_tuned_config_loads_into_deepspeed(ds_run):
    ranks = read_ranks(ds_run, "auto")
    record = ranks[0]
    result, tuned = record["result"], record["tuned"]
    assert result == ranks[1]["result"]
    assert result["optimal_lr"] is not None, result["suggestion_note"]
    assert result["global_batch_size"] == 16
    assert any("scheduler was set aside" in note for note in result["notes"])
    assert tuned == result["deepspeed_config"]
    # The user's total_num_steps (5000) gives a warmup + cosine schedule peaking at the one-cycle
    # peak (result.peak_lr), not at the constant-LR suggestion.
    assert tuned["optimizer"]["params"]["lr"] == result["peak_lr"] >= result["optimal_lr"]
    assert tuned["scheduler"]["type"] == "WarmupCosineLR"
    assert tuned["scheduler"]["params"]["total_num_steps"] == 5000
    assert tuned["scheduler"]["params"]["warmup_num_steps"] == 250
    assert tuned["train_batch_size"] == "auto"  # what the user left to their trainer stays theirs
    lrs = record["lrs"]
    assert lrs is not None and lrs[0] < lrs[-1] <= result["peak_lr"] * (1 + 1e-9)
    # The user's file is only read.
    assert record["file_after"]["optimizer"]["params"]["lr"] == "auto"
    assert record["file_after"]["scheduler"]["type"] == "WarmupDecayLR"


def test_auto_values_are_resolved_from_the_arguments_of_find(ds_run):
    ranks = read_ranks(ds_run, "auto_from_find")
    assert ranks[0]["result"] == ranks[1]["result"]
    for record in ranks:
        assert record["bf16"] is True and record["accumulation"] == 2 and record["clipping"] == 0.5
        assert record["micro_batch"] == 8  # from the loader
        assert record["result"]["accumulation_steps"] == 2 and record["result"]["global_batch_size"] == 32


def test_a_users_engine_and_its_scheduler_come_back_as_they_were(ds_run):
    ranks = read_ranks(ds_run, "user_engine")
    for record in ranks:
        assert record["restored"] and record["same_scheduler"] and record["scheduler_state_same"] and record["lr_same"]
        assert record["result"]["zero_stage"] == 2
        assert any("scheduler was set aside" in note for note in record["result"]["notes"])
        # The tuned config starts from the engine's own config.
        assert record["result"]["deepspeed_config"]["scheduler"]["type"] in ("WarmupLR", "WarmupCosineLR")
    assert ranks[0]["result"] == ranks[1]["result"]


BAD_INPUT_WORDS = {
    "missing_file": ["ValueError", "deepspeed_config='missing/ds_config.json': no such file"],
    "bad_json": ["ValueError", "is not valid JSON"],
    "auto_unresolved": ["ValueError", "'zero_optimization.reduce_bucket_size' is \"auto\"", "set it in the config"],
    "optimizer_type": ["ValueError", "'Lamb'", "pass optimizer="],
    "accumulation": ["ValueError", "accumulation_steps=4", "gradient_accumulation_steps=1"],
    "amp": ["ValueError", "amp='bf16'", "engine runs no"],
    "clipping": ["ValueError", "max_grad_norm=0.5", "gradient_clipping=1.0"],
}


@pytest.mark.parametrize("case", list(BAD_INPUT_WORDS))
def test_bad_deepspeed_input_fails_the_same_way_on_every_rank(ds_run, case):
    messages = [rank[case] for rank in read_ranks(ds_run, "bad_inputs")]
    assert messages[0] == messages[1]
    for word in BAD_INPUT_WORDS[case]:
        assert word in messages[0]


def test_a_deepspeed_snapshot_that_fails_on_one_rank_fails_every_rank_and_leaves_nothing(ds_run):
    rank0, rank1 = read_ranks(ds_run, "bad_inputs")
    assert rank1["disk_full_on_rank1"].startswith("OSError: snapshot='disk' needs about")
    assert rank0["disk_full_on_rank1"].startswith("RankFailure: rank 1 failed: OSError")
    assert rank0["left_on_disk"] == rank1["left_on_disk"] == []


def test_a_misspelled_deepspeed_key_is_warned_about_by_name(ds_run):
    ranks = read_ranks(ds_run, "bad_inputs")
    assert ranks[0]["misspelled_key"] is None  # a warning, not an error
    assert any("'gradient_cliping' (did you mean 'gradient_clipping'?)" in w for w in ranks[0]["warnings"])


def test_building_an_engine_leaves_no_trace_in_the_process(ds_run):
    for record in read_ranks(ds_run, "no_trace_in_the_process"):
        assert record["steps"] == 5
        assert record["before"]["LOCAL_RANK"] is None and record["between"] is None
        assert record["after"] == record["before"]


PLAIN_ZERO3 = """
import os, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from distlr import LRFinder

torch.manual_seed(0)
x = torch.randn(512, 8)
loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
config = {"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
with LRFinder(model, loader, criterion=nn.MSELoss(), deepspeed_config=config) as finder:
    result = finder.find(num_steps=20, min_lr=1e-5, max_lr=1.0)
print("steps", result.steps_run, "LOCAL_RANK" in os.environ)
"""


def test_zero3_runs_in_a_plain_python_process_without_local_rank(tmp_path):
    """The regression a user hit: KeyError 'LOCAL_RANK' at ZeRO-3's first forward."""
    script = tmp_path / "plain_zero3.py"
    script.write_text(PLAIN_ZERO3)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0 and "steps 20 False" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("config, launcher", [("zero1", "torchrun"), ("zero2", "deepspeed"), ("zero3", "torchrun"),
                                              ("zero3-offload", "torchrun")])
def test_shipped_zero_configs_run_and_write_the_tuned_config(tmp_path, config, launcher):
    """Each shipped config end to end, as its header says to run it; ZeRO-2 through DeepSpeed's
    own launcher (``deepspeed --module distlr``)."""
    ds_file = REPO / "configs" / f"ds_{config.replace('-', '_')}.json"
    original = ds_file.read_bytes()
    out = tmp_path / "run"
    args = ["--config", f"configs/{config}.yaml", "--num-steps", "40", "--no-progress", "--total-steps", "2000",
            "--output-dir", str(out)]
    if launcher == "torchrun":
        job = torchrun(["-m", "distlr", *args], nproc=2)
    else:
        job = deepspeed_launcher(["--module", "distlr", *args], nproc=2)
    assert job.returncode == 0, job.explain()
    result = json.loads((out / "result.json").read_text())
    assert result["zero_stage"] == int(config[4]) and result["world_size"] == 2
    assert job.output.count("suggested lr:") == 1, job.explain()  # printed by rank 0 only
    tuned = json.loads((out / "ds_config.tuned.json").read_text())
    assert tuned == result["deepspeed_config"]
    assert tuned["optimizer"]["params"]["lr"] == result["peak_lr"]  # --total-steps: warmup-cosine to the peak
    assert tuned["scheduler"]["type"] == "WarmupCosineLR" and tuned["scheduler"]["params"]["total_num_steps"] == 2000
    assert tuned["zero_optimization"] == json.loads(original)["zero_optimization"]
    assert ds_file.read_bytes() == original  # the user's config is only read

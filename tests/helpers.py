"""Test helpers shared by pytest and the torchrun worker processes (no pytest imports here)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "worker.py"
RANK = int(os.environ.get("RANK", 0))


class RegressionNet(nn.Module):
    """A small MLP with a BatchNorm (buffers) and dropout (RNG), for restore tests."""

    def __init__(self, n_in: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


def regression_data(n: int = 256, n_in: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    w = torch.randn(n_in, generator=g)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(n, generator=g))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard (no collective), else the tensor."""
    return t.to_local() if type(t).__name__ == "DTensor" else t


def fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Every bit a restore must bring back: parameters, buffers, grads, optimizer state and
    settings, and the next draw of every RNG (taken without consuming it). For sharded
    (DTensor) state, this rank's shards."""
    fp = {f"param/{k}": _local(v.detach()).clone() for k, v in model.named_parameters()}
    fp.update({f"buffer/{k}": _local(v.detach()).clone() for k, v in model.named_buffers()})
    fp.update({f"grad/{k}": None if v.grad is None else _local(v.grad).clone() for k, v in model.named_parameters()})
    fp["training"] = [m.training for m in model.modules()]
    if optimizer is not None:
        sd = optimizer.state_dict()
        for pid, state in sd["state"].items():
            for key, value in state.items():
                fp[f"opt/{pid}/{key}"] = _local(value).clone() if isinstance(value, torch.Tensor) else value
        fp["opt/groups"] = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    fp["rng/torch"] = torch.get_rng_state().clone()
    # NumPy's whole state: the key, the position in it and the cached Gaussian, not the key alone.
    kind, key, pos, has_gauss, cached = np.random.get_state()
    fp["rng/numpy"] = (kind, key.copy(), pos, has_gauss, cached)
    fp["rng/python"] = random.getstate()
    return fp


def assert_same_bits(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), set(before) ^ set(after)
    for key in before:
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(_bits(a), _bits(b)), key
        elif isinstance(a, np.ndarray):
            assert np.array_equal(a, b), key
        elif key == "rng/numpy":
            assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:], key
        else:
            assert a == b, key


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare bit patterns, not values: NaN == NaN and -0.0 != 0.0 here, as "bit for bit" means.
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def warm_up(model: nn.Module, optimizer: torch.optim.Optimizer, loader, steps: int = 3) -> None:
    """A few real training steps so the optimizer has state (moments, step counts) to restore."""
    model.train()
    for _, (x, y) in zip(range(steps), loader):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def state_digest(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str:
    """A hash of every bit ``fingerprint`` covers, to compare across processes."""
    return digest(fingerprint(model, optimizer))


def digest(fp: dict) -> str:
    """A hash of a ``fingerprint``."""
    h = hashlib.sha256()
    for key, value in fp.items():
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(_bits(value).numpy().tobytes())
        elif key == "rng/numpy":
            h.update(repr((value[0], value[2], value[3], value[4])).encode() + value[1].tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


@dataclass
class Launch:
    returncode: int
    output: str
    seconds: float

    def explain(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.1f} s; full output:\n{self.output}"


def torchrun(args: list[str], *, nproc: int, timeout: float = 240.0, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> Launch:
    """Launch ``args`` the way users do, with torchrun (standalone rendezvous, no restarts)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "--monitor-interval=0.1", *args]
    return run_job(cmd, timeout=timeout, cwd=cwd, env=env)


def deepspeed_launcher(args: list[str], *, nproc: int, timeout: float = 240.0) -> Launch:
    """Launch ``args`` with DeepSpeed's own launcher (``deepspeed --num_gpus N ...``)."""
    script = Path(sys.executable).parent / "deepspeed"
    return run_job([sys.executable, str(script), f"--num_gpus={nproc}", *args], timeout=timeout)


def run_job(cmd: list[str], *, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None) -> Launch:
    """Run a multi-process job; its whole process group is killed at ``timeout``, so a hang is
    reported as a failure (returncode -9) with everything printed so far, never waited out."""
    marker = uuid.uuid4().hex
    full_env = job_env(marker, env)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        kill_marked(marker)
        output, _ = proc.communicate()
        output += f"\n[test harness] killed after {timeout:.0f} s: the job hung"
        code = -9
    return Launch(code, output, time.monotonic() - start)


def job_env(marker: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test job: unbuffered output, one thread per rank, no hub, DeepSpeed
    on the CPU, this venv first on PATH, and ``DISTLR_TEST_JOB=marker``, which every process of
    the job inherits so that ``kill_marked`` can find them all."""
    # PYTHONFAULTHANDLER: a rank killed by a native abort prints every thread's Python stack.
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env["DISTLR_TEST_JOB"] = marker
    return full_env


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment carries ``DISTLR_TEST_JOB=marker``: torchrun starts
    each worker in a session of its own, so killing the launcher's process group leaves a hung
    worker alive."""
    needle = f"DISTLR_TEST_JOB={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def engine_digest(engine) -> str:
    """A hash of what a DeepSpeed engine must get back: this rank's parameter data (its ZeRO-3
    partition), buffers, the ZeRO optimizer's state (fp32 partitions, moments, scaler) and RNG."""
    h = hashlib.sha256()
    stage3 = engine.zero_optimization_stage() == 3
    for name, p in engine.module.named_parameters():
        h.update(name.encode())
        h.update(_bits(p.ds_tensor if stage3 else p).numpy().tobytes())
    for name, b in engine.module.named_buffers():
        h.update(_bits(b).numpy().tobytes())

    def walk(node):
        if isinstance(node, torch.Tensor):
            h.update(_bits(node.cpu()).numpy().tobytes())
        elif isinstance(node, dict):
            for key in sorted(node, key=str):
                h.update(str(key).encode())
                walk(node[key])
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)
        elif isinstance(node, (int, float, str, bool)) or node is None:
            h.update(repr(node).encode())

    walk(engine.optimizer.state_dict())
    h.update(repr((engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps)).encode())
    h.update(_bits(torch.get_rng_state()).numpy().tobytes())
    kind, key, pos, has_gauss, cached = np.random.get_state()
    h.update(key.tobytes() + repr((kind, pos, has_gauss, cached)).encode())
    h.update(repr(random.getstate()).encode())
    return h.hexdigest()


# -- multi-process scenarios ---------------------------------------------------------------------
#
# A test module that needs a torchrun job defines its scenarios itself, registers them with
# ``scenarios = Scenarios()`` and ``@scenarios``, and starts them with ``launch``: torchrun runs
# tests/worker.py, which imports that module and calls the scenarios by name, on every rank.


class Scenarios:
    """A test module's multi-process scenarios, by name (the functions themselves, no lookup
    through globals). A scenario takes the output directory and string arguments, and returns
    a JSON-able record of what its rank saw."""

    def __init__(self) -> None:
        self.by_name: dict[str, Callable[..., Any]] = {}

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.by_name[fn.__name__] = fn
        return fn


def launch(module: str, out: Path, specs: list[str], *, nproc: int = 2, timeout: float = 240.0,
           group: bool = True, env: dict[str, str] | None = None) -> Launch:
    """Run ``module``'s scenarios ``specs`` (``"name"`` or ``"name:arg:arg"``) under torchrun.

    ``group``: the worker makes the job's process group first, as a training script does, and
    every finder joins it. ``group=False`` leaves that to distlr (one finder per such launch:
    a gloo group made and ended twice in one process may meet stale addresses).
    """
    args = [str(WORKER), *([] if group else ["--no-group"]), module, str(out), *specs]
    return torchrun(args, nproc=nproc, timeout=timeout, env=env)


def read_ranks(out: Path, spec: str, world: int = 2) -> list[dict]:
    """What each rank recorded for scenario ``spec``, in rank order."""
    name = spec.replace(":", "-")
    return [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(world)]


# -- models, data and settings the scenarios share --------------------------------------------------

EQUIV = dict(min_lr=1e-3, max_lr=50.0, num_steps=40, smooth_factor=0.5, divergence_threshold=4.0)
"""A sweep that diverges partway: the same curve from one process and from N ranks."""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out.squeeze(-1), y)


def equivalence_run(batch_size: int) -> dict:
    """The same model, data and sweep; with N ranks each reads batch_size of the N * batch_size."""
    from distlr import LRFinder

    model = mlp()
    loader = DataLoader(regression_data(n=1536), batch_size=batch_size, shuffle=False)
    with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu") as finder:
        return finder.find(**EQUIV).to_dict()


def ds_config(stage: int, *, bf16: bool = False, optimizer: dict | None = None, **extra: Any) -> dict:
    """A small DeepSpeed config; ZeRO-3 really partitions even small parameters."""
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "bf16": {"enabled": bf16}, "steps_per_print": 10**9,
              "optimizer": optimizer or {"type": "SGD", "params": {"lr": 0.1}}}
    config.update(extra)
    return config


class Boom(Exception):
    """The exception the fault injection raises."""


class Faulty(nn.Module):
    """Passes through to ``inner``; at forward call ``at``, on ``rank`` (None: every rank), it
    raises (``"raise"``: RuntimeError, ``"boom"``: Boom, ``"interrupt"``: KeyboardInterrupt),
    returns NaN (``"nan"``), kills its own process (``"sigkill"``), hangs (``"stall"``), or has
    torchrun send SIGTERM to every rank (``"sigterm_launcher"``)."""

    def __init__(self, inner: nn.Module, *, rank: int | None, at: int, mode: str, message: str = "") -> None:
        super().__init__()
        self.inner, self.rank, self.at, self.mode, self.message, self.calls = inner, rank, at, mode, message, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(x)
        if (self.rank is None or RANK == self.rank) and self.calls == self.at:
            if self.mode == "raise":
                raise RuntimeError(self.message or f"injected failure on rank {RANK} at forward call {self.calls}")
            if self.mode == "boom":
                raise Boom(f"injected failure at forward call {self.calls}")
            if self.mode == "interrupt":
                raise KeyboardInterrupt
            if self.mode == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.mode == "sigterm_launcher":
                # As when a rank fails or the job is cancelled: the launcher gets SIGTERM and
                # passes it on to every rank. Every rank waits here for it, in short sleeps: the
                # kernel may hand the signal to one of torch's threads, and then one long sleep of
                # the main thread runs to its end before Python's handler can run; torchrun's
                # grace before SIGKILL is 30 s (3 jobs in ~20 under load did, 0 in 45 since).
                if RANK == 1:
                    os.kill(os.getppid(), signal.SIGTERM)
                for _ in range(600):
                    time.sleep(0.05)
            if self.mode == "stall":
                time.sleep(600)
            return out * math.nan
        return out


def deepspeed_engine(model: nn.Module, config: dict, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """A user's own DeepSpeed engine, as a CPU user builds one (without the shared-memory comm
    op, which DeepSpeed would JIT-compile for over a minute first)."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    params = None if optimizer is not None else [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                      config={**config, "zero_allow_untested_optimizer": True})
    return engine


@contextlib.contextmanager
def disk_looks_full_on(rank: int):
    """On ``rank``, the disk looks full to distlr's free-space check (filling a real disk is not
    practical here); the other ranks see the real one."""
    import shutil
    from collections import namedtuple

    real = shutil.disk_usage
    if RANK == rank:
        shutil.disk_usage = lambda path: namedtuple("usage", "total used free")(1 << 30, 1 << 30, 1 << 10)
    try:
        yield
    finally:
        shutil.disk_usage = real


def errors_of(cases: dict[str, Callable[[], Any]]) -> dict[str, str | None]:
    """Run each case; record ``"Type: message"`` of what it raised, or None."""
    record: dict[str, str | None] = {}
    for name, case in cases.items():
        try:
            case()
            record[name] = None
        except Exception as err:  # noqa: BLE001 - the error is what is recorded
            record[name] = f"{type(err).__name__}: {err}"
    return record

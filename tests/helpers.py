"""Test helpers shared by pytest and the torchrun worker processes (no pytest imports here)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

REPO = Path(__file__).resolve().parent.parent


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


def fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Every bit a restore must bring back: parameters, buffers, grads, optimizer state and
    settings, and the next draw of every RNG (taken without consuming it)."""
    fp = {f"param/{k}": v.detach().clone() for k, v in model.named_parameters()}
    fp.update({f"buffer/{k}": v.detach().clone() for k, v in model.named_buffers()})
    fp.update({f"grad/{k}": None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()})
    fp["training"] = [m.training for m in model.modules()]
    if optimizer is not None:
        sd = optimizer.state_dict()
        for pid, state in sd["state"].items():
            for key, value in state.items():
                fp[f"opt/{pid}/{key}"] = value.clone() if isinstance(value, torch.Tensor) else value
        fp["opt/groups"] = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    fp["rng/torch"] = torch.get_rng_state().clone()
    fp["rng/numpy"] = np.random.get_state()[1].copy()
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
    h = hashlib.sha256()
    for key, value in fingerprint(model, optimizer).items():
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(_bits(value).numpy().tobytes())
        elif isinstance(value, np.ndarray):
            h.update(value.tobytes())
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
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[test harness] killed after {timeout:.0f} s: the job hung"
        code = -9
    return Launch(code, output, time.monotonic() - start)


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
    h.update(np.random.get_state()[1].tobytes())
    h.update(repr(random.getstate()).encode())
    return h.hexdigest()

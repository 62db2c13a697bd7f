"""FSDP2 (``torch.distributed.fsdp.fully_shard``): a model whose parameters are DTensors
sharded over the ranks.

The range test runs such a model as it is (no DDP wrapper): the micro-batch loop of
``distlr.backends.ddp.TorchBackend`` with FSDP2's own gradient synchronisation (only the last
micro-batch reduce-scatters), and the snapshot keeps each rank's local shards only
(``distlr.train.snapshot``). ``shard`` is what the command line's ``--fsdp`` does to a Hugging Face
model: one FSDP unit per transformer block, then the root (the torchtitan pattern).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from distlr.backends.base import BackendSpec
from distlr.backends.ddp import TorchBackend
from distlr.dist.collectives import DistContext

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def is_fsdp2(model: Any) -> bool:
    """A module ``fully_shard`` was applied to (public as ``FSDPModule`` from torch 2.6 on)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


class FSDP2Sync:
    """FSDP2's gradient synchronisation: ``set_requires_gradient_sync(False)`` for every
    micro-batch but the last, so only the last reduce-scatters."""

    what = "backward pass (with FSDP's gradient reduce-scatter)"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        policy = _mp_policy(model)
        param_dtype = getattr(policy, "param_dtype", None)
        self.precision = _DTYPES.get(param_dtype)

    def settle(self) -> None:
        """Reset the iteration: an error in a forward or backward leaves units unsharded (their
        parameters full tensors instead of this rank's shards) and collectives in flight. The
        root's ``reset_iter_state`` (torch's documented recovery after such an error; 2.13 has
        it) waits on them, reshards every unit and drops the failed step's gradients; where it
        is missing, each unit is resharded.
        """
        reset = getattr(self.model, "reset_iter_state", None)
        if callable(reset):
            # Before the first forward the root is not set up yet (and has nothing to reset).
            if getattr(self.model._get_fsdp_state(), "_is_root", None):
                reset()
            return
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @contextlib.contextmanager
    def defer(self, last: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)


def _mp_policy(model: nn.Module) -> Any:
    # FSDP2 keeps its MixedPrecisionPolicy on the module's state; there is no public getter.
    state = getattr(model, "_get_fsdp_state", None)
    return getattr(state(), "_mp_policy", None) if callable(state) else None


def make(spec: BackendSpec) -> TorchBackend:
    """The backend for an FSDP2 model: ``TorchBackend`` with FSDP2's gradient sync."""
    return TorchBackend(spec, sync=FSDP2Sync(spec.model))


def shard(model: nn.Module, ctx: DistContext, *, amp: str = "no") -> nn.Module:
    """Shard a model with FSDP2 over all ranks: each transformer block (the modules of the
    model's largest ``ModuleList``) is one unit, then the root. ``amp="bf16"``/``"fp16"``
    becomes a ``MixedPrecisionPolicy`` (parameters in that dtype for compute, gradients
    reduced in fp32).

    Raises:
        ValueError: the model has no ``ModuleList`` of blocks to shard.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"fsdp: {type(model).__name__} has no ModuleList of blocks to shard one by one; "
                         "shard it yourself with fully_shard and pass it as a factory")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model

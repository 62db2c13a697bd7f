"""What torchrun runs for a test: a test module's scenarios, by name, on every rank.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/worker.py [--no-group] MODULE OUT SPEC ...

MODULE is a test module (``test_distributed``) with a ``scenarios`` registry (helpers.Scenarios);
each SPEC is ``name`` or ``name:arg:arg``. Every rank writes ``OUT/<spec>.rank<R>.json``. Unless
``--no-group``, the worker first makes the job's process group, as a training script does.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    own_group = argv[0] != "--no-group"
    argv = argv if own_group else argv[1:]
    module, out, specs = importlib.import_module(argv[0]), Path(argv[1]), argv[2:]
    if own_group and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = int(os.environ.get("RANK", 0))
    for spec in specs:
        name, *args = spec.split(":")
        record = module.scenarios.by_name[name](out, *args)
        (out / f"{spec.replace(':', '-')}.rank{rank}.json").write_text(json.dumps(record))
    gc.collect()  # wrappers kept alive by cycles (caught errors' tracebacks) let go of the group now
    if own_group and dist.is_initialized():
        dist.destroy_process_group()
    # Every record is written. Leave without the interpreter's teardown: there, torch's C++
    # threads sometimes abort the process ("terminate called without an active exception", no
    # Python frame on any thread), seen once in CI and once locally with Accelerate.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The package's layers: the pure math imports no torch, the facade knows no backend.

Each check imports a module in a fresh interpreter and looks at what came with it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from helpers import REPO

PURE = ("distlr.choices", "distlr.args", "distlr.fit", "distlr.ladder", "distlr.tracker", "distlr.curve", "distlr.suggest",
        "distlr.schedule", "distlr.analysis", "distlr.result")
"""The pure math: numbers in, numbers out; no torch, no torch.distributed, no files."""


@pytest.fixture(scope="module")
def brought_in() -> dict[str, list[str]]:
    """One fresh interpreter imports the pure modules one by one, then the facade, and notes
    which modules each brought in."""
    code = (f"import json, sys\nseen, brought = set(sys.modules), {{}}\nfor m in {[*PURE, 'distlr.finder']!r}:\n"
            "    __import__(m); brought[m] = sorted(set(sys.modules) - seen); seen = set(sys.modules)\n"
            "print(json.dumps(brought))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_pure_layer_imports_no_torch_and_no_other_layer(brought_in):
    for module in PURE:
        brought = brought_in[module]
        assert not [m for m in brought if m == "torch" or m.startswith("torch.")], f"{module} pulls in torch"
        outside = {m for m in brought if m.startswith("distlr.")} - set(PURE)
        assert not outside, f"{module} pulls in {sorted(outside)}"
        assert not {"matplotlib", "yaml", "deepspeed"} & set(brought), module


def test_the_facade_imports_no_backend_and_no_deepspeed(brought_in):
    assert not {"distlr.backends.ddp", "distlr.backends.zero", "deepspeed"} & set(brought_in["distlr.finder"])
    tree = ast.parse((REPO / "distlr" / "finder.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {m for m in imported if m.startswith("distlr.backends.") or m.startswith("deepspeed")}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    backend_words = {n for n in names if "deepspeed" in n.lower() or "engine" in n.lower() or "ddp" in n.lower()}
    # The facade passes the user's deepspeed_config argument on, to the backends that read it.
    assert backend_words <= {"deepspeed_config", "read_deepspeed_config"}, backend_words


def test_data_parallel_models_are_recognised_without_fsdp2(monkeypatch):
    # FSDPModule is public from torch 2.6 on; on an older torch the check must still work.
    import torch.distributed.fsdp as fsdp
    from torch import nn

    from distlr.backends.ddp import is_data_parallel

    monkeypatch.delattr(fsdp, "FSDPModule")
    assert is_data_parallel(nn.Linear(2, 2)) is False

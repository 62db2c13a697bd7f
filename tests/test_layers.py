"""The package's layers are its folders: no import runs back up a layer, none skips sideways.

Every reference from one distlr module to another counts: top-level and lazy imports, and
module names written as strings (an ``importlib`` target, a lazy ``__getattr__`` table). The
pure math is also imported in a fresh interpreter, to see that nothing heavy comes with it.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "distlr"
ALLOWED = {
    "core": set(),
    "dist": {"core"},
    "train": {"core", "dist"},
    "backends": {"core", "dist", "train", "backends (package)"},
    "loop": {"core", "dist", "train", "backends"},
    "output": {"core"},
    "finder": {"core", "dist", "train", "output", "loop", "backends (package)"},
    "integrations": {"core", "dist", "train", "output", "finder", "backends (package)"},
    "cli": {"core", "dist", "train", "output", "finder", "backends", "backends (package)"},
    "__main__": {"core", "dist", "output", "finder", "cli", "backends"},
    "package": {"core", "finder"},
}
"""Which layers each layer may use (besides its own). ``backends (package)`` is
``distlr.backends`` itself: the one door to the backends, which decides the kind by type."""
LAYERS = ("core", "dist", "train", "backends", "output", "cli", "integrations", "loop", "finder", "__main__")
NOT_IN_CORE = ("torch", "matplotlib", "yaml", "deepspeed", "transformers", "logging", "tqdm")


def layer_of(module: str) -> str | None:
    """The layer of a dotted name: ``distlr.core.rules`` -> ``core``; None outside distlr."""
    parts = module.split(".")
    if parts[0] != "distlr":
        return None
    if len(parts) == 1 or parts[1] == "__init__":
        return "package"
    if parts[1] == "backends" and len(parts) == 2:
        return "backends (package)"
    return parts[1] if parts[1] in LAYERS else "package"


def module_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def references(path: Path) -> set[str]:
    """Every distlr module ``path`` names: in imports (anywhere in the file) and in strings."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # ``from distlr.core import rules`` names the module distlr.core.rules, ``from distlr
            # import backends`` the package distlr.backends; anything else names node.module.
            base = PACKAGE.parent / node.module.replace(".", "/")
            subs = {f"{node.module}.{alias.name}" for alias in node.names
                    if (base / f"{alias.name}.py").exists() or (base / alias.name / "__init__.py").exists()}
            found |= subs or {node.module}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"distlr\.(" + "|".join(LAYERS) + r")(\.\w+)*", node.value):
                found.add(node.value)
    return {name for name in found if name.startswith("distlr")}


def imported(path: Path) -> set[tuple[str, bool]]:
    """(module, at module level?) for every import of ``path``, lazy ones inside functions too."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(alias.name, id(node) in top) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add((node.module, id(node) in top))
    return found


def third_party(path: Path) -> set[str]:
    return {name.split(".")[0] for name, _ in imported(path)}


ON_DEMAND_IN_CORE = {("distlr/core/result.py", "torch.optim.lr_scheduler")}
"""The one torch import the pure math may make, inside the function that needs it:
``LRFinderResult.make_scheduler`` returns a torch scheduler for the optimizer it is handed."""


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO)) for p in FILES])
def test_a_module_uses_only_the_layers_below_it(path):
    own = layer_of(module_of(path))
    own = "backends" if own == "backends (package)" else own
    used = {layer_of(name) for name in references(path)} - {own, None}
    assert used <= ALLOWED[own], f"{path.relative_to(REPO)} ({own}) reaches {sorted(used - ALLOWED[own])}"


def test_the_rule_catches_a_reference_up_the_layers(tmp_path):
    # A core module that imports the facade lazily, and names a backend in a string.
    bad = tmp_path / "distlr" / "core" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from distlr.finder import LRFinder\n    return 'distlr.backends.zero'\n")
    assert references(bad) == {"distlr.finder", "distlr.backends.zero"}
    assert {layer_of(name) for name in references(bad)} - ALLOWED["core"] == {"finder", "backends"}


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_the_pure_math_names_no_torch_no_plotting_no_logging(path):
    rel = path.relative_to(REPO).as_posix()
    heavy = {(name, top) for name, top in imported(path) if name.split(".")[0] in NOT_IN_CORE}
    allowed = {(name, False) for where, name in ON_DEMAND_IN_CORE if where == rel}
    assert heavy <= allowed, f"{path.name} imports {sorted(heavy - allowed)}"


def test_the_on_demand_rule_sees_a_lazy_import_and_a_top_level_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nimport torch\ndef f():\n    import torch.optim.lr_scheduler\n")
    assert imported(bad) == {("numpy", True), ("torch", True), ("torch.optim.lr_scheduler", False)}


def test_the_pure_math_brings_in_no_torch_when_imported():
    modules = [module_of(p) for p in sorted((PACKAGE / "core").glob("*.py"))]
    code = (f"import json, sys\nfor m in {modules!r}: __import__(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert not {m for m in loaded if m.split(".")[0] in NOT_IN_CORE}, sorted(loaded)
    assert {m for m in loaded if m.startswith("distlr.")} <= {*modules, "distlr.core"}


def test_the_facade_names_no_backend():
    tree = ast.parse((PACKAGE / "finder.py").read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    backend_words = {n for n in names if re.search("deepspeed|engine|ddp|fsdp|zero", n.lower())}
    # The facade passes the user's deepspeed_config argument on, to the backends that read it.
    assert backend_words <= {"deepspeed_config", "read_deepspeed_config"}, backend_words


def test_the_kind_of_backend_is_decided_in_one_function():
    deciders = [p for p in FILES if "isinstance(model, engine)" in p.read_text()
                or "DeepSpeedEngine" in p.read_text()]
    assert [p.relative_to(REPO).as_posix() for p in deciders] == ["distlr/backends/__init__.py"]


def test_data_parallel_models_are_recognised_without_fsdp2(monkeypatch):
    # FSDPModule is public from torch 2.6 on; on an older torch the check must still work.
    import torch.distributed.fsdp as fsdp
    from torch import nn

    from distlr.backends.ddp import is_data_parallel

    monkeypatch.delattr(fsdp, "FSDPModule")
    assert is_data_parallel(nn.Linear(2, 2)) is False

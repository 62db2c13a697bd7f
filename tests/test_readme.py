"""The copy-paste examples of README.md and docs/*.md run as written. A Python block marked with
``<!-- readme-test: LAUNCHER N[, LAUNCHER N]; expect: TEXT -->`` is saved as a script and
launched each way the mark names (``python``, ``torchrun`` or ``accelerate launch`` with N
processes), as its first comment line also says, in an empty directory; it must exit 0 and print
TEXT. Every relative link on those pages must lead to a file that exists."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_job, torchrun

pytestmark = pytest.mark.timeout(400)
MARK = re.compile(r"<!-- readme-test: ([\w ,]+?); expect: (.+?) -->\n```python\n(.*?)```", re.S)
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def examples() -> list[tuple[str, int, str, str]]:
    """(launcher, processes, expected text, code) for every way every marked block is run."""
    found = []
    for page in PAGES:
        for m in MARK.finditer(page.read_text()):
            for way in m[1].split(","):
                launcher, nproc = way.split()
                found.append((launcher, int(nproc), m[2], m[3]))
    return found


def test_the_pages_mark_an_example_for_each_stack():
    runs = {(code.splitlines()[0].split(":")[0], launcher) for launcher, _, _, code in examples()}
    assert runs == {("# quickstart.py", "python"), ("# quickstart.py", "torchrun"),
                    ("# find_lr_trainer.py", "torchrun"), ("# find_lr_accelerate.py", "accelerate"),
                    ("# find_lr_fsdp.py", "torchrun"), ("# find_lr_nanogpt.py", "python"),
                    ("# apply_anywhere.py", "python"), ("# search_space.py", "python")}


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces as -."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


def test_every_link_on_the_pages_leads_to_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#]*)(?:#([^)]*))?\)", page.read_text()):
            if target.startswith("http"):
                continue
            path = (page.parent / target) if target else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
                broken.append(f"{page.name}: {target}#{anchor}")
    assert broken == []


@pytest.mark.parametrize("launcher, nproc, expect, code", examples(),
                         ids=lambda v: v.split(":")[0].lstrip("# ") if isinstance(v, str) and v.startswith("#") else
                         (v if v in ("python", "torchrun", "accelerate") else None))
def test_a_readme_example_runs_as_written(tmp_path, launcher, nproc, expect, code):
    name = code.splitlines()[0].split(":")[0].lstrip("# ")
    # The header says how to run it; the test runs it that way.
    assert launcher in code.splitlines()[0] or (launcher == "accelerate" and "accelerate launch" in code)
    script = tmp_path / name
    script.write_text(code)
    if launcher == "torchrun":
        job = torchrun([str(script)], nproc=nproc, cwd=tmp_path)
    elif launcher == "accelerate":
        job = run_job([str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                       str(nproc), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       str(script)], timeout=300, cwd=tmp_path)
    else:
        job = run_job([sys.executable, str(script)], timeout=300, cwd=tmp_path)
    assert job.returncode == 0, job.explain()
    assert expect in job.output, job.explain()

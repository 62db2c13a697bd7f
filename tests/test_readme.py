"""The README's copy-paste examples run as written. A Python block marked with
``<!-- readme-test: LAUNCHER N; expect: TEXT -->`` is saved as a script and launched the way its
first comment line says (``python``, ``torchrun`` or ``accelerate launch`` with N processes), in
an empty directory; it must exit 0 and print TEXT."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_job, torchrun

pytestmark = pytest.mark.timeout(400)
MARK = re.compile(r"<!-- readme-test: (\w+) (\d+); expect: (.+?) -->\n```python\n(.*?)```", re.S)


def examples() -> list[tuple[str, int, str, str]]:
    return [(m[1], int(m[2]), m[3], m[4]) for m in MARK.finditer((REPO / "README.md").read_text())]


def test_the_readme_marks_an_example_for_each_stack():
    names = [code.splitlines()[0] for *_, code in examples()]
    assert [n.split(":")[0] for n in names] == ["# find_lr_trainer.py", "# find_lr_accelerate.py", "# find_lr_fsdp.py"]


@pytest.mark.parametrize("launcher, nproc, expect, code", examples(), ids=lambda v: v if isinstance(v, str) and
                         v.endswith(".py") else None)
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

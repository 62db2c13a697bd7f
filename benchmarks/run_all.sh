#!/usr/bin/env bash
# Every benchmark, one after another (they must not share the machine), each table into
# benchmarks/results/<name>.md. About 20 minutes on 2 CPU cores.
#
#   bash benchmarks/run_all.sh            # uses .venv (bash scripts/setup.sh makes it)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${DISTLR_VENV:-.venv}/bin/python"
"$py" -c "import torch_lr_finder" 2>/dev/null || "$py" -m pip install --quiet --no-deps torch-lr-finder
mkdir -p benchmarks/results
run() { local name=$1; shift; echo "== $name" >&2; "$py" "$@" | tee "benchmarks/results/$name.md"; }
run step_overhead benchmarks/step_overhead.py
run step_overhead_ddp2 benchmarks/step_overhead.py --ddp 2 --repeats 5
run snapshot benchmarks/snapshot.py
run vs_torch_lr_finder benchmarks/vs_torch_lr_finder.py
run scaling benchmarks/scaling.py
run startup benchmarks/startup.py
run profile_step benchmarks/profile_step.py

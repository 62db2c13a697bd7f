#!/usr/bin/env bash
# Set up .venv and run the built-in demo: sweep, suggestion, plot and result.json.
# Extra arguments go to distlr (e.g. --num-steps 200 --output-dir runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${DISTLR_VENV:-.venv}/bin/python" -m distlr "$@"

#!/usr/bin/env bash
# Set up .venv and run the test suite. Extra arguments go to pytest (e.g. -k restore -x).
set -euo pipefail
cd "$(dirname "$0")/.."
DISTLR_EXTRAS="${DISTLR_EXTRAS:-dev,deepspeed,accelerate,data,trackers}" bash scripts/setup.sh
exec "${DISTLR_VENV:-.venv}/bin/python" -m pytest "$@"

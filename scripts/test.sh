#!/usr/bin/env bash
# Set up .venv and run the test suite. Extra arguments go to pytest (e.g. -k restore -x).
set -euo pipefail
cd "$(dirname "$0")/.."
DISTLR_EXTRAS="${DISTLR_EXTRAS:-dev,deepspeed,accelerate,data,trackers}" bash scripts/setup.sh
venv="${DISTLR_VENV:-.venv}"
# muP's recipe is tested with Microsoft's mup. Its own requirements pull an unpinned torchvision
# that breaks transformers on this torch, and it needs only torch and yaml: install it alone.
"$venv/bin/python" -c "import mup" 2>/dev/null || "$venv/bin/python" -m pip install --quiet \
    --disable-pip-version-check --no-deps "mup==1.0.0" 2> >(grep -v "^WARNING: Location" >&2)
exec "$venv/bin/python" -m pytest "$@"

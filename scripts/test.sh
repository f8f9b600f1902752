#!/usr/bin/env bash
# The README's test command: install (see setup.sh), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
python -m pytest -q "$@"

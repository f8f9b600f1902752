#!/usr/bin/env bash
# The README's test command: install (see setup.sh) with every optional extra, so that every test runs, then
# run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
MT_EXTRAS=${MT_EXTRAS:-export,bench,plot,serve} bash scripts/setup.sh
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
python -m pytest -q "$@"

#!/usr/bin/env bash
# The README's test command: install (see setup.sh) with every optional extra, so that every test runs, then
# run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
MT_EXTRAS=${MT_EXTRAS:-export,bench,plot,serve} bash scripts/setup.sh
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
# The page test of mt serve drives a system Chromium; where none is installed and apt is ours to use, install it
# (where it cannot be installed, that one test skips and says why).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
        || echo "test.sh: could not install chromium; the browser test of mt serve will skip" >&2
fi
python -m pytest -q "$@"

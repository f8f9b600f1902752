#!/usr/bin/env bash
# Create .venv (unless a virtual environment is already active) and install mt into it.
# Where no torch is installed yet, the CPU build goes in first, so pip does not pull a multi-GB CUDA build;
# a GPU user picks theirs with TORCH_SPEC, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
python -m pip install -q --upgrade pip >/dev/null
if [ -n "${TORCH_SPEC:-}" ]; then
    python -m pip install -q $TORCH_SPEC
elif ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0" || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
# Extras (MT_EXTRAS=export,bench) keep the torch that is installed: transformers and friends must not swap it.
python -m pip install -q -e ".[dev${MT_EXTRAS:+,$MT_EXTRAS}]" \
    -c <(python -c 'import torch; print(f"torch=={torch.__version__}")')

#!/usr/bin/env bash
# Create .venv (if missing) and install fastunet with its test/bench/cli extras.
# torch is pinned to 2.13.0: on this kind of machine that is the CPU build kept on local disk;
# an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,bench,cli]"

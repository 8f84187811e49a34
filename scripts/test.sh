#!/usr/bin/env bash
# Install what is needed, then run the whole test suite (kernels under Triton's CPU interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# PYTHONSAFEPATH: keep the repo root off sys.path, so the kernels/ folder is only ever imported as
# fastunet.kernels and never as a bare top-level `kernels` (a PyPI name that diffusers and transformers probe).
export ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 TRITON_INTERPRET=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONSAFEPATH=1
# -n auto: one pytest-xdist worker per core (the interpreter-bound kernel tests are single-threaded Python;
# each worker runs torch on one thread, tests/conftest.py); --dist loadfile keeps a file's tests, and the
# models its fixtures build, on one worker.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n auto --dist loadfile "$@"

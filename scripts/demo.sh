#!/usr/bin/env bash
# Install what is needed, then run the main job: fastunet's demo (parity and timings, triton vs torch).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# PYTHONSAFEPATH: keep the repo root off sys.path, so the kernels/ folder is only ever imported as
# fastunet.kernels and never as a bare top-level `kernels` (a PyPI name that diffusers and transformers probe).
export ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 TRITON_INTERPRET=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONSAFEPATH=1
exec .venv/bin/python -m fastunet.demo "$@"

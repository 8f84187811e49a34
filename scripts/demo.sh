#!/usr/bin/env bash
# Install what is needed, then run the main job: `fastunet train` with its defaults (a DDPM on sklearn's digits;
# arguments are passed on, e.g. --steps 100 --out runs/quick). The parity demo is `python -m fastunet.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# PYTHONSAFEPATH: keep the repo root off sys.path, so the kernels/ folder is only ever imported as
# fastunet.kernels and never as a bare top-level `kernels` (a PyPI name that diffusers and transformers probe).
export ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 TRITON_INTERPRET=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONSAFEPATH=1
exec .venv/bin/fastunet train "$@"

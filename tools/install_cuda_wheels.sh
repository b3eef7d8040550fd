#!/usr/bin/env bash
# Installs the pinned nvcc 13.0 wheel set from PyPI into the project's ignored .cuda/ folder (skipped when present).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .cuda/nvidia/cu13/bin/nvcc ]; then
  exit 0
fi
python3 -m pip install -q --disable-pip-version-check --target .cuda \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85

#!/usr/bin/env bash
# Installs the pinned nvcc 13.0 wheel set from PyPI into the project's ignored .cuda/ folder (skipped when present).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .cuda/nvidia/cu13/bin/nvcc ]; then
  python3 -m pip install -q --disable-pip-version-check --target .cuda \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
# build.rs watches .cuda/ only while it exists (a missing watched path would rerun it on every
# build), so a build made before .cuda/ appeared would keep its "nvcc not found" result. When
# .cuda/ (or the link to it) is newer than build.rs, touch build.rs: the next cargo build reruns
# it once, finds nvcc and compiles the kernels' fatbins.
if [ -n "$(find .cuda -maxdepth 0 -newer build.rs)" ]; then
  touch build.rs
fi

#!/usr/bin/env bash
# Installs the pinned Python packages that the DICOM tests run tools/make_dicom_fixtures.py with (pydicom, numpy) into the ignored .pydicom/ folder (skipped when present).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .pydicom/pydicom-3.0.2.dist-info ] && [ -d .pydicom/numpy-2.3.5.dist-info ]; then
  exit 0
fi
rm -rf .pydicom
python3 -m pip install -q --disable-pip-version-check --target .pydicom \
  pydicom==3.0.2 numpy==2.3.5

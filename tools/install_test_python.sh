#!/usr/bin/env bash
# Installs the pinned Python packages that the DICOM and quality-gate tests run their fixture scripts with (pydicom, numpy, pydicom-data's real CT slices, pylibjpeg + pylibjpeg-openjpeg for its JPEG 2000 slice) into the ignored .pydicom/ folder (skipped when present).
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(pydicom==3.0.2 numpy==2.3.5 pydicom-data==1.0.0 pylibjpeg==2.1.0 pylibjpeg-openjpeg==2.6.0)
if [ -f .pydicom/.pins ] && [ "$(cat .pydicom/.pins)" = "${PINS[*]}" ]; then
  exit 0
fi
rm -rf .pydicom
python3 -m pip install -q --disable-pip-version-check --target .pydicom "${PINS[@]}"
echo "${PINS[*]}" > .pydicom/.pins

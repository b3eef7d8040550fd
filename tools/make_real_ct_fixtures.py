# Stacks real non-chest CT slices from pydicom-data (a head, a posterior chest crop labelled NECK, an abdomen) into 8-slice DICOM series, for tests/quality_gate.rs.
"""Run with the pinned packages of tools/install_test_python.sh (pydicom, numpy, pydicom-data,
pylibjpeg + pylibjpeg-openjpeg):

    PYTHONPATH=.pydicom python3 tools/make_real_ct_fixtures.py --out DIR

Writes DIR/<case>/s0.dcm … s7.dcm, each a copy of one real slice moved along the slice normal
by its thickness (new SOP instance UIDs, one series), and DIR/manifest.json with, per case,
the source file, body part, spacing and pydicom's own HU range of the slice (none for the
JPEG Lossless one, which pydicom decodes only with a GPL plugin):

- head: 693_UNCR.dcm (512×512, 0.48 mm, 5 mm; a head with the frontal sinus and a head
  holder), stored uncompressed;
- neck: bad_sequence.dcm (512×512, 0.29 mm; labelled NECK, it shows the posterior thorax: a
  vertebra, ribs and two thin crescents of lung base, one cut by the image edge); its JPEG
  Lossless pixel data are copied as they are (our reader decodes them);
- abdomen: explicit_VR-UN.dcm (512×512, 0.86 mm; kidneys, bowel with gas and stool, the
  table), JPEG 2000 decoded here with pylibjpeg-openjpeg and stored uncompressed, its VR UN
  elements written with their dictionary VRs.
"""
import argparse
import copy
import json
import os
import shutil

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.data import get_testdata_file

SLICES = 8
CASES = {
    "head": ("693_UNCR.dcm", False),
    "neck": ("bad_sequence.dcm", False),
    "abdomen": ("explicit_VR-UN.dcm", True),
}


def uid(*parts):
    """A deterministic UID (the same run writes the same files)."""
    return generate_uid(entropy_srcs=["m2unet-real-ct", *map(str, parts)])


def hu_of(ds):
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return ds.pixel_array.astype(np.float64) * slope + inter


def stack(name, src, decode, out):
    ds = pydicom.dcmread(get_testdata_file(src))
    # JPEG Lossless needs a GPL plugin in pydicom: the neck slice is copied undecoded.
    hu = hu_of(ds) if not ds.file_meta.TransferSyntaxUID.is_compressed or decode else None
    if decode:
        # explicit_VR-UN.dcm stores most elements with VR UN; reading each one gives it its
        # dictionary VR (pydicom's default), so they are written with it.
        for _ in ds.iterall():
            pass
        assert ds["PixelSpacing"].VR == "DS", ds["PixelSpacing"].VR
        ds.PixelData = ds.pixel_array.tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    thickness = float(ds.get("SliceThickness") or 5.0)
    ds.SliceThickness = f"{thickness:g}"
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    ipp0 = np.array(ds.ImagePositionPatient, dtype=float)
    folder = os.path.join(out, name)
    os.makedirs(folder)
    series = uid(name, "series")
    for k in range(SLICES):
        s = copy.deepcopy(ds)
        s.SeriesInstanceUID = series
        s.SOPInstanceUID = uid(name, k)
        s.file_meta.MediaStorageSOPInstanceUID = s.SOPInstanceUID
        s.InstanceNumber = k + 1
        s.ImagePositionPatient = [f"{v:.4f}" for v in ipp0 + k * thickness * normal]
        s.save_as(os.path.join(folder, f"s{k}.dcm"), enforce_file_format=True)
    if decode:
        back = hu_of(pydicom.dcmread(os.path.join(folder, "s0.dcm")))
        assert np.array_equal(back, hu), f"{name}: the decoded slice did not round-trip"
    spacing = [float(v) for v in ds.PixelSpacing]
    return {
        "folder": folder,
        "source": src,
        "body_part": str(ds.get("BodyPartExamined", "")),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "pixel_spacing": spacing,
        "thickness": thickness,
        "slices": SLICES,
        "hu_min": None if hu is None else float(hu.min()),
        "hu_max": None if hu is None else float(hu.max()),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    cases = {name: stack(name, src, decode, args.out) for name, (src, decode) in CASES.items()}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump({"pydicom": pydicom.__version__, "cases": cases}, f, indent=1)
    print(f"wrote {len(cases)} stacked real CT series under {args.out}")


if __name__ == "__main__":
    main()

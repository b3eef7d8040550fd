# Writes the small NIfTI files with awkward headers used by tests/ct_pipeline.rs, and nibabel's view of them (expected.json).
"""Run with a Python that has nibabel and numpy:  python tools/make_nifti_fixtures.py

Each valid fixture gets nibabel's affine (sform if sform_code > 0, else qform: the rule of
docs/data.md), its axis codes, and its data reoriented by nib.as_closest_canonical, so the
Rust reader is checked against nibabel as an independent oracle.
"""
import gzip
import json
import os

import nibabel as nib
import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "nifti")
SHAPE = (18, 17, 4)
rng = np.random.default_rng(20240601)


def hu_volume(shape=SHAPE):
    return rng.integers(-1024, 1200, size=shape).astype(np.float64)


def rot_z(deg):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def affine(rot, zooms, offset):
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(zooms)
    a[:3, 3] = offset
    return a


def save(img, name):
    path = os.path.join(OUT, name)
    nib.save(img, path)
    return path


expected = {}


def record(name, path, note):
    img = nib.load(path)
    canon = nib.as_closest_canonical(img)
    expected[name] = {
        "note": note,
        "affine": img.affine.tolist(),
        "axcodes": "".join(nib.aff2axcodes(img.affine)),
        "canonical_shape": list(canon.shape[:3]),
        "canonical_data": np.asarray(canon.get_fdata()).reshape(canon.shape[:3]).ravel(order="F").tolist(),
        "dtype": str(img.get_data_dtype()),
    }


# Big-endian int16, sform and qform (LPS, as DICOM converters often write).
data = hu_volume().astype(">i2")
lps = affine(np.diag([-1.0, -1.0, 1.0]), [0.7, 0.7, 2.5], [120.0, 110.0, -80.0])
hdr = nib.Nifti1Header(endianness=">")
img = nib.Nifti1Image(data, lps, hdr)
img.set_qform(lps, code=1)
img.set_sform(lps, code=1)
record("big_endian_int16_lps.nii", save(img, "big_endian_int16_lps.nii"), "big-endian int16, sform+qform, LPS")

# qform only, LAS (negative determinant: qfac = -1), uint16 with slope/intercept.
las = affine(np.diag([-1.0, 1.0, 1.0]), [0.8, 0.8, 3.0], [60.0, -70.0, -50.0])
raw = rng.integers(0, 4000, size=SHAPE).astype(np.uint16)
img = nib.Nifti1Image(raw, las)
img.set_qform(las, code=1)
img.set_sform(None, code=0)
img.header.set_slope_inter(0.5, -1024.0)
record("qform_only_las_uint16.nii.gz", save(img, "qform_only_las_uint16.nii.gz"), "qform only (qfac -1), uint16 slope 0.5 inter -1024")

# sform only, oblique (20 degrees about z) and permuted: voxel axis 0 runs along world y.
perm = np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])
obl = affine(rot_z(20) @ perm, [0.9, 0.6, 2.0], [10.0, 20.0, 30.0])
img = nib.Nifti1Image(hu_volume().astype(np.float32), obl)
img.set_sform(obl, code=2)
img.set_qform(None, code=0)
record("sform_only_oblique_float32.nii.gz", save(img, "sform_only_oblique_float32.nii.gz"), "sform only, 20 deg oblique, axes 0/1 swapped")

# sform and qform disagree: the sform wins.
ras = affine(np.eye(3), [0.75, 0.75, 1.5], [-5.0, -6.0, -7.0])
img = nib.Nifti1Image(hu_volume().astype(np.int32), ras)
img.set_sform(ras, code=1)
img.set_qform(affine(np.diag([-1.0, -1.0, 1.0]), [0.75, 0.75, 1.5], [0, 0, 0]), code=1)
record("sform_wins_int32.nii", save(img, "sform_wins_int32.nii"), "sform RAS and a different qform LPS: sform wins")

# A 4D file with one frame reads as 3D; float64.
img = nib.Nifti1Image(hu_volume()[..., None], lps)
img.set_qform(lps, code=1)
img.set_sform(lps, code=1)
record("single_frame_4d_float64.nii.gz", save(img, "single_frame_4d_float64.nii.gz"), "4D with one frame, float64")

# uint8 (not HU, but a valid volume).
img = nib.Nifti1Image(rng.integers(0, 255, size=SHAPE).astype(np.uint8), ras)
record("uint8_ras.nii", save(img, "uint8_ras.nii"), "uint8 RAS")

# Invalid: four frames.
img = nib.Nifti1Image(hu_volume((18, 17, 4, 3)).astype(np.int16), ras)
save(img, "four_frames_4d.nii.gz")

# Invalid: NIfTI-2.
img = nib.Nifti2Image(hu_volume().astype(np.int16), ras)
save(img, "nifti2.nii")

with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1)
print("wrote", sorted(os.listdir(OUT)))

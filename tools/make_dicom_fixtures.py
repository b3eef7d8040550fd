# Writes a NIfTI phantom as DICOM CT series (orientations, spacings, rescale, byte orders, transfer syntaxes, shuffled names), bad-input folders and a CT_small series, for tests/dicom.rs.
"""Run with pydicom 3.0.2 and numpy (tools/install_test_python.sh puts them in .pydicom/):

    PYTHONPATH=.pydicom python3 tools/make_dicom_fixtures.py --nifti PHANTOM.nii --out DIR

PHANTOM.nii is an int16 phantom from `m2unet synth` (sform, little-endian). DIR/manifest.json
lists every series written with the affine (voxel (column, row, slice) -> RAS+ mm, NIfTI
convention) that the script gave it, computed here from the geometry it wrote; the slices of
each series are ordered along the normal row x column of ImageOrientationPatient, as the
reader must order them. Every uncompressed, deflated and RLE file is read back with pydicom
and its pixel values checked against the values meant. CT_small.dcm (a real CT slice shipped
with pydicom) is recorded with pydicom's own HU values (pixel_array * slope + intercept).
"""
import argparse
import copy
import gzip
import json
import os
import shutil
import struct

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    MediaStorageDirectoryStorage,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

PHI = {"PatientName": "Doe^Jane", "PatientID": "PHI-12345", "PatientBirthDate": "19700101"}


def uid(*parts):
    """A deterministic UID (the same run writes the same files)."""
    return generate_uid(entropy_srcs=["m2unet-dicom-fixtures", *map(str, parts)])


def read_nifti(path):
    raw = open(path, "rb").read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    assert struct.unpack("<i", raw[:4])[0] == 348, "little-endian NIfTI-1 expected"
    dim = struct.unpack("<8h", raw[40:56])
    datatype = struct.unpack("<h", raw[70:72])[0]
    vox_offset = int(struct.unpack("<f", raw[108:112])[0])
    slope, inter = struct.unpack("<2f", raw[112:120])
    assert struct.unpack("<h", raw[254:256])[0] > 0, "an sform is expected"
    srow = np.array(struct.unpack("<12f", raw[280:328]), dtype=np.float64).reshape(3, 4)
    dtype = {4: "<i2", 512: "<u2", 16: "<f4"}[datatype]
    shape = dim[1:4]
    data = np.frombuffer(raw, dtype, int(np.prod(shape)), vox_offset).reshape(shape, order="F")
    hu = data.astype(np.float64)
    if slope not in (0.0, 1.0) or inter != 0.0:
        hu = hu * (slope or 1.0) + inter
    affine = np.vstack([srow, [0, 0, 0, 1.0]])
    return hu, affine


def view(hu, affine, perm, flips):
    """The array re-laid with axes `perm` (flipped where `flips`) and its affine."""
    w = np.transpose(hu, perm)
    a = np.eye(4)
    a[:3, 3] = affine[:3, 3]
    for k in range(3):
        col = affine[:3, perm[k]]
        if flips[k]:
            w = np.flip(w, axis=k)
            a[:3, 3] += col * (w.shape[k] - 1)
            a[:3, k] = -col
        else:
            a[:3, k] = col
    return np.ascontiguousarray(w), a


def rotation(deg_x, deg_z):
    tx, tz = np.deg2rad(deg_x), np.deg2rad(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(tx), -np.sin(tx)], [0, np.sin(tx), np.cos(tx)]])
    rz = np.array([[np.cos(tz), -np.sin(tz), 0], [np.sin(tz), np.cos(tz), 0], [0, 0, 1]])
    return rz @ rx


def ds_str(v):
    s = f"{v:.10g}"
    return "0" if s == "-0" else s


def order_along_normal(w, a):
    """Reverses the slice axis when it runs against row x column (the reader's order)."""
    lps = np.diag([-1.0, -1, 1, 1]) @ a
    normal = np.cross(lps[:3, 0], lps[:3, 1])
    if np.dot(lps[:3, 2], normal) < 0:
        w = np.ascontiguousarray(w[:, :, ::-1])
        a = a.copy()
        a[:3, 3] += a[:3, 2] * (w.shape[2] - 1)
        a[:3, 2] = -a[:3, 2]
    return w, a


# --- JPEG Lossless (ITU-T T.81 process 14), written here so that the reader's decoder is
# checked against values it did not produce. One Huffman table: 5-bit codes for the 17
# difference categories.


def jpeg_lossless(img, predictor):
    """Encodes a 2D uint16 array (16-bit samples) losslessly with the given predictor 1-7."""
    rows, cols = img.shape
    x = img.astype(np.int64)
    pred = np.zeros_like(x)
    ra = np.zeros_like(x)
    ra[:, 1:] = x[:, :-1]
    rb = np.zeros_like(x)
    rb[1:, :] = x[:-1, :]
    rc = np.zeros_like(x)
    rc[1:, 1:] = x[:-1, :-1]
    pred[:] = {
        1: ra,
        2: rb,
        3: rc,
        4: ra + rb - rc,
        5: ra + ((rb - rc) >> 1),
        6: rb + ((ra - rc) >> 1),
        7: (ra + rb) >> 1,
    }[predictor]
    pred[0, :] = ra[0, :]
    pred[1:, 0] = rb[1:, 0]
    pred[0, 0] = 1 << 15
    diff = (x - pred) & 0xFFFF
    diff = np.where(diff >= 0x8000, diff - 0x10000, diff)
    bits = []
    for d in diff.ravel():
        d = int(d)
        if d == -32768:
            bits.append(format(16, "05b"))
            continue
        size = abs(d).bit_length()
        bits.append(format(size, "05b"))
        if size:
            v = d if d > 0 else d + (1 << size) - 1
            bits.append(format(v, f"0{size}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    body = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        body.append(byte)
        if byte == 0xFF:
            body.append(0)
    counts = [0] * 16
    counts[4] = 17
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xc3" + struct.pack(">HBHHB", 11, 16, rows, cols, 1) + bytes([1, 0x11, 0])
    out += b"\xff\xc4" + struct.pack(">H", 2 + 1 + 16 + 17) + bytes([0]) + bytes(counts)
    out += bytes(range(17))
    out += b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1, 0x00, predictor, 0, 0])
    out += body + b"\xff\xd9"
    return bytes(out)


def stored_values(hu, slope, intercept, signed, bits_stored):
    s = (hu - intercept) / slope
    assert np.all(s == np.round(s)), "the rescale does not give whole stored values"
    lo, hi = ((-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1))
    assert s.min() >= lo and s.max() <= hi, f"stored values {s.min()}..{s.max()} outside {lo}..{hi}"
    return s.astype(np.int64)


def base_dataset(series_uid, study_uid, k, modality="CT", sop_class=CTImageStorage):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(series_uid, k)
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    ds.Manufacturer = "m2unet fixtures"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.StudyDate = "20240102"
    return ds


def write_series(folder, w, a, spec, rng):
    """Writes array w (columns, rows, slices) with affine a (RAS) as one file per slice."""
    os.makedirs(folder, exist_ok=True)
    lps = np.diag([-1.0, -1, 1, 1]) @ a
    dc, dr = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = np.concatenate([lps[:3, 0] / dc, lps[:3, 1] / dr])
    n = w.shape[2]
    series_uid = uid(spec["name"], "series")
    study_uid = uid("study")
    signed, bits = spec.get("signed", True), spec.get("bits_stored", 16)
    stored = stored_values(w, spec["slope"], spec["intercept"], signed, bits)
    instance_numbers = rng.permutation(n) + 1
    names = [f"{rng.integers(0, 16**8):08x}{spec.get('ext', '')}" for _ in range(n)]
    files = []
    for k in range(n):
        ds = base_dataset(series_uid, study_uid, k)
        ds.SeriesNumber = spec["series_number"]
        ds.SeriesDescription = spec["description"]
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImagePositionPatient = [ds_str(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [ds_str(v) for v in iop]
        ds.PixelSpacing = [ds_str(dr), ds_str(dc)]
        ds.SliceThickness = ds_str(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = w.shape[1], w.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
        ds.PixelRepresentation = int(signed)
        ds.RescaleSlope = ds_str(spec["slope"])
        ds.RescaleIntercept = ds_str(spec["intercept"])
        plane = stored[:, :, k].T  # (rows, columns)
        ts = spec["ts"]
        np_type = np.int16 if signed else np.uint16
        ds.file_meta.TransferSyntaxUID = ts
        if ts in (JPEGLosslessSV1, JPEGLossless):
            ds.PixelData = encapsulate([jpeg_lossless(plane.astype(np.int64) & 0xFFFF, spec["predictor"])])
            ds["PixelData"].VR = "OB"
        elif ts == RLELossless:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(RLELossless, plane.astype(np_type), encoding_plugin="pydicom", generate_instance_uid=False)
        else:
            raw = plane.astype(np.int64) & ((1 << bits) - 1) if spec.get("mask_high_bits") else plane
            order = ">" if ts == ExplicitVRBigEndian else "<"
            ds.PixelData = raw.astype(np.dtype(np_type).newbyteorder(order)).tobytes()
            ds["PixelData"].VR = "OW"
        path = os.path.join(folder, names[k])
        ds.save_as(path, enforce_file_format=True, little_endian=ts != ExplicitVRBigEndian, implicit_vr=ts == ImplicitVRLittleEndian)
        if ts not in (JPEGLosslessSV1, JPEGLossless):
            back = pydicom.dcmread(path).pixel_array.astype(np.int64)
            assert np.array_equal(back, plane), f"{path}: pydicom reads other values back"
        files.append(path)
    return files


VIEWS = [
    # name, axes of the phantom's array as (column, row, slice), flips, world rotation (deg
    # about x, about z), tilt (deg), series number, pixel storage
    dict(name="axial_explicit_le", perm=(0, 1, 2), flips=(False, False, False), series_number=2,
         description="Axial 2.5mm", ts=ExplicitVRLittleEndian, signed=False, slope=1.0, intercept=-1024.0),
    dict(name="axial_implicit_12bit", perm=(0, 1, 2), flips=(False, False, True), series_number=3,
         description="Axial implicit", ts=ImplicitVRLittleEndian, signed=True, bits_stored=12,
         mask_high_bits=True, slope=1.0, intercept=0.0, ext=".dcm"),
    dict(name="transposed_flipped_big_endian", perm=(1, 0, 2), flips=(True, False, False), series_number=4,
         description="Axial BE", ts=ExplicitVRBigEndian, signed=True, slope=0.5, intercept=-512.0),
    dict(name="coronal_rle", perm=(0, 2, 1), flips=(False, True, False), series_number=5,
         description="Coronal RLE", ts=RLELossless, signed=True, slope=1.0, intercept=-1024.0),
    dict(name="oblique_deflate", perm=(0, 1, 2), flips=(False, False, False), rotate=(15.0, 20.0),
         series_number=6, description="Oblique", ts=DeflatedExplicitVRLittleEndian, signed=True,
         slope=0.25, intercept=-100.0),
    dict(name="tilted_1deg_jpeg_sv1", perm=(0, 1, 2), flips=(False, False, False), tilt=1.0,
         series_number=7, description="Tilt 1 JPEG-LL SV1", ts=JPEGLosslessSV1, predictor=1,
         signed=False, slope=1.0, intercept=-1024.0),
    dict(name="jpeg_lossless_p6", perm=(1, 0, 2), flips=(False, True, False), series_number=8,
         description="JPEG-LL predictor 6", ts=JPEGLossless, predictor=6, signed=True, slope=1.0,
         intercept=0.0),
    dict(name="tilted_12deg", perm=(0, 1, 2), flips=(False, False, False), tilt=12.0, series_number=9,
         description="Tilt 12", ts=ExplicitVRLittleEndian, signed=True, slope=1.0, intercept=0.0),
]


def make_views(hu, affine, out, rng):
    entries = []
    for spec in VIEWS:
        w, a = view(hu, affine, spec["perm"], spec["flips"])
        if "rotate" in spec:
            r = np.eye(4)
            r[:3, :3] = rotation(*spec["rotate"])
            a = r @ a
        if "tilt" in spec:
            shift = np.tan(np.deg2rad(spec["tilt"])) * np.linalg.norm(a[:3, 2])
            a[:3, 2] += shift * a[:3, 1] / np.linalg.norm(a[:3, 1])
        w, a = order_along_normal(w, a)
        folder = os.path.join(out, "views", spec["name"])
        files = write_series(folder, w, a, spec, rng)
        r = np.eye(3) if "rotate" not in spec else rotation(*spec["rotate"])
        entries.append({
            "name": spec["name"],
            "folder": folder,
            "files": len(files),
            "transfer_syntax": spec["ts"],
            "series_number": spec["series_number"],
            "description": spec["description"],
            "affine": a.tolist(),
            "world_rotation": r.tolist(),
            "tilt_degrees": spec.get("tilt", 0.0),
        })
    return entries


def copy_files(files, folder, prefix=""):
    os.makedirs(folder, exist_ok=True)
    out = []
    for f in files:
        dst = os.path.join(folder, prefix + os.path.basename(f))
        shutil.copy(f, dst)
        out.append(dst)
    return out


def by_position(files):
    """Files sorted along their normal."""
    def key(f):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        return float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), np.cross(iop[:3], iop[3:])))
    return sorted(files, key=key)


def rewrite(path, edit):
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path, enforce_file_format=True)


def make_bad(out, views_dir, hu, affine, rng):
    axial = by_position([os.path.join(views_dir, "axial_explicit_le", f) for f in os.listdir(os.path.join(views_dir, "axial_explicit_le"))])
    implicit = [os.path.join(views_dir, "axial_implicit_12bit", f) for f in os.listdir(os.path.join(views_dir, "axial_implicit_12bit"))]
    bad = os.path.join(out, "bad")
    cases = {}

    # Two CT series side by side, an MR series, a README, a DICOMDIR and a garbage file.
    mixed = os.path.join(bad, "mixed")
    copy_files(axial, mixed, "a_")
    copy_files(implicit, os.path.join(mixed, "sub"), "b_")
    w, a = view(hu[:, :, :3], affine, (0, 1, 2), (False, False, False))
    mr = write_series(os.path.join(bad, "tmp_mr"), w, a, dict(name="mr", series_number=30, description="MR",
                      ts=ExplicitVRLittleEndian, signed=True, slope=1.0, intercept=0.0), rng)
    for f in mr:
        rewrite(f, lambda ds: (setattr(ds, "Modality", "MR"), setattr(ds, "SOPClassUID", MRImageStorage)))
    copy_files(mr, mixed, "mr_")
    with open(os.path.join(mixed, "README.txt"), "w") as f:
        f.write("exported series\n")
    dirds = Dataset()
    dirds.file_meta = FileMetaDataset()
    dirds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    dirds.file_meta.MediaStorageSOPInstanceUID = uid("dicomdir")
    dirds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dirds.FileSetID = "FIXTURES"
    dirds.save_as(os.path.join(mixed, "DICOMDIR"), enforce_file_format=True)
    with open(os.path.join(mixed, "garbage.dcm"), "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)))
    cases["mixed"] = {"folder": mixed}

    # Only an MR series.
    cases["mr_only"] = {"folder": os.path.dirname(copy_files(mr, os.path.join(bad, "mr_only"))[0])}
    shutil.rmtree(os.path.join(bad, "tmp_mr"))

    # One slice missing in the middle (the files on both sides are named).
    files = copy_files(axial, os.path.join(bad, "missing_slice"))
    os.remove(files[4])
    cases["missing_slice"] = {"folder": os.path.dirname(files[0]), "before": files[3], "after": files[5]}

    # A second slice at the same position with its own SOPInstanceUID.
    files = copy_files(axial, os.path.join(bad, "duplicate"))
    dup = os.path.join(os.path.dirname(files[0]), "zz_duplicate")
    shutil.copy(files[2], dup)
    rewrite(dup, lambda ds: setattr(ds, "SOPInstanceUID", uid("duplicate")))
    cases["duplicate"] = {"folder": os.path.dirname(files[0]), "files": [files[2], dup]}

    # The same file twice under two names: read once, with a warning.
    files = copy_files(axial, os.path.join(bad, "exact_copy"))
    copy = os.path.join(os.path.dirname(files[0]), "copy_of_slice")
    shutil.copy(files[2], copy)
    cases["exact_copy"] = {"folder": os.path.dirname(files[0]), "files": [files[2], copy]}

    # One slice cut short inside its pixel data.
    files = copy_files(axial, os.path.join(bad, "truncated"))
    size = os.path.getsize(files[3])
    with open(files[3], "r+b") as f:
        f.truncate(size - 1000)
    cases["truncated"] = {"folder": os.path.dirname(files[0]), "file": files[3]}

    # One slice with another pixel spacing.
    files = copy_files(axial, os.path.join(bad, "spacing_mismatch"))
    rewrite(files[5], lambda ds: setattr(ds, "PixelSpacing", ["0.5", "0.5"]))
    cases["spacing_mismatch"] = {"folder": os.path.dirname(files[0]), "file": files[5]}

    # A localizer (another orientation) inside the series.
    files = copy_files(axial, os.path.join(bad, "localizer"))
    rewrite(files[0], lambda ds: setattr(ds, "ImageOrientationPatient", ["0", "1", "0", "0", "0", "-1"]))
    cases["localizer"] = {"folder": os.path.dirname(files[0]), "file": files[0]}

    # Slices 1.5 steps apart at one place.
    files = copy_files(axial, os.path.join(bad, "uneven"))
    def shift(ds):
        p = [float(v) for v in ds.ImagePositionPatient]
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        step = float(ds.SliceThickness) * 0.5 * np.cross(iop[:3], iop[3:])
        ds.ImagePositionPatient = [ds_str(v) for v in np.array(p) + step]
    for f in files[6:]:
        rewrite(f, shift)
    cases["uneven"] = {"folder": os.path.dirname(files[0]), "before": files[5], "after": files[6]}

    # One slice in a transfer syntax without a pure-Rust decoder (JPEG 2000).
    files = copy_files(axial, os.path.join(bad, "jpeg2000"))
    def j2k(ds):
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
        ds["PixelData"].VR = "OB"
    rewrite(files[1], j2k)
    cases["jpeg2000"] = {"folder": os.path.dirname(files[0]), "file": files[1]}
    return cases


def make_real(out):
    """CT_small.dcm's HU as pydicom computes them, and a three-slice series built from it."""
    src = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(src)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    folder = os.path.join(out, "real_ct_small")
    os.makedirs(folder, exist_ok=True)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    ipp0 = np.array(ds.ImagePositionPatient, dtype=float)
    thickness = float(ds.SliceThickness)
    for k in range(3):
        s = copy.deepcopy(ds)
        s.SOPInstanceUID = uid("ct_small", k)
        s.file_meta.MediaStorageSOPInstanceUID = s.SOPInstanceUID
        s.InstanceNumber = 3 - k
        s.ImagePositionPatient = [ds_str(v) for v in ipp0 + k * thickness * normal]
        s.save_as(os.path.join(folder, f"slice{2 - k}"), enforce_file_format=True)
    spacing = [float(v) for v in ds.PixelSpacing]
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * spacing[1]
    lps[:3, 1] = iop[3:] * spacing[0]
    lps[:3, 2] = normal * thickness
    lps[:3, 3] = ipp0
    return {
        "file": src,
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "hu": hu.ravel().tolist(),
        "phi": [str(ds.PatientName), str(ds.PatientID)],
        "series_folder": folder,
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "affine": (np.diag([-1.0, -1, 1, 1]) @ lps).tolist(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nifti", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=14)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    hu, affine = read_nifti(args.nifti)
    views = make_views(hu, affine, args.out, rng)
    bad = make_bad(args.out, os.path.join(args.out, "views"), hu, affine, rng)
    manifest = {
        "pydicom": pydicom.__version__,
        "numpy": np.__version__,
        "phi": PHI,
        "views": views,
        "bad": bad,
        "ct_small": make_real(args.out),
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(views)} views and {len(bad)} bad-input folders under {args.out}")


if __name__ == "__main__":
    main()

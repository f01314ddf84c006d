"""A corpus of bad or odd inputs, each written next to one good tiny phantom series.

Each case is a small function that writes its input into a case folder that already holds
``good/`` (a clean 32x32x4 CT series). Most cases also start from ``odd/``, a second clean
series (:func:`odd_series`), and damage one or all of its files. A case carries its expected
outcome, checked by ``tests/test_corpus.py`` for every command in ``Case.commands``:

* ``skipped``: ``target`` is a file that cannot be placed in a series; it is listed with a
  reason containing ``fragment``;
* ``dropped``: ``target`` is a slice dropped from its series; the series is read without it;
* ``unreadable``: ``target`` (a series folder or NIfTI file) cannot be read at all; the one-line
  error names it and contains ``fragment``;
* ``flagged``: ``target`` is read, with the quality flag ``fragment``;
* ``ok``: ``target`` is read as a clean volume (no dropped slices, no quality flags);
* ``ignored``: ``target`` is a non-image DICOM object, left out without being reported.

To add cases for other commands (predict, train, bundle, checkpoints), register them with
``@case(..., commands=("predict",))`` and teach ``tests/test_corpus.py`` that command's
runner and checks; the builders and templates here are shared.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE = 32
SLICES = 4
GOOD_SEED = 1
ODD_SEED = 2
READER_COMMANDS = ("inspect", "segment")
PARTIAL, CLEAN = 3, 0


@dataclass(frozen=True)
class Case:
    """One corpus input and what every command must make of it.

    Attributes:
        name: the builder's name (the test id).
        build: writes the input into the case folder (which already holds ``good/``).
        outcome: ``skipped``, ``dropped``, ``unreadable``, ``flagged``, ``ok`` or ``ignored``.
        target: path relative to the case folder that the report must name.
        fragment: text of the reason, or the quality flag for ``flagged``.
        volumes: volumes that must be read, the good one included.
        exit_code: expected exit code of every command in ``commands``.
        commands: the commands this case runs through.
    """

    name: str
    build: Callable[[Path], None]
    outcome: str
    target: str
    fragment: str
    volumes: int
    exit_code: int
    commands: tuple[str, ...] = READER_COMMANDS


CASES: list[Case] = []

_OUTCOMES = {"skipped", "dropped", "unreadable", "flagged", "ok", "ignored"}


def case(
    outcome: str,
    target: str,
    fragment: str = "",
    volumes: int = 2,
    exit_code: int | None = None,
    commands: tuple[str, ...] = READER_COMMANDS,
):
    """Register a builder as a corpus case (exit code 3 when something is left out, else 0)."""
    assert outcome in _OUTCOMES, outcome
    if exit_code is None:
        exit_code = PARTIAL if outcome in ("skipped", "dropped", "unreadable") else CLEAN

    def register(build: Callable[[Path], None]) -> Callable[[Path], None]:
        CASES.append(
            Case(build.__name__, build, outcome, target, fragment, volumes, exit_code, commands)
        )
        return build

    return register


# ---------------------------------------------------------------------------------------------
# Templates: two clean phantom series, generated once per process and kept as bytes.


@functools.cache
def _template(seed: int) -> tuple[tuple[str, bytes], ...]:
    from ichseg.phantom import PhantomConfig, generate_study
    from ichseg.phantom.writers import write_dicom_series

    study = generate_study(seed, PhantomConfig(size=SIZE, num_slices=SLICES))
    with tempfile.TemporaryDirectory() as tmp:
        files = write_dicom_series(study, tmp)
        return tuple((p.name, p.read_bytes()) for p in files)


@functools.cache
def _study(seed: int):
    from ichseg.phantom import PhantomConfig, generate_study

    return generate_study(seed, PhantomConfig(size=SIZE, num_slices=SLICES))


def series_uid(seed: int) -> str:
    from ichseg.phantom.writers import study_uids

    return study_uids(_study(seed)).series


def _write_template(seed: int, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in _template(seed):
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def write_good(case_dir: Path) -> Path:
    """The good series every case sits next to: ``case_dir/good/CT0001.dcm`` ..."""
    _write_template(GOOD_SEED, case_dir / "good")
    return case_dir / "good"


def odd_series(case_dir: Path, name: str = "odd") -> list[Path]:
    """A second clean series (``case_dir/<name>/CT0001.dcm`` ...) for a case to damage."""
    return _write_template(ODD_SEED, case_dir / name)


def edit(path: Path, change: Callable) -> None:
    """Read a DICOM file, apply ``change(dataset)`` and write it back."""
    import pydicom

    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def edit_all(paths: list[Path], change: Callable) -> None:
    for path in paths:
        edit(path, change)


def _delete(*keywords: str) -> Callable:
    def change(ds) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)

    return change


def _set(**values) -> Callable:
    def change(ds) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return change


def odd_nifti(path: Path, data: np.ndarray | None = None, header_edit=None) -> Path:
    """The odd study as a NIfTI (int16 HU), optionally with other data or header fields."""
    import nibabel as nib

    from ichseg.phantom.writers import study_to_volume

    volume = study_to_volume(_study(ODD_SEED))
    if data is None:
        image = volume.to_nifti(np.clip(np.rint(volume.hu), -32768, 32767).astype(np.int16))
    else:
        image = nib.Nifti1Image(data, volume.affine)
    if header_edit is not None:
        header = image.header.copy()
        header_edit(header)
        image = nib.Nifti1Image(np.asanyarray(image.dataobj), None, header=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Files that cannot be placed in a series: skipped with a reason.


@case("skipped", "empty.dcm", "empty file (0 bytes)", volumes=1)
def zero_byte_file(d: Path) -> None:
    (d / "empty.dcm").write_bytes(b"")


@case("skipped", "notes.dcm", "not a DICOM file", volumes=1)
def text_named_dcm(d: Path) -> None:
    (d / "notes.dcm").write_text("patient list\nnot an image\n")


@case("skipped", "odd/CT0001.dcm", "truncated header")
def truncated_header(d: Path) -> None:
    path = odd_series(d)[0]
    path.write_bytes(path.read_bytes()[:300])


@case("skipped", "odd/CT0001.dcm", "without SeriesInstanceUID")
def no_series_uid(d: Path) -> None:
    edit(odd_series(d)[0], _delete("SeriesInstanceUID"))


@case("skipped", "odd/CT0002.dcm", "modality MR is not CT")
def non_ct_modality(d: Path) -> None:
    edit(odd_series(d)[1], _set(Modality="MR"))


@case("skipped", "odd/CT0001.dcm", "localizer")
def localizer(d: Path) -> None:
    edit(odd_series(d)[0], _set(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))


@case("skipped", "odd/CT0004.dcm", "multi-frame")
def multi_frame(d: Path) -> None:
    def change(ds) -> None:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    edit(odd_series(d)[3], change)


@case("skipped", "odd/CT0001.dcm", "secondary capture")
def secondary_capture(d: Path) -> None:
    from pydicom.uid import SecondaryCaptureImageStorage

    def change(ds) -> None:
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage

    edit(odd_series(d)[0], change)


@case("skipped", "odd/CT0001.dcm", "no pixel matrix")
def no_rows_columns(d: Path) -> None:
    edit(odd_series(d)[0], _delete("Rows", "Columns"))


@case("skipped", "broken.dcm", "symbolic link that cannot be followed", volumes=1)
def broken_symlink(d: Path) -> None:
    os.symlink("missing.dcm", d / "broken.dcm")


@case("skipped", "self.dcm", "Too many levels of symbolic links", volumes=1)
def symlink_to_itself(d: Path) -> None:
    os.symlink("self.dcm", d / "self.dcm")


@case("ok", "good", volumes=1)
def symlink_loop_to_parent(d: Path) -> None:
    os.symlink("..", d / "good" / "parent")
    os.symlink(".", d / "here")


@case("skipped", "pipe.dcm", "not a regular file", volumes=1)
def named_pipe(d: Path) -> None:
    os.mkfifo(d / "pipe.dcm")


# ---------------------------------------------------------------------------------------------
# Non-image DICOM objects: left out quietly.


@case("ignored", "media/DICOMDIR", volumes=2)
def dicomdir_media_set(d: Path) -> None:
    import pydicom
    from pydicom.fileset import FileSet

    staging = d.parent / f"{d.name}-staging"
    files = odd_series(staging)
    file_set = FileSet()
    for path in files:
        file_set.add(pydicom.dcmread(path))
    file_set.write(d / "media")
    for path in files:
        path.unlink()
    (staging / "odd").rmdir()
    staging.rmdir()


@case("ignored", "report.dcm", volumes=1)
def structured_report(d: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.PatientID = "PT000001"
    ds.save_as(d / "report.dcm", enforce_file_format=True)


# ---------------------------------------------------------------------------------------------
# Slices that belong to a series but cannot be used: dropped, the series read without them.


@case("dropped", "odd/CT0002.dcm", "less than expected")
def truncated_pixels(d: Path) -> None:
    path = odd_series(d)[1]
    path.write_bytes(path.read_bytes()[:-100])


@case("dropped", "odd/CT0002.dcm", "but the file holds")
def pixel_data_missing(d: Path) -> None:
    edit(odd_series(d)[1], _delete("PixelData"))


@case("dropped", "odd/CT0002.dcm", "no PixelData element")
def compressed_pixel_data_missing(d: Path) -> None:
    from pydicom.uid import RLELossless

    files = odd_series(d)
    edit_all(files, lambda ds: ds.compress(RLELossless, generate_instance_uid=False))
    edit(files[1], _delete("PixelData"))


@case("dropped", "odd/CT0003.dcm", "header claims")
def bits_allocated_32(d: Path) -> None:
    edit(odd_series(d)[2], _set(BitsAllocated=32, BitsStored=32, HighBit=31))


@case("dropped", "odd/CT0002.dcm", "SamplesPerPixel 3")
def rgb_slice(d: Path) -> None:
    def change(ds) -> None:
        rgb = np.repeat(ds.pixel_array.astype(np.uint8)[..., None], 3, axis=2)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rgb.tobytes()

    edit(odd_series(d)[1], change)


@case("dropped", "odd/CT0002.dcm", "cannot decode pixel data (JPEG-LS Lossless)")
def corrupt_jpeg_ls(d: Path) -> None:
    from pydicom.uid import JPEGLSLossless

    files = odd_series(d)

    def compress(ds) -> None:
        ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls", generate_instance_uid=False)

    edit_all(files, compress)
    data = bytearray(files[1].read_bytes())
    start = data.find(b"\xff\xd8\xff\xf7")  # start of image, then the JPEG-LS frame header
    data[start + 4 : start + 30] = b"\xee" * 26
    files[1].write_bytes(bytes(data))


@case("dropped", "odd/CT0003.dcm", "40000x40000 pixels, above the limit")
def huge_matrix_in_small_file(d: Path) -> None:
    edit(odd_series(d)[2], _set(Rows=40000, Columns=40000))


@case("dropped", "odd/CT0003.dcm", "but the file holds")
def matrix_larger_than_file(d: Path) -> None:
    edit(odd_series(d)[2], _set(Rows=4000, Columns=4000))


@case("dropped", "odd/CT0002.dcm", "differs from series 32x32")
def mixed_sizes(d: Path) -> None:
    def change(ds) -> None:
        ds.Rows, ds.Columns = 16, 16
        ds.PixelData = np.zeros((16, 16), np.int16).tobytes()

    edit(odd_series(d)[1], change)


@case("dropped", "odd/CT0002_copy.dcm", "duplicate slice position")
def duplicate_position(d: Path) -> None:
    from pydicom.uid import generate_uid

    source = odd_series(d)[1]
    copy = source.with_name("CT0002_copy.dcm")
    copy.write_bytes(source.read_bytes())
    edit(copy, _set(SOPInstanceUID=generate_uid()))


@case("dropped", "odd/CT0003.dcm", "no ImagePositionPatient")
def missing_position_one_slice(d: Path) -> None:
    edit(odd_series(d)[2], _delete("ImagePositionPatient"))


@case("dropped", "odd/CT0002.dcm", "not two unit vectors")
def non_orthonormal_orientation_one_slice(d: Path) -> None:
    edit(odd_series(d)[1], _set(ImageOrientationPatient=[1, 0, 0, 0.6, 0.8, 0.3]))


@case("dropped", "odd/CT0004.dcm", "PixelSpacing -0.5\\0.5 is not two positive")
def negative_pixel_spacing_one_slice(d: Path) -> None:
    edit(odd_series(d)[3], _set(PixelSpacing=[-0.5, 0.5]))


@case("dropped", "odd/CT0002.dcm", "RescaleSlope 'NaN' is not a finite number")
def nan_slope_one_slice(d: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that "NaN" is not a valid DS
        edit(odd_series(d)[1], _set(RescaleSlope="NaN"))


@case("dropped", "odd/CT0003.dcm", "RescaleIntercept missing and stored values")
def intercept_missing_one_slice(d: Path) -> None:
    edit(odd_series(d)[2], _delete("RescaleIntercept", "RescaleSlope"))


# ---------------------------------------------------------------------------------------------
# Series or volumes that cannot be read at all: one line naming them.


@case("unreadable", "odd", "not two unit vectors", volumes=1)
def non_orthonormal_orientation(d: Path) -> None:
    edit_all(odd_series(d), _set(ImageOrientationPatient=[1, 0, 0, 0.6, 0.8, 0.3]))


@case("unreadable", "odd", "ImageOrientationPatient 0\\0\\0\\0\\0\\0", volumes=1)
def zero_orientation(d: Path) -> None:
    edit_all(odd_series(d), _set(ImageOrientationPatient=[0, 0, 0, 0, 0, 0]))


@case("unreadable", "odd", "PixelSpacing 0\\0 is not two positive", volumes=1)
def zero_pixel_spacing(d: Path) -> None:
    edit_all(odd_series(d), _set(PixelSpacing=[0, 0]))


@case("unreadable", "odd", "do not look like HU", volumes=1)
def rescale_missing_raw_values(d: Path) -> None:
    edit_all(odd_series(d), _delete("RescaleIntercept", "RescaleSlope"))


@case("unreadable", "odd", "RescaleSlope is 0", volumes=1)
def rescale_slope_zero(d: Path) -> None:
    edit_all(odd_series(d), _set(RescaleSlope=0))


@case("unreadable", "odd", "40000x40000", volumes=1)
def huge_matrix_every_slice(d: Path) -> None:
    edit_all(odd_series(d), _set(Rows=40000, Columns=40000))


@case("unreadable", "nifti/nan.nii.gz", "NaN or Inf", volumes=1)
def nifti_nan(d: Path) -> None:
    data = np.zeros((SIZE, SIZE, SLICES), np.float32)
    data[3, 4, 1] = np.nan
    odd_nifti(d / "nifti" / "nan.nii.gz", data)


@case("unreadable", "nifti/flat.nii.gz", "expected a 3D volume", volumes=1)
def nifti_2d(d: Path) -> None:
    odd_nifti(d / "nifti" / "flat.nii.gz", np.zeros((SIZE, SIZE), np.int16))


@case("unreadable", "nifti/series.nii.gz", "expected a 3D volume", volumes=1)
def nifti_4d(d: Path) -> None:
    odd_nifti(d / "nifti" / "series.nii.gz", np.zeros((SIZE, SIZE, SLICES, 2), np.int16))


def _sform(matrix: list[list[float]]) -> Callable:
    def change(header) -> None:
        header["srow_x"], header["srow_y"], header["srow_z"] = matrix
        header["sform_code"], header["qform_code"] = 1, 0

    return change


@case("unreadable", "nifti/zero.nii.gz", "zero voxel size", volumes=1)
def nifti_zero_affine(d: Path) -> None:
    odd_nifti(d / "nifti" / "zero.nii.gz", header_edit=_sform([[0.0] * 4] * 3))


@case("unreadable", "nifti/singular.nii.gz", "singular", volumes=1)
def nifti_singular_affine(d: Path) -> None:
    rows = [[1.0, 1.0, 0, 0], [0, 0.001, 0, 0], [0, 0, 5.0, 0]]
    odd_nifti(d / "nifti" / "singular.nii.gz", header_edit=_sform(rows))


@case("unreadable", "nifti/inf.nii.gz", "affine holds NaN or Inf", volumes=1)
def nifti_non_finite_affine(d: Path) -> None:
    rows = [[1.0, 0, 0, np.inf], [0, 1.0, 0, 0], [0, 0, 5.0, 0]]
    odd_nifti(d / "nifti" / "inf.nii.gz", header_edit=_sform(rows))


@case("unreadable", "nifti/plain.nii.gz", "not a readable NIfTI file", volumes=1)
def nifti_gzip_that_is_not(d: Path) -> None:
    (d / "nifti").mkdir()
    (d / "nifti" / "plain.nii.gz").write_bytes(b"\x5c\x01\x00\x00" + bytes(400))


@case("unreadable", "nifti/cut.nii.gz", "NIfTI", volumes=1)
def nifti_truncated_gzip(d: Path) -> None:
    path = odd_nifti(d / "nifti" / "cut.nii.gz")
    path.write_bytes(path.read_bytes()[:600])


@case("unreadable", "nifti/empty.nii", "not a readable NIfTI file", volumes=1)
def nifti_zero_bytes(d: Path) -> None:
    (d / "nifti").mkdir()
    (d / "nifti" / "empty.nii").write_bytes(b"")


@case("unreadable", "nifti/labels.nii.gz", "looks like a mask or label map", volumes=1)
def nifti_label_map(d: Path) -> None:
    labels = np.zeros((SIZE, SIZE, SLICES), np.uint8)
    labels[8:20, 8:20] = 1
    odd_nifti(d / "nifti" / "labels.nii.gz", labels)


@case("unreadable", "nifti/scan.json", "sidecar is not valid JSON", volumes=1)
def nifti_broken_sidecar(d: Path) -> None:
    odd_nifti(d / "nifti" / "scan.nii.gz")
    (d / "nifti" / "scan.json").write_text('{"PatientID": ')


# ---------------------------------------------------------------------------------------------
# Read on an assumption: accepted with a quality flag.


@case("flagged", "odd", "rescale_assumed")
def rescale_missing_hu_values(d: Path) -> None:
    def change(ds) -> None:
        hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
        ds.PixelData = hu.astype(np.int16).tobytes()
        del ds.RescaleIntercept, ds.RescaleSlope

    edit_all(odd_series(d), change)


@case("flagged", "odd", "rescale_assumed")
def rescale_slope_missing(d: Path) -> None:
    edit_all(odd_series(d), _delete("RescaleSlope"))


@case("flagged", "odd", "orientation_assumed")
def orientation_missing(d: Path) -> None:
    edit_all(odd_series(d), _delete("ImageOrientationPatient"))


@case("flagged", "odd", "pixel_spacing_assumed")
def pixel_spacing_missing(d: Path) -> None:
    edit_all(odd_series(d), _delete("PixelSpacing"))


@case("flagged", "odd", "position_assumed")
def position_missing(d: Path) -> None:
    edit_all(odd_series(d), _delete("ImagePositionPatient"))


@case("flagged", "odd", "patient_id_fallback")
def patient_id_missing(d: Path) -> None:
    edit_all(odd_series(d), _delete("PatientID"))


@case("flagged", "odd", "slice_gap")
def missing_interior_slice(d: Path) -> None:
    odd_series(d)[1].unlink()


@case("flagged", "odd/CT0003.dcm", "slice_spacing_assumed")
def single_slice_series(d: Path) -> None:
    for index, path in enumerate(odd_series(d)):
        if index != 2:
            path.unlink()


@case("flagged", "nifti/scan.nii.gz", "patient_id_fallback")
def nifti_without_sidecar(d: Path) -> None:
    odd_nifti(d / "nifti" / "scan.nii.gz")


@case("flagged", "nifti/scan.nii.gz", "orientation_assumed")
def nifti_without_sform_or_qform(d: Path) -> None:
    def change(header) -> None:
        header["sform_code"], header["qform_code"] = 0, 0

    odd_nifti(d / "nifti" / "scan.nii.gz", header_edit=change)
    (d / "nifti" / "scan.json").write_text(json.dumps({"PatientID": "P7"}))


@case("flagged", "nifti/raw.nii.gz", "hu_range_suspect")
def nifti_raw_values(d: Path) -> None:
    from ichseg.phantom.writers import study_to_volume

    raw = np.clip(study_to_volume(_study(ODD_SEED)).hu + 1024, 0, 4095).astype(np.uint16)
    odd_nifti(d / "nifti" / "raw.nii.gz", np.ascontiguousarray(raw.transpose(2, 1, 0)))
    (d / "nifti" / "raw.json").write_text(json.dumps({"PatientID": "P7"}))


# ---------------------------------------------------------------------------------------------
# Odd but valid: read cleanly.


@case("ok", "nifti/scan.nii.gz")
def nifti_with_sidecar(d: Path) -> None:
    odd_nifti(d / "nifti" / "scan.nii.gz")
    (d / "nifti" / "scan.json").write_text(json.dumps({"PatientID": "P7", "Modality": "CT"}))


@case("ok", "odd")
def orientation_with_rounding_error(d: Path) -> None:
    iop = [0.999999, 0.000012, -0.000003, -0.000011, 0.999998, 0.000004]
    edit_all(odd_series(d), _set(ImageOrientationPatient=iop))


@case("ok", "odd")
def big_endian(d: Path) -> None:
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian

    for path in odd_series(d):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = pixels.astype(">i2").tobytes()
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)


@case("ok", "odd")
def deflated(d: Path) -> None:
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    for path in odd_series(d):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)


@case("ok", "odd")
def implicit_vr(d: Path) -> None:
    import pydicom
    from pydicom.uid import ImplicitVRLittleEndian

    for path in odd_series(d):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)


@case("ok", "odd")
def rle_lossless(d: Path) -> None:
    from pydicom.uid import RLELossless

    def compress(ds) -> None:
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)

    edit_all(odd_series(d), compress)


@case("ok", "odd")
def no_preamble_raw_dataset(d: Path) -> None:
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    path = odd_series(d)[1]
    ds = pydicom.dcmread(path)
    body = pydicom.Dataset()
    body.update(ds)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, body)
    path.write_bytes(buffer.getvalue())


@case("skipped", "odd.tar.gz", "not a DICOM file")
def archive_beside_series(d: Path) -> None:
    odd_series(d)
    (d / "odd.tar.gz").write_bytes(gzip.compress(b"archive"))

"""Write phantom studies as DICOM series, NIfTI volumes and RSNA-style label tables.

Every file is written under a temporary name in its final folder and moved into place with
``os.replace``, so a reader never sees a half-written file. Geometry follows
``ichseg.io.geometry``: slice k sits at ``first_position + k * slice_step``; the NIfTI affine
is ``dicom_affine`` of the values written to the DICOM headers, rounded the same way.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from ichseg.errors import ConfigError
from ichseg.fileio import atomic_path
from ichseg.io.geometry import dicom_affine
from ichseg.phantom.anatomy import PhantomConfig, PhantomStudy, generate_study
from ichseg.volume import SUBTYPES, CTVolume

DICOM_INTERCEPT = -1024.0
ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": ExplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "rle": RLELossless,
}
# Leaves room for a million studies per dataset seed with readable, unique study ids.
_STUDIES_PER_SEED = 1_000_000
_POSITION_DECIMALS = 4
_SLICE_COLUMNS = ("study_id", "patient_id", "series_uid", "sop_uid", "slice_index", "z_mm")
_MANIFEST_COLUMNS = (
    "study_id",
    "patient_id",
    "series_uid",
    "dicom_dir",
    "ct_nifti",
    "mask_nifti",
    "hemorrhage_nifti",
    "num_slices",
    "positive",
    "subtypes",
    "seed",
    "patient_age",
    "patient_sex",
    "manufacturer",
    "model_name",
    "convolution_kernel",
    "kvp",
    "tube_current_ma",
    "slice_thickness_mm",
)


@dataclass(frozen=True)
class Quirks:
    """Deliberate file defects for reader tests (all off by default).

    Args:
        rsna_12bit: store pixels like the broken RSNA files (BitsStored 12, unsigned,
            intercept 0, value = HU mod 4096 after clipping HU to [-1000, 3095]).
        gantry_tilt_deg: shift slice k by ``k * thickness * tan(tilt)`` along the column
            direction; the NIfTI affine uses the same sheared step.
        shuffle_names: random file names and reversed InstanceNumbers.
        missing_slice: leave out one interior slice's DICOM file (tables and NIfTI keep it).
        transfer_syntax: "explicit", "jpeg2000" (JPEG 2000 Lossless) or "rle" (RLE Lossless).
    """

    rsna_12bit: bool = False
    gantry_tilt_deg: float = 0.0
    shuffle_names: bool = False
    missing_slice: bool = False
    transfer_syntax: str = "explicit"

    def __post_init__(self) -> None:
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ConfigError(
                f"unknown transfer_syntax {self.transfer_syntax!r}; "
                f"choose from {sorted(TRANSFER_SYNTAXES)}"
            )
        if not -45.0 < self.gantry_tilt_deg < 45.0:
            raise ConfigError(f"gantry_tilt_deg must lie in (-45, 45), got {self.gantry_tilt_deg}")


@dataclass(frozen=True)
class SeriesUIDs:
    """The DICOM identifiers of one phantom study (one series)."""

    study: str
    series: str
    frame_of_reference: str
    sops: tuple[str, ...]


def study_seed(seed: int, index: int) -> int:
    """Seed of study ``index`` in a dataset drawn with ``seed`` (distinct within a dataset).

    Args:
        seed: dataset seed, non-negative.
        index: study index, ``0 <= index < 1_000_000``.
    """
    if seed < 0 or not 0 <= index < _STUDIES_PER_SEED:
        raise ConfigError(f"need seed >= 0 and 0 <= index < {_STUDIES_PER_SEED}")
    return seed * _STUDIES_PER_SEED + index


def study_uids(study: PhantomStudy) -> SeriesUIDs:
    """Deterministic UIDs: the same study always gets the same identifiers."""
    key = [
        study.study_id,
        str(study.seed),
        "x".join(str(v) for v in study.hu.shape),
        repr(tuple(study.pixel_spacing)),
        repr(study.slice_thickness),
    ]
    return SeriesUIDs(
        study=generate_uid(entropy_srcs=[*key, "study"]),
        series=generate_uid(entropy_srcs=[*key, "series"]),
        frame_of_reference=generate_uid(entropy_srcs=[*key, "frame"]),
        sops=tuple(
            generate_uid(entropy_srcs=[*key, "sop", str(k)]) for k in range(study.num_slices)
        ),
    )


def series_geometry(
    study: PhantomStudy, quirks: Quirks | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """ImagePositionPatient of every slice ``(z, 3)`` and the slice step vector (LPS mm)."""
    quirks = quirks or Quirks()
    thickness = float(study.slice_thickness)
    shear = thickness * np.tan(np.deg2rad(quirks.gantry_tilt_deg))
    step = np.round(np.array([0.0, shear, thickness]), _POSITION_DECIMALS)
    origin = np.round(np.asarray(study.first_position, dtype=np.float64), _POSITION_DECIMALS)
    positions = origin + np.arange(study.num_slices)[:, None] * step
    return np.round(positions, _POSITION_DECIMALS), step


def _instance_numbers(study: PhantomStudy, quirks: Quirks) -> list[int]:
    n = study.num_slices
    # Reversed numbering: a reader that sorts by InstanceNumber gets the volume upside down.
    return [n - k for k in range(n)] if quirks.shuffle_names else [k + 1 for k in range(n)]


def study_to_volume(study: PhantomStudy, quirks: Quirks | None = None) -> CTVolume:
    """The study as the ``CTVolume`` a correct reader returns for its DICOM series.

    Args:
        study: a generated study.
        quirks: only ``gantry_tilt_deg`` and ``shuffle_names`` change the result (affine and
            instance numbers).
    """
    quirks = quirks or Quirks()
    positions, step = series_geometry(study, quirks)
    uids = study_uids(study)
    affine = dicom_affine(positions[0], ORIENTATION, study.pixel_spacing, step)
    return CTVolume(
        hu=study.hu,
        affine=affine,
        source=f"phantom:{study.study_id}",
        series_uid=uids.series,
        slice_positions=positions[:, 2].copy(),
        sop_uids=list(uids.sops),
        instance_numbers=list(_instance_numbers(study, quirks)),
        metadata=_patient_metadata(study, uids),
    )


def _patient_metadata(study: PhantomStudy, uids: SeriesUIDs) -> dict[str, object]:
    return {
        "PatientID": study.patient_id,
        "StudyInstanceUID": uids.study,
        "SeriesInstanceUID": uids.series,
        "PatientAge": f"{int(study.patient_age):03d}Y",
        "PatientSex": study.patient_sex,
        "StudyDate": study.study_date,
        "KVP": float(study.kvp),
        "Manufacturer": study.manufacturer,
        "ManufacturerModelName": study.model_name,
        "ConvolutionKernel": study.convolution_kernel,
        "XRayTubeCurrent": float(study.tube_current_ma),
        "SliceThickness": float(study.slice_thickness),
        "Modality": "CT",
    }


def _atomic_path(path: Path):
    """A temporary sibling of ``path`` (same suffixes) that replaces ``path`` on success."""
    return atomic_path(path, suffix="".join(path.suffixes))


def _stored_pixels(hu: np.ndarray, quirks: Quirks) -> np.ndarray:
    rounded = np.rint(hu)
    if quirks.rsna_12bit:
        wrapped = np.mod(np.clip(rounded, -1000, 3095).astype(np.int32), 4096)
        return wrapped.astype(np.uint16)
    return np.clip(rounded - DICOM_INTERCEPT, -32768, 32767).astype(np.int16)


def _ds(value: float, decimals: int = _POSITION_DECIMALS) -> str:
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _slice_dataset(
    study: PhantomStudy,
    uids: SeriesUIDs,
    index: int,
    position: np.ndarray,
    instance_number: int,
    quirks: Quirks,
) -> Dataset:
    sop = uids.sops[index]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    patient = _patient_metadata(study, uids)
    rows, cols = study.hu.shape[1:]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyDate = study.study_date
    ds.SeriesDate = study.study_date
    ds.StudyTime = "120000"
    ds.SeriesTime = "120100"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = patient["Manufacturer"]
    ds.ManufacturerModelName = patient["ManufacturerModelName"]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD WITHOUT CONTRAST"
    ds.SeriesDescription = f"Head {study.slice_thickness:g}mm"
    ds.PatientName = f"PHANTOM^{study.patient_id}"
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = study.patient_sex
    ds.PatientAge = patient["PatientAge"]
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = _ds(study.slice_thickness, 6)
    ds.KVP = _ds(study.kvp)
    ds.XRayTubeCurrent = int(study.tube_current_ma)
    ds.GantryDetectorTilt = _ds(quirks.gantry_tilt_deg)
    ds.ConvolutionKernel = patient["ConvolutionKernel"]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids.study
    ds.SeriesInstanceUID = uids.series
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in ORIENTATION]
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(position[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    # PhantomConfig.spacing is rounded to 6 decimals; all of them must reach the header.
    ds.PixelSpacing = [_ds(v, 6) for v in study.pixel_spacing]
    ds.BitsAllocated = 16
    if quirks.rsna_12bit:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.RescaleIntercept = "0"
    else:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.RescaleIntercept = _ds(DICOM_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"

    pixels = _stored_pixels(study.hu[index], quirks)
    syntax = TRANSFER_SYNTAXES[quirks.transfer_syntax]
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.tobytes()
    else:
        plugin = "pylibjpeg" if syntax == JPEG2000Lossless else "pydicom"
        ds.compress(syntax, pixels, encoding_plugin=plugin, generate_instance_uid=False)
    return ds


def write_dicom_series(
    study: PhantomStudy, folder: str | Path, quirks: Quirks | None = None
) -> list[Path]:
    """Write one CT Image Storage file per slice into ``folder``.

    Args:
        study: a generated study.
        folder: output folder, created when missing.
        quirks: file defects to reproduce (see ``Quirks``).

    Returns:
        The written files, in slice order (inferior first).
    """
    quirks = quirks or Quirks()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = study_uids(study)
    positions, _ = series_geometry(study, quirks)
    numbers = _instance_numbers(study, quirks)
    n = study.num_slices
    names_rng = np.random.default_rng([study.seed, 1])
    skipped = -1
    if quirks.missing_slice and n >= 3:
        skipped = int(names_rng.integers(1, n - 1))
    written: list[Path] = []
    for k in range(n):
        if k == skipped:
            continue
        if quirks.shuffle_names:
            name = f"{names_rng.integers(0, 2**62):016x}.dcm"
        else:
            name = f"CT{k + 1:04d}.dcm"
        ds = _slice_dataset(study, uids, k, positions[k], numbers[k], quirks)
        path = folder / name
        with _atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        written.append(path)
    return written


def write_nifti_volumes(
    study: PhantomStudy, folder: str | Path, quirks: Quirks | None = None
) -> dict[str, Path]:
    """Write ``<id>_ct.nii.gz`` (int16 HU), ``<id>_mask.nii.gz`` and ``<id>_hemorrhage.nii.gz``.

    Args:
        study: a generated study.
        folder: output folder, created when missing.
        quirks: only the gantry tilt matters (sheared affine).
    """
    import nibabel as nib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = study_to_volume(study, quirks)
    images = {
        "ct": volume.to_nifti(np.clip(np.rint(study.hu), -32768, 32767).astype(np.int16)),
        "mask": volume.to_nifti(study.intracranial_mask, dtype=np.uint8),
        "hemorrhage": volume.to_nifti(study.hemorrhage, dtype=np.uint8),
    }
    paths: dict[str, Path] = {}
    for kind, image in images.items():
        path = folder / f"{study.study_id}_{kind}.nii.gz"
        with _atomic_path(path) as tmp:
            nib.save(image, tmp)
        paths[kind] = path
    return paths


def _write_csv(path: Path, header: tuple[str, ...] | list[str], rows: list[list[object]]) -> None:
    with _atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)


def write_dataset(
    out_dir: str | Path,
    studies: int,
    seed: int,
    config: PhantomConfig | None = None,
    quirks: Quirks | None = None,
    write_dicom: bool = True,
    write_nifti: bool = True,
) -> Path:
    """Generate ``studies`` phantom studies and write them with their label tables.

    Layout under ``out_dir``: ``dicom/<study_id>/*.dcm``, ``nifti/<study_id>_{ct,mask,
    hemorrhage}.nii.gz``, ``labels_rsna.csv``, ``slices.csv`` and ``manifest.csv`` (one row
    per study with its demographics and scanner attributes; paths relative to ``out_dir``).

    Args:
        out_dir: dataset folder, created when missing; nothing is written outside it.
        studies: number of studies.
        seed: dataset seed; study i uses ``study_seed(seed, i)``.
        config: phantom settings, default ``PhantomConfig()``.
        quirks: DICOM defects applied to every study.
        write_dicom: write the DICOM series.
        write_nifti: write the NIfTI volumes.

    Returns:
        Path of ``manifest.csv``.
    """
    if studies < 0:
        raise ConfigError(f"studies must not be negative, got {studies}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or PhantomConfig()
    quirks = quirks or Quirks()
    manifest: list[list[object]] = []
    slice_rows: list[list[object]] = []
    rsna_rows: list[list[object]] = []
    for index in range(studies):
        s = study_seed(seed, index)
        study = generate_study(s, config)
        uids = study_uids(study)
        dicom_dir = ct_path = mask_path = hem_path = ""
        if write_dicom:
            folder = out_dir / "dicom" / study.study_id
            written = write_dicom_series(study, folder, quirks)
            keep = {p.name for p in written}
            # A rerun with other quirks must not leave files of the previous series behind.
            for stale in folder.glob("*.dcm"):
                if stale.name not in keep:
                    stale.unlink()
            dicom_dir = folder.relative_to(out_dir).as_posix()
        if write_nifti:
            paths = write_nifti_volumes(study, out_dir / "nifti", quirks)
            ct_path, mask_path, hem_path = (
                paths[k].relative_to(out_dir).as_posix() for k in ("ct", "mask", "hemorrhage")
            )
        labels = study.slice_labels()
        positions, _ = series_geometry(study, quirks)
        for k in range(study.num_slices):
            sop = uids.sops[k]
            row_labels = [int(v) for v in labels[k]]
            slice_rows.append(
                [
                    study.study_id,
                    study.patient_id,
                    uids.series,
                    sop,
                    k,
                    _ds(positions[k, 2]),
                    *row_labels,
                ]
            )
            rsna_rows.extend(
                [f"ID_{sop}_{name}", value]
                for name, value in zip(SUBTYPES, row_labels, strict=True)
            )
        present = study.subtypes_present()
        manifest.append(
            [
                study.study_id,
                study.patient_id,
                uids.series,
                dicom_dir,
                ct_path,
                mask_path,
                hem_path,
                study.num_slices,
                int(bool(present)),
                ";".join(present),
                s,
                study.patient_age,
                study.patient_sex,
                study.manufacturer,
                study.model_name,
                study.convolution_kernel,
                _ds(study.kvp),
                study.tube_current_ma,
                _ds(study.slice_thickness, 6),
            ]
        )
    _write_csv(out_dir / "labels_rsna.csv", ("ID", "Label"), rsna_rows)
    _write_csv(out_dir / "slices.csv", [*_SLICE_COLUMNS, *SUBTYPES], slice_rows)
    manifest_path = out_dir / "manifest.csv"
    _write_csv(manifest_path, _MANIFEST_COLUMNS, manifest)
    return manifest_path

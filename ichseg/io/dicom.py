"""DICOM CT series: header-only discovery, geometric sorting and HU conversion.

Discovery reads headers only, so a flat folder of many thousands of one-slice files (the RSNA
layout) is grouped into series without decoding any pixels. Reading a series sorts its slices by
position along the slice normal (never by file name or InstanceNumber), applies the RSNA 12-bit
intercept fix and RescaleSlope/Intercept, and reports geometry quirks as warnings.
"""

from __future__ import annotations

import logging
import os
import warnings as py_warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import InputError
from ichseg.io.geometry import dicom_affine, slice_normal, tilt_degrees
from ichseg.volume import AIR_HU, CTVolume

CT_MODALITY = "CT"
# Values at or below this (after rescale) are padding or outside the reconstruction circle.
OUT_OF_FIELD_HU = -1500.0
TILT_WARNING_DEG = 0.5
# Relative deviation of a gap from the median step before the spacing counts as irregular.
SPACING_TOLERANCE = 0.1

_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientAge",
    "PatientSex",
    "Modality",
    "ImageType",
    "Manufacturer",
    "KVP",
    "ConvolutionKernel",
    "SliceThickness",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsStored",
    "PixelRepresentation",
    "PixelPaddingValue",
    "RescaleIntercept",
    "RescaleSlope",
]

_TRANSFER_SYNTAX_NAMES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


@dataclass
class SliceHeader:
    """What discovery keeps of one DICOM file: enough to group, sort and vet it."""

    path: Path
    series_uid: str
    sop_uid: str
    modality: str
    image_type: tuple[str, ...]
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    instance_number: int | None
    frames: int
    transfer_syntax: str
    metadata: dict[str, Any]


@dataclass
class SeriesFiles:
    """The files of one series as found by discovery, not yet decoded."""

    series_uid: str
    headers: list[SliceHeader]

    @property
    def folder(self) -> Path:
        parents = {h.path.parent for h in self.headers}
        return parents.pop() if len(parents) == 1 else Path(os.path.commonpath(list(parents)))


@dataclass
class DicomScan:
    """Result of discovery: series found and files that are not usable DICOM CT."""

    series: list[SeriesFiles] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _float_tuple(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def _as_int(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _quiet_pydicom():
    """Import pydicom with its per-file standard-violation logging reduced to errors.

    Real archives are full of small violations that pydicom logs one by one; the reader
    reports what matters for HU and geometry itself. ``--verbose`` keeps pydicom's messages.
    """
    import pydicom

    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("pydicom").setLevel(logging.ERROR)
    return pydicom


def read_header(path: str | Path) -> SliceHeader:
    """Read one file's header (no pixels).

    Raises:
        InputError: the file is not DICOM or lacks the tags needed to place it in a series.
    """
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        return _read_header(Path(path))


def _read_header(path: Path) -> SliceHeader:
    pydicom = _quiet_pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        raise InputError(path, "not a DICOM file (no DICM preamble)") from None
    except Exception as error:  # pydicom raises many types on truncated files
        raise InputError(path, f"unreadable DICOM header ({type(error).__name__})") from None
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not series_uid:
        raise InputError(path, "DICOM file without SeriesInstanceUID")
    transfer_syntax = ""
    if getattr(ds, "file_meta", None) is not None:
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    spacing = _float_tuple(ds.get("PixelSpacing"))
    metadata = {
        "PatientID": str(ds.get("PatientID", "") or ""),
        "StudyInstanceUID": str(ds.get("StudyInstanceUID", "") or ""),
        "SeriesInstanceUID": series_uid,
        "PatientAge": str(ds.get("PatientAge", "") or ""),
        "PatientSex": str(ds.get("PatientSex", "") or ""),
        "KVP": _float_tuple([ds.KVP])[0] if ds.get("KVP") not in (None, "") else None,
        "Manufacturer": str(ds.get("Manufacturer", "") or ""),
        "ConvolutionKernel": str(ds.get("ConvolutionKernel", "") or ""),
        "SliceThickness": (
            float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None
        ),
    }
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = (image_type,)
    return SliceHeader(
        path=path,
        series_uid=series_uid,
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        image_type=tuple(str(v).upper() for v in image_type),
        position=_float_tuple(ds.get("ImagePositionPatient")),  # type: ignore[arg-type]
        orientation=_float_tuple(ds.get("ImageOrientationPatient")),
        pixel_spacing=spacing[:2] if spacing and len(spacing) >= 2 else None,  # type: ignore[arg-type]
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        instance_number=_as_int(ds.get("InstanceNumber")),
        frames=_as_int(ds.get("NumberOfFrames")) or 1,
        transfer_syntax=transfer_syntax,
        metadata=metadata,
    )


def _iter_files(root: Path):
    # os.scandir avoids a stat per entry, which matters on flat folders of 100k files.
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            raise InputError(folder, f"cannot list folder ({error.strerror})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file():
                yield Path(entry.path)


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def discover_series(root: str | Path) -> DicomScan:
    """Group every DICOM file under ``root`` (a folder tree or one file) by SeriesInstanceUID.

    Files that are not DICOM, not CT, or localizers are listed in ``skipped`` with the reason.
    NIfTI files are neither read nor reported here.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    files = [root] if root.is_file() else list(_iter_files(root))
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    scan = DicomScan()
    for path in files:
        if is_nifti(path):
            continue
        try:
            header = read_header(path)
        except InputError as error:
            scan.skipped.append((str(path), error.reason))
            continue
        reason = _unusable_reason(header)
        if reason:
            scan.skipped.append((str(path), reason))
            continue
        groups[header.series_uid].append(header)
    scan.series = [SeriesFiles(uid, headers) for uid, headers in groups.items()]
    scan.series.sort(key=lambda s: str(s.headers[0].path))
    return scan


def _unusable_reason(header: SliceHeader) -> str | None:
    if header.modality and header.modality.upper() != CT_MODALITY:
        return f"modality {header.modality} is not CT"
    if "LOCALIZER" in header.image_type or "SCOUT" in header.image_type:
        return "localizer/scout image, not an axial slice"
    if header.frames > 1:
        return f"multi-frame image ({header.frames} frames) is not supported"
    if header.rows <= 0 or header.columns <= 0:
        return "no pixel matrix (Rows/Columns missing)"
    return None


def hu_from_stored(
    stored: np.ndarray,
    slope: float,
    intercept: float,
    bits_stored: int | None = None,
    pixel_representation: int | None = None,
    padding_value: float | None = None,
) -> tuple[np.ndarray, bool]:
    """Convert stored pixel values to HU.

    Applies the RSNA 12-bit fix: files with BitsStored 12, unsigned pixels and an intercept
    above -100 hold HU wrapped into 12 bits; adding 1000, wrapping values >= 4096 and using
    intercept -1000 restores them. Padding and out-of-field values become air.

    Returns:
        The HU array (float32) and whether the 12-bit fix was applied.
    """
    values = stored.astype(np.float32)
    padding = None if padding_value is None else stored == padding_value
    fixed = bits_stored == 12 and pixel_representation == 0 and intercept > -100
    if fixed:
        values = values + 1000.0
        values[values >= 4096.0] -= 4096.0
        intercept = -1000.0
    hu = values * np.float32(slope) + np.float32(intercept)
    if padding is not None:
        hu[padding] = AIR_HU
    hu[hu <= OUT_OF_FIELD_HU] = AIR_HU
    return hu, fixed


def decode_slice(path: Path) -> tuple[np.ndarray, bool]:
    """Decode one DICOM file to HU (float32, (rows, columns)) and report the 12-bit fix."""
    pydicom = _quiet_pydicom()
    try:
        with py_warnings.catch_warnings():
            py_warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            stored = ds.pixel_array
    except Exception as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise InputError(
            path, f"cannot decode pixel data ({type(error).__name__}: {detail})"
        ) from None
    if stored.ndim != 2:
        raise InputError(path, f"expected one 2D frame, got pixel array shape {stored.shape}")
    padding = ds.get("PixelPaddingValue")
    return hu_from_stored(
        stored,
        slope=float(ds.get("RescaleSlope", 1) or 1),
        intercept=float(ds.get("RescaleIntercept", 0) or 0),
        bits_stored=_as_int(ds.get("BitsStored")),
        pixel_representation=_as_int(ds.get("PixelRepresentation")),
        padding_value=None if padding is None else float(padding),
    )


def _majority(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def read_series(series: SeriesFiles) -> CTVolume:
    """Decode one series into a CT volume sorted along the slice normal.

    Slices whose size or orientation differs from the series majority are dropped with a
    warning naming the file; gantry tilt, irregular spacing, duplicate positions and missing
    slices are reported as warnings and the volume stays usable.

    Raises:
        InputError: no slice of the series can be used.
    """
    warnings: list[str] = []
    headers = list(series.headers)
    if not headers:
        raise InputError(None, f"series {series.series_uid} has no files")
    size = _majority([(h.rows, h.columns) for h in headers])
    kept = []
    for h in headers:
        if (h.rows, h.columns) != size:
            warnings.append(
                f"dropped {h.path.name}: size {h.rows}x{h.columns} differs from series "
                f"{size[0]}x{size[1]}"
            )
        else:
            kept.append(h)
    headers = kept
    orientations = [h.orientation for h in headers if h.orientation and len(h.orientation) == 6]
    orientation = (
        np.array(_majority([tuple(round(v, 4) for v in o) for o in orientations]))
        if orientations
        else np.array([1.0, 0, 0, 0, 1.0, 0])
    )
    if not orientations:
        warnings.append("no ImageOrientationPatient: assumed axial")
    kept = []
    for h in headers:
        if h.orientation and np.abs(np.array(h.orientation) - orientation).max() > 1e-3:
            warnings.append(f"dropped {h.path.name}: orientation differs from the series")
        else:
            kept.append(h)
    headers = kept
    if not headers:
        raise InputError(series.folder, f"series {series.series_uid}: no consistent slices")

    normal = slice_normal(orientation)
    have_positions = all(h.position is not None for h in headers)
    if have_positions:
        distances = np.array([float(np.dot(h.position, normal)) for h in headers])
    else:
        warnings.append("ImagePositionPatient missing: slices ordered by InstanceNumber")
        distances = np.array(
            [
                float(h.instance_number if h.instance_number is not None else i)
                for i, h in enumerate(headers)
            ]
        )
    order = np.argsort(distances, kind="stable")
    headers = [headers[i] for i in order]
    distances = distances[order]

    # Duplicate positions: keep the first file, report the rest.
    unique = [0]
    for i in range(1, len(headers)):
        if abs(distances[i] - distances[unique[-1]]) < 1e-3:
            warnings.append(
                f"duplicate slice position {distances[i]:.2f} mm: dropped {headers[i].path.name}"
            )
        else:
            unique.append(i)
    headers = [headers[i] for i in unique]
    distances = distances[unique]

    slice_thickness = headers[0].metadata.get("SliceThickness")
    if have_positions:
        step_length = _step_and_gap_warnings(distances, slice_thickness, warnings)
    else:
        step_length = float(slice_thickness or 1.0)
    if have_positions and len(headers) > 1:
        positions = np.array([h.position for h in headers], dtype=np.float64)
        mean_step = (positions[-1] - positions[0]) / (distances[-1] - distances[0])
        step = mean_step * step_length
        tilt = tilt_degrees(orientation, step)
        if tilt > TILT_WARNING_DEG:
            warnings.append(f"gantry tilt {tilt:.1f} degrees (affine is sheared to match)")
    else:
        step = normal * step_length
    first_position = headers[0].position if have_positions else (0.0, 0.0, 0.0)
    pixel_spacing = headers[0].pixel_spacing
    if pixel_spacing is None:
        warnings.append("PixelSpacing missing: assumed 1 mm")
        pixel_spacing = (1.0, 1.0)

    hu = np.empty((len(headers), size[0], size[1]), dtype=np.float32)
    fixed_count = 0
    for index, header in enumerate(headers):
        hu[index], fixed = decode_slice(header.path)
        fixed_count += fixed
    if fixed_count:
        warnings.append(f"RSNA 12-bit intercept fix applied to {fixed_count} slice(s)")
    syntaxes = sorted({h.transfer_syntax for h in headers} - _UNCOMPRESSED - {""})
    for uid in syntaxes:
        warnings.append(f"compressed transfer syntax: {_TRANSFER_SYNTAX_NAMES.get(uid, uid)}")

    metadata = dict(headers[0].metadata)
    metadata["TransferSyntaxUID"] = sorted({h.transfer_syntax for h in headers})
    return CTVolume(
        hu=hu,
        affine=dicom_affine(first_position, orientation, pixel_spacing, step),
        source=str(series.folder if len(series.headers) > 1 else series.headers[0].path),
        series_uid=series.series_uid,
        slice_positions=distances if have_positions else np.arange(len(headers)) * step_length,
        sop_uids=[h.sop_uid for h in headers],
        instance_numbers=[h.instance_number for h in headers],
        metadata=metadata,
        warnings=warnings,
    )


def _step_and_gap_warnings(
    distances: np.ndarray, slice_thickness: float | None, warnings: list[str]
) -> float:
    """Nominal slice step (median gap) plus warnings for irregular spacing and missing slices."""
    if len(distances) < 2:
        return float(slice_thickness or 1.0)
    gaps = np.diff(distances)
    step = float(np.median(gaps))
    ratios = gaps / step
    missing_at = [i for i, r in enumerate(ratios) if r > 1.5]
    if missing_at:
        count = int(sum(round(ratios[i]) - 1 for i in missing_at))
        where = ", ".join(f"{distances[i]:.1f}..{distances[i + 1]:.1f} mm" for i in missing_at)
        warnings.append(
            f"{count} missing slice(s) at step {step:.2f} mm: gaps {where} (slices are kept as "
            "acquired, not interpolated; the affine assumes the regular step, so slice_positions "
            "hold the true positions)"
        )
    regular = [r for i, r in enumerate(ratios) if i not in missing_at]
    deviation = max((abs(r - 1.0) for r in regular), default=0.0)
    if deviation > SPACING_TOLERANCE:
        warnings.append(
            f"irregular slice spacing: gaps {gaps.min():.2f}..{gaps.max():.2f} mm "
            f"(median {step:.2f} mm)"
        )
    return step


def read_dicom(path: str | Path) -> tuple[list[CTVolume], list[tuple[str, str]]]:
    """Read every CT series under ``path``.

    Returns:
        The volumes, and (path, reason) for each file or series that could not be used.
    """
    scan = discover_series(path)
    volumes: list[CTVolume] = []
    skipped = list(scan.skipped)
    for series in scan.series:
        try:
            volumes.append(read_series(series))
        except InputError as error:
            skipped.append((error.path or str(series.folder), error.reason))
    return volumes, skipped

"""DICOM CT series: header-only discovery, geometric sorting and HU conversion.

Discovery reads headers only, so a flat folder of many thousands of one-slice files (the RSNA
layout) is grouped into series without decoding any pixels. Reading a series sorts its slices by
position along the slice normal (never by file name or InstanceNumber), applies the RSNA 12-bit
intercept fix and RescaleSlope/Intercept, and reports geometry quirks as warnings.

What happens to a bad file (the same rule in every command):

* a file that cannot be placed in a series (not DICOM, unreadable header, no
  SeriesInstanceUID, not CT, a localizer, multi-frame, no pixel matrix) is *skipped* and listed
  with its reason;
* a DICOM object that is not an image (DICOMDIR, structured report, presentation state, ...)
  is left out quietly (debug log);
* a slice that belongs to a series but cannot be used (undecodable or truncated pixels, a pixel
  matrix over the size limit, an invalid orientation/spacing/position, no usable rescale, a
  size or orientation that differs from the series, a second file at the same position) is
  *dropped* from its series: the rest of the series is read, the gap is reported like a
  missing slice and ``CTVolume.dropped`` lists the file and the reason (of several files at
  one position, the first that decodes is used);
* a series left without any usable slice is an error naming its folder;
* every assumption made to read a series is a warning plus a code in
  ``CTVolume.quality_flags``.
"""

from __future__ import annotations

import logging
import os
import warnings as py_warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import InputError, one_line
from ichseg.io.geometry import (
    dicom_affine,
    orthonormal_orientation,
    slice_normal,
    tilt_degrees,
    valid_pixel_spacing,
)
from ichseg.volume import AIR_HU, CTVolume

log = logging.getLogger(__name__)

CT_MODALITY = "CT"
# Values at or below this (after rescale) are padding or outside the reconstruction circle.
OUT_OF_FIELD_HU = -1500.0
TILT_WARNING_DEG = 0.5
# Relative deviation of a gap from the median step before the spacing counts as irregular.
SPACING_TOLERANCE = 0.1
# Stored values in this range are air when they already are HU (no rescale needed).
AIR_STORED_RANGE = (-1100.0, -900.0)

MAX_SLICE_PIXELS = 8192 * 8192
"""Largest Rows x Columns accepted per slice (env ``ICHSEG_MAX_SLICE_PIXELS`` overrides it)."""
MAX_VOLUME_BYTES = 16 * 1024**3
"""Largest HU volume (float32 bytes) a series may need (env ``ICHSEG_MAX_VOLUME_BYTES``)."""

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
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PixelPaddingValue",
    "RescaleIntercept",
    "RescaleSlope",
]

_TRANSFER_SYNTAX_NAMES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
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
# Pixel data stored as plain bytes: its size follows from the header.
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
}
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


def _env_limit(name: str, default: int) -> int:
    """A positive integer limit from the environment, else ``default``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(float(text))
    except ValueError:
        log.warning("ignoring %s=%r: not a number", name, text)
        return default
    return value if value > 0 else default


def max_slice_pixels() -> int:
    """The per-slice pixel limit in force (``ICHSEG_MAX_SLICE_PIXELS`` or the default)."""
    return _env_limit("ICHSEG_MAX_SLICE_PIXELS", MAX_SLICE_PIXELS)


def max_volume_bytes() -> int:
    """The per-series HU volume limit in force (``ICHSEG_MAX_VOLUME_BYTES`` or the default)."""
    return _env_limit("ICHSEG_MAX_VOLUME_BYTES", MAX_VOLUME_BYTES)


class NotAnImage(InputError):
    """A valid DICOM object that holds no image (DICOMDIR, report, presentation state, ...)."""


class UnusableSeries(InputError):
    """A series none of whose slices can be used; ``dropped`` says why for each file."""

    def __init__(self, path: str | Path | None, reason: str, dropped: list[tuple[str, str]]):
        super().__init__(path, reason)
        self.dropped = dropped


@dataclass
class SliceHeader:
    """What discovery keeps of one DICOM file: enough to group, sort and vet it."""

    path: Path
    series_uid: str
    sop_uid: str
    modality: str
    image_type: tuple[str, ...]
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    rows: int
    columns: int
    instance_number: int | None
    frames: int
    transfer_syntax: str
    metadata: dict[str, Any]
    sop_class_uid: str = ""
    samples_per_pixel: int | None = None
    bits_allocated: int | None = None
    file_size: int | None = None
    has_intercept: bool = True


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
    """Result of discovery.

    Attributes:
        series: the series found, each with its files' headers.
        skipped: (path, reason) of files that are not usable DICOM CT slices.
        ignored: (path, what) of DICOM objects without an image (DICOMDIR, reports, ...),
            left out without counting as skipped.
    """

    series: list[SeriesFiles] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)


def _float_tuple(value: Any) -> tuple[float, ...] | None:
    """The numbers of a (multi-valued) element; None when absent, empty or not numeric."""
    if value is None or value == "":
        return None
    values = [value] if isinstance(value, str | bytes | int | float) else value
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return numbers or None


def _as_int(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _as_float(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _quiet_pydicom():
    """Import pydicom with its own logging silenced unless debug logging is on.

    Real archives are full of small violations that pydicom logs one by one, and its pixel
    decoders log every failed plugin with a traceback; the reader turns what matters into
    one-line reasons itself. ``--verbose`` keeps pydicom's messages.
    """
    import pydicom

    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    return pydicom


def read_header(path: str | Path) -> SliceHeader:
    """Read one file's header (no pixels).

    Raises:
        NotAnImage: a DICOM object without an image (DICOMDIR, report, presentation state).
        InputError: the file is not DICOM or lacks the tags needed to place it in a series.
    """
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        return _read_header(Path(path))


def _looks_like_raw_dataset(path: Path) -> bool:
    """A file without the DICM preamble that starts with a group-0008 tag (old raw dumps)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == b"\x08\x00"
    except OSError:
        return False


def _dcmread_header(path: Path):
    pydicom = _quiet_pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        if not _looks_like_raw_dataset(path):
            raise InputError(path, "not a DICOM file (no DICM preamble)") from None
    except OSError as error:
        raise InputError(path, f"cannot read file ({error.strerror or error})") from None
    except Exception as error:  # pydicom raises many types on truncated files
        raise InputError(path, f"unreadable DICOM header ({one_line(error)})") from None
    try:
        return pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True
        )
    except Exception as error:
        raise InputError(path, f"unreadable DICOM header ({one_line(error)})") from None


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "unknown SOP class")


def _read_header(path: Path) -> SliceHeader:
    try:
        file_size = path.stat().st_size
    except OSError as error:
        raise InputError(path, f"cannot read file ({error.strerror})") from None
    if file_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    ds = _dcmread_header(path)
    file_meta = getattr(ds, "file_meta", None)
    media_class = str(file_meta.get("MediaStorageSOPClassUID", "") or "") if file_meta else ""
    sop_class = str(ds.get("SOPClassUID", "") or "") or media_class
    if _DICOMDIR_SOP_CLASS in (media_class, sop_class):
        raise NotAnImage(path, "DICOMDIR (index of a media set)")
    rows, columns = _as_int(ds.get("Rows")) or 0, _as_int(ds.get("Columns")) or 0
    modality = str(ds.get("Modality", "") or "")
    if not (rows or columns) and modality.upper() != CT_MODALITY:
        if sop_class not in _CT_SOP_CLASSES:
            raise NotAnImage(path, f"{_sop_class_name(sop_class)} without an image")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not series_uid and len(ds) == 0:
        raise InputError(path, "DICOM file without any data element (truncated header?)")
    if not series_uid:
        raise InputError(path, "DICOM file without SeriesInstanceUID")
    transfer_syntax = str(file_meta.get("TransferSyntaxUID", "") or "") if file_meta else ""
    metadata = {
        "PatientID": str(ds.get("PatientID", "") or "").strip(),
        "StudyInstanceUID": str(ds.get("StudyInstanceUID", "") or ""),
        "SeriesInstanceUID": series_uid,
        "PatientAge": str(ds.get("PatientAge", "") or ""),
        "PatientSex": str(ds.get("PatientSex", "") or ""),
        "KVP": _as_float(ds.get("KVP")),
        "Manufacturer": str(ds.get("Manufacturer", "") or ""),
        "ConvolutionKernel": str(ds.get("ConvolutionKernel", "") or ""),
        "SliceThickness": _as_float(ds.get("SliceThickness")),
    }
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = (image_type,)
    return SliceHeader(
        path=path,
        series_uid=series_uid,
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        modality=modality,
        image_type=tuple(str(v).upper() for v in image_type),
        position=_float_tuple(ds.get("ImagePositionPatient")),
        orientation=_float_tuple(ds.get("ImageOrientationPatient")),
        pixel_spacing=_float_tuple(ds.get("PixelSpacing")),
        rows=rows,
        columns=columns,
        instance_number=_as_int(ds.get("InstanceNumber")),
        frames=_as_int(ds.get("NumberOfFrames")) or 1,
        transfer_syntax=transfer_syntax,
        metadata=metadata,
        sop_class_uid=sop_class,
        samples_per_pixel=_as_int(ds.get("SamplesPerPixel")),
        bits_allocated=_as_int(ds.get("BitsAllocated")),
        file_size=file_size,
        has_intercept=ds.get("RescaleIntercept") not in (None, ""),
    )


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def scan_files(paths: Iterable[Path]) -> DicomScan:
    """Read the header of each file and group the CT slices by SeriesInstanceUID.

    NIfTI files are neither read nor reported here.
    """
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    scan = DicomScan()
    for path in paths:
        if is_nifti(path):
            continue
        try:
            header = read_header(path)
        except NotAnImage as other:
            log.debug("leaving out %s: %s", path, other.reason)
            scan.ignored.append((str(path), other.reason))
            continue
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


def discover_series(root: str | Path) -> DicomScan:
    """Group every DICOM file under ``root`` (a folder tree or one file) by SeriesInstanceUID.

    Files that are not DICOM, not CT, or localizers are listed in ``skipped`` with the reason;
    non-image DICOM objects (DICOMDIR, reports) in ``ignored``. Directory symlinks are followed
    once; broken links are skipped with a reason. NIfTI files are neither read nor reported.

    Raises:
        InputError: ``root`` does not exist or cannot be listed.
    """
    from ichseg.io.walk import list_files

    listing = list_files(root)
    scan = scan_files(listing.files)
    scan.skipped = listing.skipped + scan.skipped
    return scan


def _unusable_reason(header: SliceHeader) -> str | None:
    if header.modality and header.modality.upper() != CT_MODALITY:
        return f"modality {header.modality} is not CT"
    if not header.modality and header.sop_class_uid not in _CT_SOP_CLASSES:
        return f"no Modality, and {_sop_class_name(header.sop_class_uid)} is not a CT image"
    if header.sop_class_uid.startswith(_SECONDARY_CAPTURE_PREFIX):
        return "secondary capture (screenshot or report page), not a CT slice"
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


@dataclass
class DecodedSlice:
    """One slice in HU and how its rescale was obtained."""

    hu: np.ndarray
    fixed_12bit: bool
    slope_assumed: bool
    intercept_missing: bool
    signed: bool
    stored_range: tuple[float, float]
    has_air: bool


def _pixel_problem(header: SliceHeader) -> str | None:
    """Why a slice's pixels cannot be decoded safely, from its header alone (before allocating)."""
    if header.samples_per_pixel not in (None, 1):
        return f"SamplesPerPixel {header.samples_per_pixel} (colour image), not a CT slice"
    pixels = header.rows * header.columns * header.frames
    limit = max_slice_pixels()
    if pixels > limit:
        return (
            f"header claims {header.rows}x{header.columns} pixels, above the limit of {limit} "
            "(set ICHSEG_MAX_SLICE_PIXELS to allow more)"
        )
    if header.file_size is not None and header.transfer_syntax in _UNCOMPRESSED | {""}:
        bits = header.bits_allocated or 8
        needed = (pixels * (header.samples_per_pixel or 1) * bits + 7) // 8
        if needed > header.file_size:
            return (
                f"header claims {header.rows}x{header.columns} pixels of {bits} bits "
                f"({needed} bytes) but the file holds {header.file_size} bytes (truncated?)"
            )
    return None


def _rescale_value(ds, keyword: str) -> tuple[float | None, str | None]:
    """(value, None), (None, None) when absent, or (None, reason) when present but unusable."""
    element = ds.get(keyword)
    if element is None or element == "":
        return None, None
    value = _as_float(element)
    if value is None or not np.isfinite(value):
        return None, f"{keyword} {element!r} is not a finite number: HU cannot be computed"
    return value, None


def decode_slice(path: Path) -> DecodedSlice:
    """Decode one DICOM file to HU (float32, (rows, columns)).

    A missing RescaleSlope is taken as 1 (``slope_assumed``); a missing RescaleIntercept as 0
    (``intercept_missing``), which the series reader only accepts when the stored values
    already look like HU.

    Raises:
        InputError: the pixels cannot be decoded, or the rescale is present but unusable
            (RescaleSlope 0 or not a finite number).
    """
    pydicom = _quiet_pydicom()
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=_looks_like_raw_dataset(path))
        except Exception as error:
            raise InputError(path, f"cannot read file ({one_line(error)})") from None
        if "PixelData" not in ds:
            raise InputError(path, "no PixelData element (truncated file or no image)")
        _fill_transfer_syntax(ds)
        try:
            stored = ds.pixel_array
        except Exception as error:  # each decoder plugin raises its own types
            syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
            name = _TRANSFER_SYNTAX_NAMES.get(syntax, syntax)
            raise InputError(
                path, f"cannot decode pixel data ({name}): {one_line(error)}"
            ) from None
    if stored.ndim != 2:
        raise InputError(path, f"expected one 2D frame, got pixel array shape {stored.shape}")
    slope, problem = _rescale_value(ds, "RescaleSlope")
    if problem is None and slope == 0:
        problem = "RescaleSlope is 0: HU cannot be computed"
    intercept, intercept_problem = _rescale_value(ds, "RescaleIntercept")
    if problem or intercept_problem:
        raise InputError(path, problem or intercept_problem)
    padding = _as_float(ds.get("PixelPaddingValue"))
    pixel_representation = _as_int(ds.get("PixelRepresentation"))
    hu, fixed = hu_from_stored(
        stored,
        slope=1.0 if slope is None else slope,
        intercept=0.0 if intercept is None else intercept,
        bits_stored=_as_int(ds.get("BitsStored")),
        pixel_representation=pixel_representation,
        padding_value=padding,
    )
    low, high = float(stored.min()), float(stored.max())
    air = (stored >= AIR_STORED_RANGE[0]) & (stored <= AIR_STORED_RANGE[1])
    return DecodedSlice(
        hu=hu,
        fixed_12bit=fixed,
        slope_assumed=slope is None,
        intercept_missing=intercept is None,
        signed=pixel_representation == 1 or np.issubdtype(stored.dtype, np.signedinteger),
        stored_range=(low, high),
        has_air=bool(air.any()),
    )


def _fill_transfer_syntax(ds) -> None:
    """Give a dataset read without file meta (old raw dumps) the syntax it was read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _majority(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


@dataclass
class _SeriesNotes:
    """Warnings, quality flags and dropped slices gathered while reading one series."""

    warnings: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)

    def assume(self, flag: str, message: str) -> None:
        if flag not in self.flags:
            self.flags.append(flag)
        self.warnings.append(message)

    def drop(self, header: SliceHeader, reason: str) -> None:
        self.dropped.append((str(header.path), reason))


def read_series(series: SeriesFiles) -> CTVolume:
    """Decode one series into a CT volume sorted along the slice normal.

    Slices that cannot be used are dropped (see the module docstring) and listed in the
    volume's ``dropped``; gantry tilt, irregular spacing and missing slices are reported as
    warnings; every assumption adds a code to ``quality_flags``.

    Raises:
        UnusableSeries: no slice of the series can be used (the error names the folder and
            carries every dropped file with its reason).
        InputError: the series would need more memory than ``max_volume_bytes()``.
    """
    notes = _SeriesNotes()
    headers = _usable_headers(series, notes)
    orientation, headers = _series_value(headers, notes, _ORIENTATION)
    pixel_spacing, headers = _series_value(headers, notes, _PIXEL_SPACING)
    slices, distances, have_positions = _sorted_unique(headers, orientation, notes)
    if slices:
        rows, columns = slices[0].header.rows, slices[0].header.columns
        needed = len(slices) * rows * columns * 4
        if needed > max_volume_bytes():
            raise InputError(
                series.folder,
                f"series {series.series_uid}: {len(slices)} slices of {rows}x{columns} need "
                f"{needed / 1024**3:.1f} GiB, above the limit of "
                f"{max_volume_bytes() / 1024**3:.1f} GiB (set ICHSEG_MAX_VOLUME_BYTES)",
            )
    hu, headers, distances, fixed_count = _decode_series(slices, distances, series.folder, notes)
    if not headers:
        raise _unusable(series, notes.dropped)

    if len(notes.dropped):
        shown = "; ".join(
            f"{_relative(Path(p), series.folder)} ({r})" for p, r in notes.dropped[:3]
        )
        more = f"; and {len(notes.dropped) - 3} more" if len(notes.dropped) > 3 else ""
        notes.assume("slices_dropped", f"dropped {len(notes.dropped)} slice(s): {shown}{more}")

    normal = slice_normal(orientation)
    slice_thickness = headers[0].metadata.get("SliceThickness")
    if have_positions and len(headers) > 1:
        step_length = _step_and_gap_warnings(distances, notes)
        positions = np.array([h.position for h in headers], dtype=np.float64)
        mean_step = (positions[-1] - positions[0]) / (distances[-1] - distances[0])
        step = mean_step * step_length
        tilt = tilt_degrees(orientation, step)
        if tilt > TILT_WARNING_DEG:
            notes.warnings.append(f"gantry tilt {tilt:.1f} degrees (affine is sheared to match)")
    else:
        step_length = float(slice_thickness) if slice_thickness and slice_thickness > 0 else 1.0
        source = "SliceThickness" if slice_thickness and slice_thickness > 0 else "default"
        why = "one slice" if len(headers) == 1 else "no slice positions"
        notes.assume(
            "slice_spacing_assumed",
            f"slice step not measurable ({why}): {step_length:g} mm assumed ({source})",
        )
        step = normal * step_length
    if not have_positions:
        distances = np.arange(len(headers)) * step_length
    first_position = headers[0].position if have_positions else (0.0, 0.0, 0.0)

    if fixed_count:
        notes.assume(
            "rescale_12bit_fix", f"RSNA 12-bit intercept fix applied to {fixed_count} slice(s)"
        )
    syntaxes = sorted({h.transfer_syntax for h in headers} - _UNCOMPRESSED - {""})
    for uid in syntaxes:
        notes.warnings.append(f"compressed transfer syntax: {_TRANSFER_SYNTAX_NAMES.get(uid, uid)}")

    metadata = dict(headers[0].metadata)
    metadata["TransferSyntaxUID"] = sorted({h.transfer_syntax for h in headers})
    _patient_id_fallback(metadata, series.series_uid, notes)
    return CTVolume(
        hu=hu,
        affine=dicom_affine(first_position, orientation, pixel_spacing, step),
        source=str(series.folder if len(series.headers) > 1 else series.headers[0].path),
        series_uid=series.series_uid,
        slice_positions=distances,
        sop_uids=[h.sop_uid for h in headers],
        instance_numbers=[h.instance_number for h in headers],
        metadata=metadata,
        warnings=notes.warnings,
        quality_flags=notes.flags,
        dropped=notes.dropped,
        slice_paths=[str(h.path) for h in headers],
    )


def _unusable(series: SeriesFiles, dropped: list[tuple[str, str]]) -> UnusableSeries:
    if not dropped:
        return UnusableSeries(series.folder, f"series {series.series_uid} has no files", [])
    # The example is a slice's own defect where there is one, not "duplicate of a bad slice".
    first_path, first_reason = next(
        ((p, r) for p, r in dropped if not r.startswith("duplicate slice position")), dropped[0]
    )
    return UnusableSeries(
        series.folder,
        f"series {series.series_uid}: none of its {len(dropped)} slice(s) can be used "
        f"(e.g. {Path(first_path).name}: {first_reason})",
        dropped,
    )


def _usable_headers(series: SeriesFiles, notes: _SeriesNotes) -> list[SliceHeader]:
    """Headers whose pixels can be decoded safely and whose size is the series majority."""
    headers = []
    for header in series.headers:
        problem = _pixel_problem(header)
        if problem:
            notes.drop(header, problem)
        else:
            headers.append(header)
    if not headers:
        return headers
    size = _majority([(h.rows, h.columns) for h in headers])
    kept = []
    for header in headers:
        if (header.rows, header.columns) != size:
            notes.drop(
                header,
                f"size {header.rows}x{header.columns} differs from series {size[0]}x{size[1]}",
            )
        else:
            kept.append(header)
    return kept


@dataclass(frozen=True)
class _SliceAttribute:
    """A per-slice header value that must be valid and the same across a series."""

    name: str
    read: Callable[[SliceHeader], tuple[float, ...] | None]
    validate: Callable[[tuple[float, ...]], Any]  # raises ValueError with the reason
    default: Any
    default_text: str
    flag: str


_ORIENTATION = _SliceAttribute(
    "ImageOrientationPatient",
    lambda h: h.orientation,
    orthonormal_orientation,
    np.array([1.0, 0, 0, 0, 1.0, 0]),
    "axial",
    "orientation_assumed",
)
_PIXEL_SPACING = _SliceAttribute(
    "PixelSpacing",
    lambda h: h.pixel_spacing,
    lambda values: np.array(valid_pixel_spacing(values)),
    np.array([1.0, 1.0]),
    "1 mm",
    "pixel_spacing_assumed",
)


def _series_value(
    headers: list[SliceHeader], notes: _SeriesNotes, attribute: _SliceAttribute
) -> tuple[np.ndarray, list[SliceHeader]]:
    """The series' value of ``attribute`` (majority of the valid ones) and the slices kept.

    A slice with an invalid value, or one that differs from the majority, is dropped; a slice
    without the value gets the series' value, and a series without any gets the default, both
    flagged.
    """
    values: list[np.ndarray | None] = []
    kept = []
    for header in headers:
        raw = attribute.read(header)
        try:
            value = None if raw is None else np.asarray(attribute.validate(raw), np.float64)
        except ValueError as error:
            notes.drop(header, str(error))
            continue
        kept.append(header)
        values.append(value)
    present = [v for v in values if v is not None]
    if not present:
        if kept:
            notes.assume(
                attribute.flag, f"{attribute.name} missing: assumed {attribute.default_text}"
            )
        return attribute.default, kept
    key = _majority([tuple(np.round(v, 4)) for v in present])
    series_value = next(v for v in present if tuple(np.round(v, 4)) == key)
    final, assumed = [], 0
    for header, value in zip(kept, values, strict=True):
        if value is None:
            assumed += 1
        elif np.abs(value - series_value).max() > 1e-3 * max(1.0, np.abs(series_value).max()):
            notes.drop(
                header,
                f"{attribute.name} {_backslashed(value)} differs from the series "
                f"{_backslashed(series_value)}",
            )
            continue
        final.append(header)
    if assumed:
        notes.assume(
            attribute.flag,
            f"{assumed} slice(s) without {attribute.name}: the series value assumed",
        )
    return series_value, final


def _backslashed(values: np.ndarray) -> str:
    return "\\".join(f"{v:.4g}" for v in values)


def _sorted_unique(
    headers: list[SliceHeader], orientation: np.ndarray, notes: _SeriesNotes
) -> tuple[list[_Slice], np.ndarray, bool]:
    """Slice positions sorted along the normal, files at the same position grouped; whether
    positions were available."""
    kept = []
    for header in headers:
        position = header.position
        if position is not None and (len(position) != 3 or not np.isfinite(position).all()):
            values = "\\".join(f"{v:g}" for v in position)
            notes.drop(header, f"ImagePositionPatient {values} is not three finite numbers")
            continue
        kept.append(header)
    headers = kept
    have_positions = any(h.position is not None for h in headers)
    if have_positions:
        kept = []
        for header in headers:
            if header.position is None:
                notes.drop(header, "no ImagePositionPatient: the slice cannot be placed")
            else:
                kept.append(header)
        headers = kept
        normal = slice_normal(orientation)
        distances = np.array([float(np.dot(h.position, normal)) for h in headers])
    else:
        if headers:
            notes.assume(
                "position_assumed",
                "ImagePositionPatient missing: slices ordered by InstanceNumber, origin at 0",
            )
        distances = np.array(
            [
                float(h.instance_number if h.instance_number is not None else i)
                for i, h in enumerate(headers)
            ]
        )
    order = np.argsort(distances, kind="stable")
    headers = [headers[i] for i in order]
    distances = distances[order]

    # Files at one position: the first is read, the others are kept as copies to fall back on.
    unique: list[int] = []
    copies: list[list[SliceHeader]] = []
    for i, header in enumerate(headers):
        if unique and abs(distances[i] - distances[unique[-1]]) < 1e-3:
            copies[-1].append(header)
        else:
            unique.append(i)
            copies.append([])
    slices = [_Slice(headers[i], copies[k]) for k, i in enumerate(unique)]
    return slices, distances[unique], have_positions


@dataclass
class _Slice:
    """The file read for one slice position and other files found at the same position."""

    header: SliceHeader
    copies: list[SliceHeader]


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _decode_series(
    slices: list[_Slice], distances: np.ndarray, folder: Path, notes: _SeriesNotes
) -> tuple[np.ndarray, list[SliceHeader], np.ndarray, int]:
    """Decode every slice into one array, dropping those that fail; apply the rescale rule.

    Where several files share a position, the first that decodes is used and the others are
    dropped as duplicates.

    Returns:
        The HU array, the headers and distances of the slices kept, and how many of them
        needed the RSNA 12-bit fix.
    """
    if not slices:
        return np.empty((0, 0, 0), np.float32), [], distances, 0
    first = slices[0].header
    hu = np.empty((len(slices), first.rows, first.columns), dtype=np.float32)
    kept: list[SliceHeader] = []
    kept_distances: list[float] = []
    decoded: list[DecodedSlice] = []
    for position, distance in zip(slices, distances, strict=True):
        # A copy that states its rescale goes before one that would need the rescale rule.
        candidates = sorted([position.header, *position.copies], key=lambda h: not h.has_intercept)
        for index, header in enumerate(candidates):
            try:
                result = decode_slice(header.path)
            except InputError as error:
                notes.drop(header, error.reason)
                continue
            if result.hu.shape != hu.shape[1:]:
                notes.drop(
                    header,
                    f"decoded pixel array {result.hu.shape} differs from the header's "
                    f"{header.rows}x{header.columns}",
                )
                continue
            for other in candidates[index + 1 :]:
                notes.drop(
                    other,
                    f"duplicate slice position {distance:.2f} mm "
                    f"(same as {_relative(header.path, folder)})",
                )
            hu[len(kept)] = result.hu
            result.hu = None  # type: ignore[assignment]  # the copy in ``hu`` is the one kept
            kept.append(header)
            kept_distances.append(float(distance))
            decoded.append(result)
            break
    keep = _rescale_rule(kept, decoded, notes)
    # Compact in place so that no second volume-sized array is allocated.
    count = 0
    for index, use in enumerate(keep):
        if use:
            if index != count:
                hu[count] = hu[index]
            count += 1
    final = [h for h, use in zip(kept, keep, strict=True) if use]
    final_distances = np.array(
        [d for d, use in zip(kept_distances, keep, strict=True) if use], dtype=np.float64
    )
    fixed = sum(r.fixed_12bit for r, use in zip(decoded, keep, strict=True) if use)
    return hu[:count], final, final_distances, fixed


def _rescale_rule(
    headers: list[SliceHeader], decoded: list[DecodedSlice], notes: _SeriesNotes
) -> list[bool]:
    """Which decoded slices keep their HU, applying the rule for a missing rescale.

    A missing RescaleSlope alone is taken as 1. Slices without RescaleIntercept are kept only
    when their stored values already look like HU: signed pixels that reach air (about
    -1000). Otherwise they are dropped: guessing an intercept would give wrong HU silently.
    """
    keep = [True] * len(decoded)
    slope_assumed = sum(d.slope_assumed and not d.intercept_missing for d in decoded)
    if slope_assumed:
        notes.assume(
            "rescale_assumed",
            f"RescaleSlope missing on {slope_assumed} slice(s): slope 1 assumed",
        )
    missing = [i for i, d in enumerate(decoded) if d.intercept_missing]
    if not missing:
        return keep
    low = min(decoded[i].stored_range[0] for i in missing)
    high = max(decoded[i].stored_range[1] for i in missing)
    signed = all(decoded[i].signed for i in missing)
    has_air = any(decoded[i].has_air for i in missing)
    if signed and has_air:
        message = (
            f"RescaleIntercept missing on {len(missing)} slice(s): stored values "
            f"({low:.0f}..{high:.0f}, signed, reaching air) taken as HU (intercept 0, slope 1)"
        )
        log.warning("%s: %s", headers[missing[0]].path.parent, message)
        notes.assume("rescale_assumed", message)
        return keep
    kind = "signed" if signed else "unsigned"
    reason = (
        f"RescaleIntercept missing and stored values ({kind}, {low:.0f}..{high:.0f}) do not "
        "look like HU (no air near -1000): refusing to guess the rescale"
    )
    for i in missing:
        keep[i] = False
        notes.drop(headers[i], reason)
    return keep


def _patient_id_fallback(metadata: dict[str, Any], series_uid: str, notes: _SeriesNotes) -> None:
    if metadata.get("PatientID"):
        return
    if metadata.get("StudyInstanceUID"):
        source, value = "StudyInstanceUID", metadata["StudyInstanceUID"]
    else:
        source, value = "SeriesInstanceUID", series_uid
    notes.assume(
        "patient_id_fallback",
        f"PatientID missing: {source} {value} used as patient id (a patient-level split "
        "cannot keep this patient's other studies on the same side)",
    )


def nominal_step(gaps: np.ndarray) -> float:
    """The slice step most gaps agree with (within ``SPACING_TOLERANCE``), the smaller on a tie.

    Unlike the median, this survives short series with a gap: gaps (10, 5) give 5, so the
    10 mm gap counts as one missing slice instead of making the step 7.5 mm.
    """
    gaps = np.asarray(gaps, dtype=np.float64)
    agree = np.abs(gaps[None, :] / gaps[:, None] - 1.0) <= SPACING_TOLERANCE
    counts = agree.sum(axis=1)
    best = np.flatnonzero(counts == counts.max())
    chosen = best[np.argmin(gaps[best])]
    return float(gaps[agree[chosen]].mean())


def _step_and_gap_warnings(distances: np.ndarray, notes: _SeriesNotes) -> float:
    """Nominal slice step plus warnings for irregular spacing and missing slices."""
    gaps = np.diff(distances)
    step = nominal_step(gaps)
    ratios = gaps / step
    missing_at = [i for i, r in enumerate(ratios) if r > 1.5]
    if missing_at:
        count = int(sum(round(ratios[i]) - 1 for i in missing_at))
        where = ", ".join(f"{distances[i]:.1f}..{distances[i + 1]:.1f} mm" for i in missing_at)
        notes.assume(
            "slice_gap",
            f"{count} missing slice(s) at step {step:.2f} mm: gaps {where} (slices are kept as "
            "acquired, not interpolated; the affine assumes the regular step, so slice_positions "
            "hold the true positions)",
        )
    regular = [r for i, r in enumerate(ratios) if i not in missing_at]
    deviation = max((abs(r - 1.0) for r in regular), default=0.0)
    if deviation > SPACING_TOLERANCE:
        notes.assume(
            "irregular_spacing",
            f"irregular slice spacing: gaps {gaps.min():.2f}..{gaps.max():.2f} mm "
            f"(nominal step {step:.2f} mm)",
        )
    return step


def read_dicom(path: str | Path) -> tuple[list[CTVolume], list[tuple[str, str]]]:
    """Read every CT series under ``path``.

    Returns:
        The volumes, and (path, reason) for each file or series that could not be used
        (slices dropped from a volume are in that volume's ``dropped``).
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

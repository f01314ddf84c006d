"""DICOM CT series: discovery, geometric sorting and HU conversion, in one pass or two.

Reading a series sorts its slices by position along the slice normal (never by file name or
InstanceNumber), applies the RSNA 12-bit intercept fix and RescaleSlope/Intercept, and reports
geometry quirks as warnings. Two ways to get there give the same volumes:

* two passes (``discover_series``/``index_input`` then ``read_series``): headers only first,
  so a tree is grouped into series without holding any pixels, then each series decoded when it
  is read. Each file is parsed twice; the commands that read whole volumes (``predict``,
  ``segment``, ``inspect``) work this way, with both passes spread over worker processes for
  large inputs (``ichseg.io.loader``, ``ichseg.io.workers``);
* one pass (``parse_file``): each file parsed once, its header for grouping and sorting and its
  pixels decoded from the same read. A series is complete only once every file that may belong
  to it has been parsed (in the RSNA layout, one flat folder of ~750,000 one-slice files, that
  is the whole folder), so the pixels cannot wait for their series: the slice cache
  (``ichseg.engine.cache``) windows each slice as it is parsed and keeps only the header fields
  (``ichseg.io.dicom_table``), and ``series_layout`` then applies exactly the rules of
  ``read_series`` to those fields, one series at a time, without pixels.

Per file, one pass costs one ``dcmread`` and the pixel decoding plus converting ~30 header
elements; element values are converted straight from the raw elements with pydicom's own
rules (``convert_raw_data_element``) and uncompressed pixels go to pydicom's decoder with their
options, which avoids ``Dataset.__getitem__``'s bookkeeping and the second conversion of the
pixel module; ``benchmarks/README.md`` has the figures.

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
from dataclasses import dataclass, field, replace
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
    # Scan attributes kept for subgroup analysis and the metadata-only baseline.
    "ManufacturerModelName",
    "InstitutionName",
    "XRayTubeCurrent",
    "Exposure",
    "PatientPosition",
    "WindowCenter",
    "WindowWidth",
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
    """The files of one series as found by discovery.

    Attributes:
        series_uid: SeriesInstanceUID.
        headers: one per file.
        decoded: slices already decoded (by a single-pass or parallel reader), by path
            string: a :class:`DecodedSlice`, or the reason its pixels cannot be used.
            :func:`read_series` decodes the files missing here itself.
    """

    series_uid: str
    headers: list[SliceHeader]
    decoded: dict[str, DecodedSlice | str] | None = field(default=None, repr=False)

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


def _text(value: Any) -> str:
    """A (multi-valued) element as text; values joined with a backslash as DICOM stores them."""
    if value is None:
        return ""
    if isinstance(value, str | int | float):
        return str(value).strip()
    return "\\".join(str(v).strip() for v in value)


def _first_float(value: Any) -> float | None:
    """The first number of a (multi-valued) element, e.g. the first of several window centres."""
    numbers = _float_tuple(value)
    return numbers[0] if numbers else None


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
    file_size = _file_size(path)
    return _header_from_dataset(path, _dcmread_header(path), file_size)


def _file_size(path: Path) -> int:
    """The file's size; raises for a file that cannot be read or holds nothing."""
    try:
        file_size = path.stat().st_size
    except OSError as error:
        raise InputError(path, f"cannot read file ({error.strerror})") from None
    if file_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    return file_size


class _Values:
    """Element values of one dataset, each converted once with pydicom's own rules.

    ``Dataset.get(keyword)`` converts an element through ``Dataset.__getitem__``, which also
    recomputes the character set and stores the converted element back: about half the cost of
    reading a header. This converts the raw element directly (``convert_raw_data_element``, the
    same hooks: VR lookup for implicit VR, UN replaced by the dictionary VR, character sets).
    Elements with an ambiguous VR (``US or SS``, ``OB or OW``), whose VR depends on other
    elements, still go through the dataset.
    """

    def __init__(self, ds) -> None:
        from pydicom.charset import default_encoding

        self.ds = ds
        self.encoding = ds.original_character_set or default_encoding
        encoding = self.encoding
        self.encoding_key = tuple(encoding) if isinstance(encoding, list) else encoding
        self.converted: dict[int, Any] = {}
        meta = getattr(ds, "file_meta", None)
        self.transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta else ""

    def get(self, keyword: str, default: Any = None) -> Any:
        from pydicom.dataelem import RawDataElement, convert_raw_data_element
        from pydicom.valuerep import AMBIGUOUS_VR

        tag = _tag_number(keyword)
        if tag in self.converted:
            return self.converted[tag]
        raw = self.ds.get_item(tag)
        if raw is None:
            return default
        if not isinstance(raw, RawDataElement):
            value = raw.value
        else:
            # Most elements repeat across the files of a series (sizes, orientation, spacing,
            # the study and patient fields): their conversions are remembered by raw bytes.
            key = None
            if keyword not in _PER_FILE and raw.value is not None and len(raw.value) <= 256:
                key = (tag, raw.VR, raw.value, raw.is_little_endian, self.encoding_key)
                if key in _CONVERTED:
                    self.converted[tag] = _CONVERTED[key]
                    return _CONVERTED[key]
            element = convert_raw_data_element(raw, encoding=self.encoding, ds=self.ds)
            if element.VR in AMBIGUOUS_VR:
                value, key = self.ds[tag].value, None
            else:
                value = element.value
            if key is not None:
                if len(_CONVERTED) >= _CONVERTED_LIMIT:
                    _CONVERTED.clear()
                _CONVERTED[key] = value
        self.converted[tag] = value
        return value


# Elements whose value differs from file to file: not worth remembering.
_PER_FILE = frozenset({"SOPInstanceUID", "ImagePositionPatient", "InstanceNumber"})
# Converted values by (tag, VR, raw bytes, byte order, character set); values are only read.
_CONVERTED: dict[tuple, Any] = {}
_CONVERTED_LIMIT = 4096


_TAG_NUMBERS: dict[str, int] = {}


def _tag_number(keyword: str) -> int:
    number = _TAG_NUMBERS.get(keyword)
    if number is None:
        from pydicom.datadict import tag_for_keyword

        number = tag_for_keyword(keyword)
        if number is None:
            raise KeyError(keyword)
        _TAG_NUMBERS[keyword] = number = int(number)
    return number


# What a header-only read holds at most: the header tags and the character set.
_HEADER_TAG_NUMBERS: frozenset[int] = frozenset()


def _header_tag_numbers() -> frozenset[int]:
    global _HEADER_TAG_NUMBERS
    if not _HEADER_TAG_NUMBERS:
        from pydicom.datadict import tag_for_keyword

        numbers = {int(tag_for_keyword(k)) for k in _HEADER_TAGS}  # type: ignore[arg-type]
        _HEADER_TAG_NUMBERS = frozenset(numbers | {0x00080005})
    return _HEADER_TAG_NUMBERS


def _header_from_dataset(
    path: Path, ds, file_size: int, values: _Values | None = None
) -> SliceHeader:
    """The :class:`SliceHeader` of a dataset read header-only or in full (the same values)."""
    values = values or _Values(ds)
    file_meta = getattr(ds, "file_meta", None)
    media_class = str(file_meta.get("MediaStorageSOPClassUID", "") or "") if file_meta else ""
    sop_class = str(values.get("SOPClassUID", "") or "") or media_class
    if _DICOMDIR_SOP_CLASS in (media_class, sop_class):
        raise NotAnImage(path, "DICOMDIR (index of a media set)")
    rows, columns = _as_int(values.get("Rows")) or 0, _as_int(values.get("Columns")) or 0
    modality = str(values.get("Modality", "") or "")
    if not (rows or columns) and modality.upper() != CT_MODALITY:
        if sop_class not in _CT_SOP_CLASSES:
            raise NotAnImage(path, f"{_sop_class_name(sop_class)} without an image")
    series_uid = str(values.get("SeriesInstanceUID", "") or "")
    if not series_uid and not any(int(tag) in _header_tag_numbers() for tag in ds.keys()):
        raise InputError(path, "DICOM file without any data element (truncated header?)")
    if not series_uid:
        raise InputError(path, "DICOM file without SeriesInstanceUID")
    transfer_syntax = values.transfer_syntax
    metadata = {
        "PatientID": str(values.get("PatientID", "") or "").strip(),
        "StudyInstanceUID": str(values.get("StudyInstanceUID", "") or ""),
        "SeriesInstanceUID": series_uid,
        "PatientAge": str(values.get("PatientAge", "") or ""),
        "PatientSex": str(values.get("PatientSex", "") or ""),
        "KVP": _as_float(values.get("KVP")),
        "Manufacturer": str(values.get("Manufacturer", "") or ""),
        "ConvolutionKernel": _text(values.get("ConvolutionKernel")),
        "SliceThickness": _as_float(values.get("SliceThickness")),
        "ManufacturerModelName": _text(values.get("ManufacturerModelName")),
        "InstitutionName": _text(values.get("InstitutionName")),
        "XRayTubeCurrent": _as_float(values.get("XRayTubeCurrent")),
        "Exposure": _as_float(values.get("Exposure")),
        "PatientPosition": _text(values.get("PatientPosition")),
        "WindowCenter": _first_float(values.get("WindowCenter")),
        "WindowWidth": _first_float(values.get("WindowWidth")),
    }
    image_type = values.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = (image_type,)
    return SliceHeader(
        path=path,
        series_uid=series_uid,
        sop_uid=str(values.get("SOPInstanceUID", "") or ""),
        modality=modality,
        image_type=tuple(str(v).upper() for v in image_type),
        position=_float_tuple(values.get("ImagePositionPatient")),
        orientation=_float_tuple(values.get("ImageOrientationPatient")),
        pixel_spacing=_float_tuple(values.get("PixelSpacing")),
        rows=rows,
        columns=columns,
        instance_number=_as_int(values.get("InstanceNumber")),
        frames=_as_int(values.get("NumberOfFrames")) or 1,
        transfer_syntax=transfer_syntax,
        metadata=metadata,
        sop_class_uid=sop_class,
        samples_per_pixel=_as_int(values.get("SamplesPerPixel")),
        bits_allocated=_as_int(values.get("BitsAllocated")),
        file_size=file_size,
        has_intercept=values.get("RescaleIntercept") not in (None, ""),
    )


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


SCAN_CHUNK = 64
"""Files per task when headers are read in worker processes."""
PROGRESS_MIN_FILES = 2000
"""Inputs of at least this many files show discovery progress unless told otherwise."""


def scan_files(
    paths: Iterable[Path], workers: int | None = None, progress: bool | None = None
) -> DicomScan:
    """Read the header of each file and group the CT slices by SeriesInstanceUID.

    NIfTI files are neither read nor reported here.

    Args:
        paths: the candidate files.
        workers: processes reading headers (default: ``ICHSEG_WORKERS`` or the CPUs
            available); inputs under ``MIN_PARALLEL_FILES`` files are read in this process.
        progress: a progress bar (default: for inputs of ``PROGRESS_MIN_FILES`` files or more).
    """
    from ichseg.io.workers import MIN_PARALLEL_FILES, chunked, ordered_map, resolve_workers
    from ichseg.progress import progress as progress_bar

    candidates = [Path(p) for p in paths if not is_nifti(Path(p))]
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    scan = DicomScan()
    show = len(candidates) >= PROGRESS_MIN_FILES if progress is None else progress
    bar = progress_bar(total=len(candidates), desc="headers", unit="file", enabled=show)

    def add(parsed: ParsedFile) -> None:
        if parsed.ignored is not None:
            log.debug("leaving out %s: %s", parsed.path, parsed.ignored)
            scan.ignored.append((str(parsed.path), parsed.ignored))
        elif parsed.skipped is not None:
            scan.skipped.append((str(parsed.path), parsed.skipped))
        elif parsed.header is not None:
            groups[parsed.header.series_uid].append(parsed.header)
        bar.update(1)

    workers = resolve_workers(workers)
    if workers > 1 and len(candidates) >= MIN_PARALLEL_FILES:
        for parsed_chunk in ordered_map(_parse_headers, chunked(candidates, SCAN_CHUNK), workers):
            for parsed in parsed_chunk:
                add(parsed)
    else:
        for path in candidates:
            add(parse_file(path, decode=False))
    bar.close()
    scan.series = [SeriesFiles(uid, headers) for uid, headers in groups.items()]
    scan.series.sort(key=lambda s: str(s.headers[0].path))
    return scan


def _parse_headers(paths: list[Path]) -> list[ParsedFile]:
    """Worker task: the headers of a few files."""
    return [parse_file(path, decode=False) for path in paths]


def discover_series(
    root: str | Path, workers: int | None = None, progress: bool | None = None
) -> DicomScan:
    """Group every DICOM file under ``root`` (a folder tree or one file) by SeriesInstanceUID.

    Files that are not DICOM, not CT, or localizers are listed in ``skipped`` with the reason;
    non-image DICOM objects (DICOMDIR, reports) in ``ignored``. Directory symlinks are followed
    once; broken links are skipped with a reason. NIfTI files are neither read nor reported.

    Args:
        root: a folder tree or one file.
        workers: processes reading headers (see :func:`scan_files`).
        progress: a progress bar (see :func:`scan_files`).

    Raises:
        InputError: ``root`` does not exist or cannot be listed.
    """
    from ichseg.io.walk import list_files

    listing = list_files(root)
    scan = scan_files(listing.files, workers=workers, progress=progress)
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
    """One slice in HU and how its rescale was obtained.

    ``hu`` is None where the pixels went elsewhere (the slice cache keeps only its windows);
    ``shape`` is always the decoded ``(rows, columns)``. ``stored_range`` and ``has_air`` (what
    the rescale rule looks at) are measured only when ``intercept_missing``, else (0, 0) and
    False.
    """

    hu: np.ndarray | None
    fixed_12bit: bool
    slope_assumed: bool
    intercept_missing: bool
    signed: bool
    stored_range: tuple[float, float]
    has_air: bool
    shape: tuple[int, int] = (0, 0)


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


def _rescale_value(values: _Values, keyword: str) -> tuple[float | None, str | None]:
    """(value, None), (None, None) when absent, or (None, reason) when present but unusable."""
    element = values.get(keyword)
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
    return _decode_dataset(path, _dcmread_full(path))


def _dcmread_full(path: Path):
    """The whole dataset, pixels included (raw dumps without a preamble too)."""
    pydicom = _quiet_pydicom()
    from pydicom.errors import InvalidDicomError

    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        try:
            try:
                return pydicom.dcmread(path)
            except InvalidDicomError:
                # No preamble: read it anyway when it starts like a raw dataset.
                if not _looks_like_raw_dataset(path):
                    raise
                return pydicom.dcmread(path, force=True)
        except Exception as error:
            raise InputError(path, f"cannot read file ({one_line(error)})") from None


# Uncompressed little-endian syntaxes: the pixel bytes can go to pydicom's decoder as they are.
_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
# Image Pixel module elements -> pydicom decoding options (``as_pixel_options``).
_PIXEL_OPTIONS = {
    "SamplesPerPixel": "samples_per_pixel",
    "PhotometricInterpretation": "photometric_interpretation",
    "PlanarConfiguration": "planar_configuration",
    "NumberOfFrames": "number_of_frames",
    "Rows": "rows",
    "Columns": "columns",
    "BitsAllocated": "bits_allocated",
    "BitsStored": "bits_stored",
    "PixelRepresentation": "pixel_representation",
}
_OTHER_PIXEL_DATA = (0x7FE00008, 0x7FE00009, 0x7FE00001)  # float, double, extended offsets


def _stored_pixels(ds, values: _Values) -> np.ndarray:
    """``pydicom.pixels.pixel_array(ds)`` (what ``ds.pixel_array`` returns).

    For uncompressed little-endian data the decoder is given the pixel bytes and the Image
    Pixel options that ``pixel_array(ds)`` would collect from the dataset (the same options,
    validation and processing, without converting the group 0028 elements a second time);
    anything else goes through ``pixel_array(ds)`` itself.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.pixels import get_decoder, pixel_array

    syntax = values.transfer_syntax
    raw = ds.get_item(0x7FE00010)
    if (
        syntax not in _NATIVE_LITTLE_ENDIAN
        or not isinstance(raw, RawDataElement)
        or raw.value is None
        or any(tag in ds for tag in _OTHER_PIXEL_DATA)
    ):
        return pixel_array(ds)
    options: dict[str, Any] = {}
    for keyword, option in _PIXEL_OPTIONS.items():
        if _tag_number(keyword) in ds:
            options[option] = values.get(keyword)
    frames = options.get("number_of_frames", 1)
    frames = int(frames) if isinstance(frames, str) else frames
    options["number_of_frames"] = 1 if frames in (None, 0) else frames
    options["pixel_keyword"] = "PixelData"
    options["pixel_vr"] = raw.VR or "OW"
    return get_decoder(syntax).as_array(raw.value, **options)[0]


def _decode_dataset(path: Path, ds, values: _Values | None = None) -> DecodedSlice:
    """:func:`decode_slice` on a dataset already read in full."""
    values = values or _Values(ds)
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        if "PixelData" not in ds:
            raise InputError(path, "no PixelData element (truncated file or no image)")
        if not values.transfer_syntax:
            values.transfer_syntax = _fill_transfer_syntax(ds)
        try:
            stored = _stored_pixels(ds, values)
        except Exception as error:  # each decoder plugin raises its own types
            syntax = values.transfer_syntax
            name = _TRANSFER_SYNTAX_NAMES.get(syntax, syntax)
            raise InputError(
                path, f"cannot decode pixel data ({name}): {one_line(error)}"
            ) from None
    if stored.ndim != 2:
        raise InputError(path, f"expected one 2D frame, got pixel array shape {stored.shape}")
    slope, problem = _rescale_value(values, "RescaleSlope")
    if problem is None and slope == 0:
        problem = "RescaleSlope is 0: HU cannot be computed"
    intercept, intercept_problem = _rescale_value(values, "RescaleIntercept")
    if problem or intercept_problem:
        raise InputError(path, problem or intercept_problem)
    padding = _as_float(values.get("PixelPaddingValue"))
    pixel_representation = _as_int(values.get("PixelRepresentation"))
    hu, fixed = hu_from_stored(
        stored,
        slope=1.0 if slope is None else slope,
        intercept=0.0 if intercept is None else intercept,
        bits_stored=_as_int(values.get("BitsStored")),
        pixel_representation=pixel_representation,
        padding_value=padding,
    )
    # What the rescale rule looks at, needed only for a slice without RescaleIntercept.
    low = high = 0.0
    has_air = False
    if intercept is None:
        low, high = float(stored.min()), float(stored.max())
        air = (stored >= AIR_STORED_RANGE[0]) & (stored <= AIR_STORED_RANGE[1])
        has_air = bool(air.any())
    return DecodedSlice(
        hu=hu,
        fixed_12bit=fixed,
        slope_assumed=slope is None,
        intercept_missing=intercept is None,
        signed=pixel_representation == 1 or np.issubdtype(stored.dtype, np.signedinteger),
        stored_range=(low, high),
        has_air=has_air,
        shape=(int(hu.shape[0]), int(hu.shape[1])),
    )


@dataclass
class ParsedFile:
    """What one parse of one file gives: its header and, from the same read, its pixels.

    Exactly one of ``header``, ``skipped`` and ``ignored`` is set. With a header, ``decoded``
    holds the pixels when they could be used, else ``decode_error`` says why not (the slice is
    then dropped from its series with that reason); both are None when decoding was not asked
    for or the header already rules the pixels out (``_pixel_problem``).
    """

    path: Path
    header: SliceHeader | None = None
    decoded: DecodedSlice | None = None
    decode_error: str | None = None
    skipped: str | None = None
    ignored: str | None = None


def parse_file(path: str | Path, decode: bool = True) -> ParsedFile:
    """Read one file once: its header for grouping and sorting, and its pixels in HU.

    The single pass of the fast readers. Outcomes are those of :func:`read_header` followed by
    :func:`decode_slice`: the same header values, the same skip and drop reasons. A file whose
    full read fails (truncated pixel data) is read again header-only, so that it is dropped
    from its series, as the two-pass reader does, rather than skipped.

    Args:
        path: the file.
        decode: also decode the pixels (False: header only, like :func:`read_header`).
    """
    path = Path(path)
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        try:
            return _parse(path, decode)
        except NotAnImage as other:
            return ParsedFile(path, ignored=other.reason)
        except InputError as error:
            return ParsedFile(path, skipped=error.reason)


def _parse(path: Path, decode: bool) -> ParsedFile:
    file_size = _file_size(path)
    ds, read_error = None, None
    if decode:
        try:
            ds = _dcmread_full(path)
        except InputError as error:
            read_error = error.reason
    if ds is None:
        values = None
        header = _header_from_dataset(path, _dcmread_header(path), file_size)
    else:
        values = _Values(ds)
        header = _header_from_dataset(path, ds, file_size, values)
    parsed = ParsedFile(path, header=header)
    reason = _unusable_reason(header)
    if reason:
        return ParsedFile(path, skipped=reason)
    if not decode or _pixel_problem(header):
        return parsed
    if ds is None:
        parsed.decode_error = read_error
        return parsed
    try:
        parsed.decoded = _decode_dataset(path, ds, values)
    except InputError as error:
        parsed.decode_error = error.reason
    return parsed


def _fill_transfer_syntax(ds) -> str:
    """Give a dataset read without file meta (old raw dumps) the syntax it was read with;
    returns the dataset's transfer syntax."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return str(meta.TransferSyntaxUID)
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    return str(meta.TransferSyntaxUID)


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


@dataclass
class SeriesLayout:
    """Everything :func:`read_series` decides about a series except its pixel array.

    Attributes:
        series_uid: SeriesInstanceUID.
        source: the series' folder (one file: the file), as ``CTVolume.source``.
        headers: the files that make the volume, in volume order (sorted along the normal).
        decoded: the decode outcome of each of them (``hu`` may be None).
        slice_positions: position of each along the slice normal (mm).
        affine: voxel ``(x, y, z)`` -> RAS+ mm.
        metadata, warnings, quality_flags, dropped: as on :class:`CTVolume`.
    """

    series_uid: str
    source: str
    headers: list[SliceHeader]
    decoded: list[DecodedSlice]
    slice_positions: np.ndarray
    affine: np.ndarray
    metadata: dict[str, Any]
    warnings: list[str]
    quality_flags: list[str]
    dropped: list[tuple[str, str]]


def read_series(series: SeriesFiles) -> CTVolume:
    """Decode one series into a CT volume sorted along the slice normal.

    Slices that cannot be used are dropped (see the module docstring) and listed in the
    volume's ``dropped``; gantry tilt, irregular spacing and missing slices are reported as
    warnings; every assumption adds a code to ``quality_flags``. Slices in
    ``series.decoded`` are taken from there instead of being decoded again.

    Raises:
        UnusableSeries: no slice of the series can be used (the error names the folder and
            carries every dropped file with its reason).
        InputError: the series would need more memory than ``max_volume_bytes()``.
    """
    layout, hu = _assemble(series, with_pixels=True)
    return CTVolume(
        hu=hu,
        affine=layout.affine,
        source=layout.source,
        series_uid=layout.series_uid,
        slice_positions=layout.slice_positions,
        sop_uids=[h.sop_uid for h in layout.headers],
        instance_numbers=[h.instance_number for h in layout.headers],
        metadata=layout.metadata,
        warnings=layout.warnings,
        quality_flags=layout.quality_flags,
        dropped=layout.dropped,
        slice_paths=[str(h.path) for h in layout.headers],
    )


def series_layout(series: SeriesFiles) -> SeriesLayout:
    """:func:`read_series` without the pixel array: the same files, order, geometry and notes.

    Meant for series whose slices were decoded elsewhere (``series.decoded`` with or without
    ``hu``, e.g. the slice cache, which keeps only each slice's windows); a file missing there
    is decoded here.

    Raises:
        UnusableSeries, InputError: as :func:`read_series`.
    """
    return _assemble(series, with_pixels=False)[0]


def _assemble(series: SeriesFiles, with_pixels: bool) -> tuple[SeriesLayout, np.ndarray | None]:
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
    hu, headers, distances, decoded = _decode_series(slices, distances, series, notes, with_pixels)
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

    fixed_count = sum(d.fixed_12bit for d in decoded)
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
    layout = SeriesLayout(
        series_uid=series.series_uid,
        source=str(series.folder if len(series.headers) > 1 else series.headers[0].path),
        headers=headers,
        decoded=decoded,
        slice_positions=np.asarray(distances, dtype=np.float64),
        affine=dicom_affine(first_position, orientation, pixel_spacing, step),
        metadata=metadata,
        warnings=notes.warnings,
        quality_flags=notes.flags,
        dropped=notes.dropped,
    )
    return layout, hu


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


def _decoded(header: SliceHeader, series: SeriesFiles, with_pixels: bool) -> DecodedSlice:
    """The decode outcome of one file: from ``series.decoded`` when there, else decoded now."""
    known = series.decoded.get(str(header.path)) if series.decoded else None
    if isinstance(known, str):
        raise InputError(header.path, known)
    if known is None or (with_pixels and known.hu is None):
        return decode_slice(header.path)
    return known


def _decode_series(
    slices: list[_Slice],
    distances: np.ndarray,
    series: SeriesFiles,
    notes: _SeriesNotes,
    with_pixels: bool,
) -> tuple[np.ndarray | None, list[SliceHeader], np.ndarray, list[DecodedSlice]]:
    """Decode every slice (into one array with ``with_pixels``), dropping those that fail;
    apply the rescale rule.

    Where several files share a position, the first that decodes is used and the others are
    dropped as duplicates.

    Returns:
        The HU array (None without pixels), and the headers, distances and decode outcomes of
        the slices kept.
    """
    if not slices:
        empty = np.empty((0, 0, 0), np.float32) if with_pixels else None
        return empty, [], distances, []
    first = slices[0].header
    size = (first.rows, first.columns)
    hu = np.empty((len(slices), *size), dtype=np.float32) if with_pixels else None
    kept: list[SliceHeader] = []
    kept_distances: list[float] = []
    decoded: list[DecodedSlice] = []
    for position, distance in zip(slices, distances, strict=True):
        # A copy that states its rescale goes before one that would need the rescale rule.
        candidates = sorted([position.header, *position.copies], key=lambda h: not h.has_intercept)
        for index, header in enumerate(candidates):
            try:
                result = _decoded(header, series, with_pixels)
            except InputError as error:
                notes.drop(header, error.reason)
                continue
            if tuple(result.shape) != size:
                notes.drop(
                    header,
                    f"decoded pixel array {tuple(result.shape)} differs from the header's "
                    f"{header.rows}x{header.columns}",
                )
                continue
            for other in candidates[index + 1 :]:
                notes.drop(
                    other,
                    f"duplicate slice position {distance:.2f} mm "
                    f"(same as {_relative(header.path, series.folder)})",
                )
            if hu is not None:
                hu[len(kept)] = result.hu
                # The copy in ``hu`` is the one kept; the outcome stays without its pixels.
                result = replace(result, hu=None)
            kept.append(header)
            kept_distances.append(float(distance))
            decoded.append(result)
            break
    keep = _rescale_rule(kept, decoded, notes)
    # Compact in place so that no second volume-sized array is allocated.
    count = 0
    for index, use in enumerate(keep):
        if use:
            if hu is not None and index != count:
                hu[count] = hu[index]
            count += 1
    final = [h for h, use in zip(kept, keep, strict=True) if use]
    final_distances = np.array(
        [d for d, use in zip(kept_distances, keep, strict=True) if use], dtype=np.float64
    )
    final_decoded = [r for r, use in zip(decoded, keep, strict=True) if use]
    return (None if hu is None else hu[:count]), final, final_distances, final_decoded


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

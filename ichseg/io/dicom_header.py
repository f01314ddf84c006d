"""DICOM headers: the tags a CT slice is grouped, sorted and vetted by, read without pixels.

:func:`read_header` reads one file's header; :func:`header_from_dataset` turns a dataset read
header-only or in full into the same :class:`SliceHeader`, converting element values with
pydicom's own rules (:class:`ElementValues`). :func:`unusable_reason` says why a file cannot
be a slice of a CT series (not CT, a localizer, multi-frame, ...). The size limits that keep a
damaged or hostile header from allocating unbounded memory live here too.
"""

from __future__ import annotations

import io
import logging
import os
import warnings as py_warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ichseg.errors import InputError, one_line

log = logging.getLogger(__name__)

CT_MODALITY = "CT"

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

TRANSFER_SYNTAX_NAMES = {  # transfer syntax UID -> name shown in messages
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
UNCOMPRESSED_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
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


def as_int(value: Any) -> int | None:
    """An element value as an integer; None when absent, empty or not a number."""
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def as_float(value: Any) -> float | None:
    """An element value as a float; None when absent, empty or not a number."""
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


def quiet_pydicom():
    """Import pydicom with its own logging silenced unless debug logging is on.

    Real archives are full of small violations that pydicom logs one by one, and its pixel
    decoders log every failed plugin with a traceback; the reader turns what matters into
    one-line reasons itself. ``--verbose`` keeps pydicom's messages.
    """
    import pydicom

    pydicom_log = logging.getLogger("pydicom")
    # Only when it changes: every setLevel clears all loggers' caches (called once per file).
    if pydicom_log.level != logging.CRITICAL and not logging.getLogger().isEnabledFor(
        logging.DEBUG
    ):
        pydicom_log.setLevel(logging.CRITICAL)
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


def looks_like_raw_dataset(path: Path) -> bool:
    """A file without the DICM preamble that starts with a group-0008 tag (old raw dumps)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == b"\x08\x00"
    except OSError:
        return False


def read_header_dataset(path: Path):
    """The dataset of the header tags only (raw dumps without a preamble too).

    Raises:
        InputError: the file is not DICOM or its header cannot be read.
    """
    pydicom = quiet_pydicom()
    from pydicom.errors import InvalidDicomError

    short = _header_from_first_bytes(path)
    if short is not None:
        return short
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        if not looks_like_raw_dataset(path):
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


# Uncompressed little-endian syntaxes: the pixel bytes can go to pydicom's decoder as they are.
NATIVE_LITTLE_ENDIAN = UNCOMPRESSED_SYNTAXES - {"1.2.840.10008.1.2.2"}  # less big endian
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # integer, float, double


def read_up_to_pixels(stream, declared: str):
    """``dcmread(stream, stop_before_pixels=True)`` of a Part 10 file whose meta information
    (explicit VR, as :func:`declared_transfer_syntax` found it) declares an uncompressed
    little-endian syntax: the meta group, then the dataset up to the pixels, each read by
    pydicom's ``read_dataset`` as ``dcmread`` reads them, without its preamble and command-set
    steps and the ``FileDataset`` around the result: about a quarter less time for a 256 px
    slice's header (0.06 ms). None where ``dcmread`` would do more: a command set (group
    0000, always implicit VR) after the meta group, or a meta group whose syntax is not the
    declared one.
    """
    from pydicom.charset import default_encoding
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset
    from pydicom.uid import ImplicitVRLittleEndian

    stream.seek(132)
    meta = read_dataset(stream, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
    syntax = meta_text(meta, "TransferSyntaxUID")
    position = stream.tell()
    group = stream.read(2)
    stream.seek(position)
    if syntax != declared or group == b"\0\0":
        return None
    file_meta = FileMetaDataset(meta)
    file_meta.set_original_encoding(False, True, default_encoding)
    # The encoding dcmread records: the declared one (implicit where nothing follows the
    # meta), whatever read_dataset found the elements to use.
    implicit = syntax == ImplicitVRLittleEndian or not group
    ds = read_dataset(stream, implicit, True, stop_when=_at_pixel_data)
    ds.set_original_encoding(implicit, True, ds.original_character_set)
    ds.file_meta = file_meta
    return ds


def _at_pixel_data(tag, vr, length) -> bool:
    """Where ``dcmread(..., stop_before_pixels=True)`` stops: any pixel data element."""
    return tag in PIXEL_DATA_TAGS


def declared_transfer_syntax(data: bytes) -> str | None:
    """The Transfer Syntax UID of a file's meta information, read from its bytes (the meta
    group is always explicit VR little endian), or None where it cannot be found this way."""
    import struct

    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return None
    (meta_length,) = struct.unpack_from("<I", data, 140) if len(data) >= 144 else (0,)
    meta = data[144 : 144 + meta_length]
    at = meta.find(b"\x02\x00\x10\x00UI")
    if at < 0 or at + 8 > len(meta):
        return None
    (length,) = struct.unpack_from("<H", meta, at + 6)
    return meta[at + 8 : at + 8 + length].rstrip(b"\0 ").decode("ascii", "replace")


HEADER_PREFIX_BYTES = 64 * 1024
"""Bytes read for a header-only read: a CT slice's elements before its pixels take a few KB."""


def _header_from_first_bytes(path: Path):
    """The dataset up to the pixels, read from the file's first ``HEADER_PREFIX_BYTES`` with
    :func:`read_up_to_pixels`, as full parses read it: 0.36 against 0.47 ms a file
    for ``dcmread`` from the path, which reads element by element through buffered I/O (an AMD
    EPYC, 256 and 512 px slices alike). None where that does not hold: not an uncompressed
    little-endian Part 10 file, a read that reached the end of the bytes of a longer file
    (pydicom can stop there with a partial dataset and a warning), or no pixel data element
    where the read stopped: ``dcmread`` decides those.
    """
    import struct

    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_PREFIX_BYTES)
    except OSError:
        return None  # dcmread says why
    declared = declared_transfer_syntax(head)
    if declared not in NATIVE_LITTLE_ENDIAN:
        return None
    stream = _ExtentRecorder(head)
    try:
        ds = read_up_to_pixels(stream, declared)
    except Exception:
        return None
    position = stream.tell()
    if ds is None or position + 4 > len(head):
        return None
    if len(head) == HEADER_PREFIX_BYTES and stream.furthest >= len(head):
        return None  # a value ran past the bytes read: the file's rest decides
    group, element = struct.unpack_from("<HH", head, position)
    return ds if (group << 16 | element) in PIXEL_DATA_TAGS else None


class _ExtentRecorder(io.BytesIO):
    """A byte stream that remembers the furthest offset any read reached (pydicom seeks back
    after a value it could not finish)."""

    furthest = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.furthest = max(self.furthest, self.tell())
        return data


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "unknown SOP class")


def _read_header(path: Path) -> SliceHeader:
    file_size = checked_file_size(path)
    return header_from_dataset(path, read_header_dataset(path), file_size)


def checked_file_size(path: Path) -> int:
    """The file's size; raises for a file that cannot be read or holds nothing."""
    try:
        file_size = path.stat().st_size
    except OSError as error:
        raise InputError(path, f"cannot read file ({error.strerror})") from None
    if file_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    return file_size


class ElementValues:
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
        # The dataset's elements by tag, as stored (raw until converted): a dict lookup
        # instead of ``get_item``'s tag conversion for each of a header's ~40 elements.
        # pydicom keeps them in such a dict, keyed by an int subclass that hashes and compares
        # as the plain number; used as is, it costs nothing however many (private) elements a
        # header has, where a copy costs ~0.08 us an element. A copy where it is missing.
        elements = getattr(ds, "_dict", None)
        if not isinstance(elements, dict):
            elements = {int(tag): element for tag, element in ds.items()}
        self.elements: dict[int, Any] = elements
        meta = getattr(ds, "file_meta", None)
        self.transfer_syntax = meta_text(meta, "TransferSyntaxUID")

    def get(self, keyword: str, default: Any = None) -> Any:
        RawDataElement, convert_raw_data_element, AMBIGUOUS_VR = _raw_element_tools()
        tag = tag_number(keyword)
        if tag in self.converted:
            return self.converted[tag]
        raw = self.elements.get(tag)
        if raw is None:
            return default
        if isinstance(raw, RawDataElement) and raw.value is None:
            raw = self.ds.get_item(tag)  # a deferred read: pydicom reads and converts it
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


def meta_text(meta, keyword: str) -> str:
    """``str(meta.get(keyword, "") or "")`` of a file meta group (or ``""`` without one).

    The meta group's UIDs repeat in every file of a folder: each distinct raw value is
    converted once (``Dataset.get`` converted and stored it back for every file).
    """
    if meta is None:
        return ""
    RawDataElement = _raw_element_tools()[0]
    tag = tag_number(keyword)
    element = meta.get_item(tag)
    if element is None:
        return ""
    if not isinstance(element, RawDataElement) or element.value is None:
        return str(meta.get(keyword, "") or "")
    key = (tag, element.VR, element.value)
    found = _META_TEXT.get(key)
    if found is None:
        found = str(meta.get(keyword, "") or "")
        if len(_META_TEXT) >= _CONVERTED_LIMIT:
            _META_TEXT.clear()
        _META_TEXT[key] = found
    return found


_META_TEXT: dict[tuple, str] = {}


@lru_cache(maxsize=1)
def _raw_element_tools() -> tuple[Any, Any, Any]:
    """pydicom's raw-element class, converter and ambiguous VRs, imported once: an import
    statement costs ~1.5 us even when the module is loaded, and a header takes ~40 lookups."""
    from pydicom.dataelem import RawDataElement, convert_raw_data_element
    from pydicom.valuerep import AMBIGUOUS_VR

    return RawDataElement, convert_raw_data_element, AMBIGUOUS_VR


# Elements whose value differs from file to file: not worth remembering.
_PER_FILE = frozenset({"SOPInstanceUID", "ImagePositionPatient", "InstanceNumber"})
# Converted values by (tag, VR, raw bytes, byte order, character set); values are only read.
_CONVERTED: dict[tuple, Any] = {}
_CONVERTED_LIMIT = 4096


_TAG_NUMBERS: dict[str, int] = {}


def tag_number(keyword: str) -> int:
    """The tag of a DICOM keyword as an integer (looked up once per keyword)."""
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


def header_from_dataset(
    path: Path, ds, file_size: int, values: ElementValues | None = None
) -> SliceHeader:
    """The :class:`SliceHeader` of a dataset read header-only or in full (the same values)."""
    values = values or ElementValues(ds)
    file_meta = getattr(ds, "file_meta", None)
    media_class = meta_text(file_meta, "MediaStorageSOPClassUID")
    sop_class = str(values.get("SOPClassUID", "") or "") or media_class
    if _DICOMDIR_SOP_CLASS in (media_class, sop_class):
        raise NotAnImage(path, "DICOMDIR (index of a media set)")
    rows, columns = as_int(values.get("Rows")) or 0, as_int(values.get("Columns")) or 0
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
        "KVP": as_float(values.get("KVP")),
        "Manufacturer": str(values.get("Manufacturer", "") or ""),
        "ConvolutionKernel": _text(values.get("ConvolutionKernel")),
        "SliceThickness": as_float(values.get("SliceThickness")),
        "ManufacturerModelName": _text(values.get("ManufacturerModelName")),
        "InstitutionName": _text(values.get("InstitutionName")),
        "XRayTubeCurrent": as_float(values.get("XRayTubeCurrent")),
        "Exposure": as_float(values.get("Exposure")),
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
        instance_number=as_int(values.get("InstanceNumber")),
        frames=as_int(values.get("NumberOfFrames")) or 1,
        transfer_syntax=transfer_syntax,
        metadata=metadata,
        sop_class_uid=sop_class,
        samples_per_pixel=as_int(values.get("SamplesPerPixel")),
        bits_allocated=as_int(values.get("BitsAllocated")),
        file_size=file_size,
        has_intercept=values.get("RescaleIntercept") not in (None, ""),
    )


def unusable_reason(header: SliceHeader) -> str | None:
    """Why a file cannot be a slice of a CT series (not CT, localizer, ...), or None."""
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

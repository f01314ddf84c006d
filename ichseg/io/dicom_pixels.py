"""DICOM pixels to Hounsfield units, and the single-pass parse of one file.

:func:`hu_from_stored` applies RescaleSlope/Intercept and the RSNA 12-bit intercept fix;
:func:`decode_slice` decodes one file's pixels to HU; :func:`parse_file` reads a file once for
both its header and its pixels (the single pass of the fast readers). What happens to a slice
whose pixels cannot be used is described in :mod:`ichseg.io.dicom`.
"""

from __future__ import annotations

import warnings as py_warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import InputError, one_line
from ichseg.io.dicom_header import (
    NATIVE_LITTLE_ENDIAN,
    TRANSFER_SYNTAX_NAMES,
    UNCOMPRESSED_SYNTAXES,
    ElementValues,
    NotAnImage,
    SliceHeader,
    as_float,
    as_int,
    checked_file_size,
    declared_transfer_syntax,
    header_from_dataset,
    looks_like_raw_dataset,
    max_slice_pixels,
    meta_text,
    quiet_pydicom,
    read_header_dataset,
    read_up_to_pixels,
    tag_number,
    unusable_reason,
)
from ichseg.volume import AIR_HU

# Values at or below this (after rescale) are padding or outside the reconstruction circle.
OUT_OF_FIELD_HU = -1500.0
# Stored values in this range are air when they already are HU (no rescale needed).
AIR_STORED_RANGE = (-1100.0, -900.0)


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
    fixed = needs_12bit_fix(bits_stored, pixel_representation, intercept)
    if fixed:
        values = values + 1000.0
        values[values >= 4096.0] -= 4096.0
        intercept = -1000.0
    hu = values * np.float32(slope) + np.float32(intercept)
    if padding is not None:
        hu[padding] = AIR_HU
    hu[hu <= OUT_OF_FIELD_HU] = AIR_HU
    return hu, fixed


def needs_12bit_fix(
    bits_stored: int | None, pixel_representation: int | None, intercept: float
) -> bool:
    """Whether :func:`hu_from_stored` applies the RSNA 12-bit fix to these parameters."""
    return bits_stored == 12 and pixel_representation == 0 and intercept > -100


@dataclass(frozen=True)
class Rescale:
    """The parameters of :func:`hu_from_stored` for one slice (hashable: a slice cache maps
    stored values through one lookup table per distinct rescale)."""

    slope: float
    intercept: float
    bits_stored: int | None = None
    pixel_representation: int | None = None
    padding_value: float | None = None

    def hu(self, stored: np.ndarray) -> np.ndarray:
        """``stored`` in HU (float32)."""
        return hu_from_stored(
            stored,
            self.slope,
            self.intercept,
            self.bits_stored,
            self.pixel_representation,
            self.padding_value,
        )[0]


@dataclass
class DecodedSlice:
    """One slice in HU and how its rescale was obtained.

    ``hu`` is None where the pixels went elsewhere (the slice cache keeps only its windows) or
    were kept as stored values: then ``stored`` and ``rescale`` hold them (``rescale.hu(stored)``
    is the HU). ``shape`` is always the decoded ``(rows, columns)``. ``stored_range`` and
    ``has_air`` (what the rescale rule looks at) are measured only when ``intercept_missing``,
    else (0, 0) and False.
    """

    hu: np.ndarray | None
    fixed_12bit: bool
    slope_assumed: bool
    intercept_missing: bool
    signed: bool
    stored_range: tuple[float, float]
    has_air: bool
    shape: tuple[int, int] = (0, 0)
    stored: np.ndarray | None = None
    rescale: Rescale | None = None


def pixel_problem(header: SliceHeader) -> str | None:
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
    if header.file_size is not None and header.transfer_syntax in UNCOMPRESSED_SYNTAXES | {""}:
        bits = header.bits_allocated or 8
        needed = (pixels * (header.samples_per_pixel or 1) * bits + 7) // 8
        if needed > header.file_size:
            return (
                f"header claims {header.rows}x{header.columns} pixels of {bits} bits "
                f"({needed} bytes) but the file holds {header.file_size} bytes (truncated?)"
            )
    return None


def _rescale_value(values: ElementValues, keyword: str) -> tuple[float | None, str | None]:
    """(value, None), (None, None) when absent, or (None, reason) when present but unusable."""
    element = values.get(keyword)
    if element is None or element == "":
        return None, None
    value = as_float(element)
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
    try:
        size: int | None = path.stat().st_size
    except OSError:
        size = None  # the read itself says why
    return _decode_dataset(path, _dcmread_full(path, size))


IN_MEMORY_PARSE_BYTES = 64 * 1024**2
"""Files up to this size are read with one system call and parsed from memory: pydicom reads
an element at a time, and from a file object each small read costs a buffered-I/O round trip
(a 256 px slice parsed in 0.6 ms from memory against 0.8-1.1 ms from its path)."""


def _dcmread_full(path: Path, file_size: int | None = None):
    """The whole dataset, pixels included (raw dumps without a preamble too)."""
    import io

    pydicom = quiet_pydicom()
    from pydicom.errors import InvalidDicomError

    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        try:
            source: Any = path
            if file_size is not None and file_size <= IN_MEMORY_PARSE_BYTES:
                data = path.read_bytes()
                in_place = _read_with_pixel_view(data)
                if in_place is not None:
                    return in_place
                source = io.BytesIO(data)
            try:
                return pydicom.dcmread(source)
            except InvalidDicomError:
                # No preamble: read it anyway when it starts like a raw dataset.
                if not looks_like_raw_dataset(path):
                    raise
                if isinstance(source, io.BytesIO):
                    source.seek(0)
                return pydicom.dcmread(source, force=True)
        except Exception as error:
            raise InputError(path, f"cannot read file ({one_line(error)})") from None


_PIXEL_DATA = (0x7FE0, 0x0010)
_PIXEL_DATA_TAG = 0x7FE00010
_PIXEL_VRS = {b"OB", b"OW", b"UN"}  # the VRs PixelData may have (4-byte lengths, all three)


def _read_with_pixel_view(data: bytes):
    """The dataset in ``data`` with its PixelData element a view on ``data`` (no copy), or
    None where the full read must decide (compressed or big-endian data, a pixel element of
    undefined, odd or overlong length, float pixel data, a file pydicom cannot read this way).

    Reading the pixel element copies it (half a megabyte for a 512 px slice) and decoding
    copies it again: a quarter of a slice's whole parse. The header is read as usual, up to
    the pixel element; the element's own 8 or 12 bytes are read here.
    """
    import io
    import struct

    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    declared = declared_transfer_syntax(data)
    if declared is not None and declared not in NATIVE_LITTLE_ENDIAN:
        return None  # compressed or big endian: one full read, not a header read first
    stream = io.BytesIO(data)
    try:
        ds = read_up_to_pixels(stream, declared) if declared else None
        if ds is None:
            stream.seek(0)
            ds = pydicom.dcmread(stream, stop_before_pixels=True)
    except Exception:
        return None
    meta = getattr(ds, "file_meta", None)
    syntax = meta_text(meta, "TransferSyntaxUID")
    if syntax not in NATIVE_LITTLE_ENDIAN:
        return None
    position = stream.tell()
    if position + 12 > len(data) or struct.unpack_from("<HH", data, position) != _PIXEL_DATA:
        return None  # not at PixelData: float pixel data, or nothing left
    # The element's own bytes say how it is encoded: files whose elements contradict their
    # declared syntax exist, and pydicom reads their header by what it finds. Explicit VR
    # puts the VR and two zero bytes where implicit VR has a 4-byte length; such a length
    # would be odd ("OB", "OW", "UN" read as little-endian numbers), which a valid element
    # never has.
    vr: str | None = None
    vr_bytes = data[position + 4 : position + 6]
    implicit = not (vr_bytes in _PIXEL_VRS and data[position + 6 : position + 8] == b"\0\0")
    if implicit:
        (length,), start = struct.unpack_from("<I", data, position + 4), position + 8
    else:
        (length,), start = struct.unpack_from("<I", data, position + 8), position + 12
        vr = vr_bytes.decode("ascii")
    if length == 0xFFFFFFFF or length % 2 or start + length > len(data):
        return None  # encapsulated, malformed or truncated: the full read reports it
    view = memoryview(data)[start : start + length]
    tag = Tag(*_PIXEL_DATA)
    ds[tag] = RawDataElement(tag, vr, length, view, start, implicit, True)
    return ds


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


def _stored_pixels(ds, values: ElementValues) -> np.ndarray:
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
        syntax not in NATIVE_LITTLE_ENDIAN
        or not isinstance(raw, RawDataElement)
        or raw.value is None
        or any(tag in values.elements for tag in _OTHER_PIXEL_DATA)
    ):
        return pixel_array(ds)
    options: dict[str, Any] = {}
    for keyword, option in _PIXEL_OPTIONS.items():
        if tag_number(keyword) in values.elements:
            options[option] = values.get(keyword)
    frames = options.get("number_of_frames", 1)
    frames = int(frames) if isinstance(frames, str) else frames
    options["number_of_frames"] = 1 if frames in (None, 0) else frames
    options["pixel_keyword"] = "PixelData"
    options["pixel_vr"] = raw.VR or "OW"
    plain = _plain_monochrome(raw.value, options)
    if plain is not None:
        return plain
    return get_decoder(syntax).as_array(raw.value, **options)[0]


def _plain_monochrome(buffer, options: dict[str, Any]) -> np.ndarray | None:
    """The one frame of a well-formed uncompressed little-endian greyscale slice (8 or 16 bits
    a pixel), read in place; None for anything else, which pydicom's decoder validates and
    decodes.

    For such a slice the decoder gives exactly these values: no colour conversion applies,
    and unused high bits (BitsStored below BitsAllocated, as in 12-bit CT) are corrected the
    way it does, shifted out and back (which makes a new array). Its option validation costs
    as much as the rest of the pixel step.
    """
    rows, columns = options.get("rows"), options.get("columns")
    bits, stored_bits = options.get("bits_allocated"), options.get("bits_stored")
    representation = options.get("pixel_representation")
    if not (
        options.get("samples_per_pixel") == 1
        and options.get("number_of_frames") == 1
        and str(options.get("photometric_interpretation", "")).strip()
        in ("MONOCHROME1", "MONOCHROME2")
        and bits in (8, 16)
        and isinstance(stored_bits, int)
        and 1 <= stored_bits <= bits
        and representation in (0, 1)
        and isinstance(rows, int)
        and isinstance(columns, int)
        and rows > 0
        and columns > 0
    ):
        return None
    count = rows * columns
    if len(buffer) < count * bits // 8:
        return None  # too short: the decoder says how
    dtype = np.dtype(("i" if representation else "u") + str(bits // 8)).newbyteorder("<")
    pixels = np.frombuffer(buffer, dtype=dtype, count=count).reshape(rows, columns)
    unused = bits - stored_bits
    if unused:
        # The decoder's correction: whatever the unused high bits hold, shift them out and
        # back (sign-extending signed values), in a new array.
        pixels = np.left_shift(pixels, unused)
        np.right_shift(pixels, unused, out=pixels)
    return pixels


def _decode_dataset(
    path: Path, ds, values: ElementValues | None = None, keep_stored: bool = False
) -> DecodedSlice:
    """:func:`decode_slice` on a dataset already read in full (``keep_stored``: the stored
    values and their :class:`Rescale` instead of HU)."""
    values = values or ElementValues(ds)
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        if _PIXEL_DATA_TAG not in values.elements:
            raise InputError(path, "no PixelData element (truncated file or no image)")
        if not values.transfer_syntax:
            values.transfer_syntax = _fill_transfer_syntax(ds)
        try:
            stored = _stored_pixels(ds, values)
        except Exception as error:  # each decoder plugin raises its own types
            syntax = values.transfer_syntax
            name = TRANSFER_SYNTAX_NAMES.get(syntax, syntax)
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
    pixel_representation = as_int(values.get("PixelRepresentation"))
    rescale = Rescale(
        slope=1.0 if slope is None else slope,
        intercept=0.0 if intercept is None else intercept,
        bits_stored=as_int(values.get("BitsStored")),
        pixel_representation=pixel_representation,
        padding_value=_finite_or_none(as_float(values.get("PixelPaddingValue"))),
    )
    fixed = needs_12bit_fix(rescale.bits_stored, pixel_representation, rescale.intercept)
    hu = None if keep_stored else rescale.hu(stored)
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
        shape=(int(stored.shape[0]), int(stored.shape[1])),
        stored=stored if keep_stored else None,
        rescale=rescale if keep_stored else None,
    )


def _finite_or_none(value: float | None) -> float | None:
    """A NaN padding value matches no pixel: the same as none (and a hashable table key)."""
    return value if value is not None and np.isfinite(value) else None


@dataclass
class ParsedFile:
    """What one parse of one file gives: its header and, from the same read, its pixels.

    Exactly one of ``header``, ``skipped`` and ``ignored`` is set. With a header, ``decoded``
    holds the pixels when they could be used, else ``decode_error`` says why not (the slice is
    then dropped from its series with that reason); both are None when decoding was not asked
    for or the header already rules the pixels out (``pixel_problem``).
    """

    path: Path
    header: SliceHeader | None = None
    decoded: DecodedSlice | None = None
    decode_error: str | None = None
    skipped: str | None = None
    ignored: str | None = None


def parse_file(path: str | Path, decode: bool = True, keep_stored: bool = False) -> ParsedFile:
    """Read one file once: its header for grouping and sorting, and its pixels in HU.

    The single pass of the fast readers. Outcomes are those of :func:`read_header` followed by
    :func:`decode_slice`: the same header values, the same skip and drop reasons. A file whose
    full read fails (truncated pixel data) is read again header-only, so that it is dropped
    from its series, as the two-pass reader does, rather than skipped.

    Args:
        path: the file.
        decode: also decode the pixels (False: header only, like :func:`read_header`).
        keep_stored: give the decoded slice's stored values and rescale instead of its HU
            (:class:`DecodedSlice`).
    """
    path = Path(path)
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        try:
            return _parse(path, decode, keep_stored)
        except NotAnImage as other:
            return ParsedFile(path, ignored=other.reason)
        except InputError as error:
            return ParsedFile(path, skipped=error.reason)


def _parse(path: Path, decode: bool, keep_stored: bool = False) -> ParsedFile:
    file_size = checked_file_size(path)
    ds, read_error = None, None
    if decode:
        try:
            ds = _dcmread_full(path, file_size)
        except InputError as error:
            read_error = error.reason
    if ds is None:
        values = None
        header = header_from_dataset(path, read_header_dataset(path), file_size)
    else:
        values = ElementValues(ds)
        header = header_from_dataset(path, ds, file_size, values)
    parsed = ParsedFile(path, header=header)
    reason = unusable_reason(header)
    if reason:
        return ParsedFile(path, skipped=reason)
    if not decode or pixel_problem(header):
        return parsed
    if ds is None:
        parsed.decode_error = read_error
        return parsed
    try:
        parsed.decoded = _decode_dataset(path, ds, values, keep_stored)
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

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

The parts live in their own modules, and every public name is importable from here:
``ichseg.io.dicom_header`` (header tags, size limits, what makes a file unusable),
``ichseg.io.dicom_pixels`` (pixels to HU, the single-pass ``parse_file``),
``ichseg.io.dicom_order`` (series-wide orientation and spacing, sorting, slice step and gaps)
and ``ichseg.io.dicom_series`` (``read_series``, ``series_layout``). This module discovers
series in a folder tree (``discover_series``, ``scan_files``) and reads them (``read_dicom``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ichseg.errors import InputError
from ichseg.io.dicom_header import (
    CT_MODALITY,
    MAX_SLICE_PIXELS,
    MAX_VOLUME_BYTES,
    NotAnImage,
    SliceHeader,
    max_slice_pixels,
    max_volume_bytes,
    read_header,
)
from ichseg.io.dicom_order import SPACING_TOLERANCE, nominal_step
from ichseg.io.dicom_pixels import (
    AIR_STORED_RANGE,
    OUT_OF_FIELD_HU,
    DecodedSlice,
    ParsedFile,
    decode_slice,
    hu_from_stored,
    parse_file,
)
from ichseg.io.dicom_series import (
    TILT_WARNING_DEG,
    SeriesFiles,
    SeriesLayout,
    UnusableSeries,
    read_series,
    series_layout,
)
from ichseg.volume import CTVolume

__all__ = [
    "AIR_STORED_RANGE",
    "CT_MODALITY",
    "MAX_SLICE_PIXELS",
    "MAX_VOLUME_BYTES",
    "NIFTI_SUFFIXES",
    "OUT_OF_FIELD_HU",
    "PROGRESS_MIN_FILES",
    "SCAN_CHUNK",
    "SPACING_TOLERANCE",
    "TILT_WARNING_DEG",
    "DecodedSlice",
    "DicomScan",
    "NotAnImage",
    "ParsedFile",
    "SeriesFiles",
    "SeriesLayout",
    "SliceHeader",
    "UnusableSeries",
    "decode_slice",
    "discover_series",
    "hu_from_stored",
    "is_nifti",
    "max_slice_pixels",
    "max_volume_bytes",
    "nominal_step",
    "parse_file",
    "read_dicom",
    "read_header",
    "read_series",
    "scan_files",
    "series_layout",
]

log = logging.getLogger(__name__)


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

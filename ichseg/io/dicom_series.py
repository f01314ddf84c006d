"""A DICOM CT series assembled into one volume: usable slices, order, rescale rule, geometry.

:func:`read_series` decodes a series into a :class:`~ichseg.volume.CTVolume`;
:func:`series_layout` makes every decision of :func:`read_series` without the pixel array (for
slices decoded elsewhere, such as the slice cache). The rules for dropping slices and the
warnings and quality flags are described in :mod:`ichseg.io.dicom`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import InputError
from ichseg.io.dicom_header import (
    TRANSFER_SYNTAX_NAMES,
    UNCOMPRESSED_SYNTAXES,
    SliceHeader,
    max_volume_bytes,
)
from ichseg.io.dicom_order import (
    ORIENTATION,
    PIXEL_SPACING,
    SeriesNotes,
    SlicePosition,
    majority,
    series_value,
    sort_along_normal,
    step_and_gap_warnings,
)
from ichseg.io.dicom_pixels import DecodedSlice, decode_slice, pixel_problem
from ichseg.io.geometry import dicom_affine, slice_normal, tilt_degrees
from ichseg.volume import CTVolume

log = logging.getLogger(__name__)

TILT_WARNING_DEG = 0.5


class UnusableSeries(InputError):
    """A series none of whose slices can be used; ``dropped`` says why for each file."""

    def __init__(self, path: str | Path | None, reason: str, dropped: list[tuple[str, str]]):
        super().__init__(path, reason)
        self.dropped = dropped


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
    notes = SeriesNotes()
    headers = _usable_headers(series, notes)
    orientation, headers = series_value(headers, notes, ORIENTATION)
    pixel_spacing, headers = series_value(headers, notes, PIXEL_SPACING)
    slices, distances, have_positions = sort_along_normal(headers, orientation, notes)
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
        step_length = step_and_gap_warnings(distances, notes)
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
    syntaxes = sorted({h.transfer_syntax for h in headers} - UNCOMPRESSED_SYNTAXES - {""})
    for uid in syntaxes:
        notes.warnings.append(f"compressed transfer syntax: {TRANSFER_SYNTAX_NAMES.get(uid, uid)}")

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


def _usable_headers(series: SeriesFiles, notes: SeriesNotes) -> list[SliceHeader]:
    """Headers whose pixels can be decoded safely and whose size is the series majority."""
    headers = []
    for header in series.headers:
        problem = pixel_problem(header)
        if problem:
            notes.drop(header, problem)
        else:
            headers.append(header)
    if not headers:
        return headers
    size = majority([(h.rows, h.columns) for h in headers])
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
    slices: list[SlicePosition],
    distances: np.ndarray,
    series: SeriesFiles,
    notes: SeriesNotes,
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
    headers: list[SliceHeader], decoded: list[DecodedSlice], notes: SeriesNotes
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


def _patient_id_fallback(metadata: dict[str, Any], series_uid: str, notes: SeriesNotes) -> None:
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

"""Slice order of a DICOM series: series-wide orientation and spacing, sorting along the slice
normal, files at the same position, and the slice step with its gaps.

Slices are sorted by their position along the normal of the series' orientation, never by file
name or InstanceNumber (that is only the fallback when no slice has a position). Everything
assumed on the way is written to :class:`SeriesNotes` as a warning and a quality flag.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ichseg.io.dicom_header import SliceHeader
from ichseg.io.geometry import orthonormal_orientation, slice_normal, valid_pixel_spacing

# Relative deviation of a gap from the median step before the spacing counts as irregular.
SPACING_TOLERANCE = 0.1


def majority(values: list[Any]) -> Any:
    """The most common of ``values`` (the first seen on a tie)."""
    return Counter(values).most_common(1)[0][0]


@dataclass
class SeriesNotes:
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


@dataclass(frozen=True)
class SliceAttribute:
    """A per-slice header value that must be valid and the same across a series."""

    name: str
    read: Callable[[SliceHeader], tuple[float, ...] | None]
    validate: Callable[[tuple[float, ...]], Any]  # raises ValueError with the reason
    default: Any
    default_text: str
    flag: str


# The two attributes every slice of a series must share.
ORIENTATION = SliceAttribute(
    "ImageOrientationPatient",
    lambda h: h.orientation,
    orthonormal_orientation,
    np.array([1.0, 0, 0, 0, 1.0, 0]),
    "axial",
    "orientation_assumed",
)
PIXEL_SPACING = SliceAttribute(
    "PixelSpacing",
    lambda h: h.pixel_spacing,
    lambda values: np.array(valid_pixel_spacing(values)),
    np.array([1.0, 1.0]),
    "1 mm",
    "pixel_spacing_assumed",
)


def series_value(
    headers: list[SliceHeader], notes: SeriesNotes, attribute: SliceAttribute
) -> tuple[np.ndarray, list[SliceHeader]]:
    """The series' value of ``attribute`` (majority of the valid ones) and the slices kept.

    A slice with an invalid value, or one that differs from the majority, is dropped; a slice
    without the value gets the series' value, and a series without any gets the default, both
    flagged.
    """
    # The slices of a series nearly always repeat one raw value: each distinct one is
    # validated and rounded once (series assembly is serial, after a parallel build).
    checked: dict[tuple[float, ...], tuple[np.ndarray | None, str | None, tuple]] = {}
    values: list[np.ndarray | None] = []
    kept = []
    for header in headers:
        raw = attribute.read(header)
        if raw is None:
            kept.append(header)
            values.append(None)
            continue
        if raw not in checked:
            try:
                value = np.asarray(attribute.validate(raw), np.float64)
            except ValueError as error:
                checked[raw] = (None, str(error), ())
            else:
                checked[raw] = (value, None, tuple(np.round(value, 4)))
        value, problem, _ = checked[raw]
        if problem is not None:
            notes.drop(header, problem)
            continue
        kept.append(header)
        values.append(value)
    rounded = {id(value): key for value, problem, key in checked.values() if problem is None}
    present = [v for v in values if v is not None]
    if not present:
        if kept:
            notes.assume(
                attribute.flag, f"{attribute.name} missing: assumed {attribute.default_text}"
            )
        return attribute.default, kept
    key = majority([rounded[id(v)] for v in present])
    series_value = next(v for v in present if rounded[id(v)] == key)
    tolerance = 1e-3 * max(1.0, np.abs(series_value).max())
    differs = {
        id(value): bool(np.abs(value - series_value).max() > tolerance)
        for value, problem, _ in checked.values()
        if problem is None
    }
    final, assumed = [], 0
    for header, value in zip(kept, values, strict=True):
        if value is None:
            assumed += 1
        elif differs[id(value)]:
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


def sort_along_normal(
    headers: list[SliceHeader], orientation: np.ndarray, notes: SeriesNotes
) -> tuple[list[SlicePosition], np.ndarray, bool]:
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
    slices = [SlicePosition(headers[i], copies[k]) for k, i in enumerate(unique)]
    return slices, distances[unique], have_positions


@dataclass
class SlicePosition:
    """The file read for one slice position and other files found at the same position."""

    header: SliceHeader
    copies: list[SliceHeader]


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


def step_and_gap_warnings(distances: np.ndarray, notes: SeriesNotes) -> float:
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

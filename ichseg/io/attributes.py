"""Scan attributes: one canonical record per series or picture, for subgroups and baselines.

The record has the same keys whatever the data came from: DICOM headers (the keywords the
reader keeps in ``CTVolume.metadata``), the phantom manifest, or a demographics CSV for data
whose files carry no headers (NIfTI, PNG). Missing values are None, never NaN, so a record
round-trips through JSON. Numbers are floats; text is stripped but otherwise kept as written
("GE MEDICAL SYSTEMS" and "GE Healthcare" stay two manufacturers).

Nothing here reads pixels except :func:`air_statistics`, which looks only at air.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import InputError
from ichseg.volume import CTVolume

NUMBER, TEXT = "number", "text"

FIELDS: dict[str, str] = {
    "age": NUMBER,
    "sex": TEXT,
    "manufacturer": TEXT,
    "model": TEXT,
    "site": TEXT,
    "kernel": TEXT,
    "slice_thickness": NUMBER,
    "kvp": NUMBER,
    "tube_current": NUMBER,
    "exposure": NUMBER,
    "patient_position": TEXT,
    "window_center": NUMBER,
    "window_width": NUMBER,
    "pixel_spacing": NUMBER,
    "rows": NUMBER,
    "columns": NUMBER,
    "air_hu_mean": NUMBER,
    "air_hu_std": NUMBER,
}
"""Every attribute a record may hold, with its kind. Units: years, mm, kV, mA, mAs, HU."""

_FROM_HEADER: dict[str, str] = {
    "manufacturer": "Manufacturer",
    "model": "ManufacturerModelName",
    "site": "InstitutionName",
    "kernel": "ConvolutionKernel",
    "slice_thickness": "SliceThickness",
    "kvp": "KVP",
    "tube_current": "XRayTubeCurrent",
    "exposure": "Exposure",
    "patient_position": "PatientPosition",
    "window_center": "WindowCenter",
    "window_width": "WindowWidth",
}
"""Canonical name -> DICOM keyword in ``CTVolume.metadata`` (age and sex are parsed apart)."""

AIR_RANGE_HU = (-1100.0, -900.0)
"""Voxels in this range are air: outside the head, in the sinuses and the mastoids."""
_MIN_AIR_VOXELS = 100

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
_MAX_AGE = 130.0
_SEX = {
    "M": "M",
    "MALE": "M",
    "MAN": "M",
    "F": "F",
    "FEMALE": "F",
    "WOMAN": "F",
    "O": "O",
    "OTHER": "O",
}


def parse_age(value: Any) -> float | None:
    """Age in years from a DICOM age string (``"065Y"``, ``"018M"``, ``"003W"``) or a number.

    Args:
        value: the PatientAge element or a table cell; a bare number means years.

    Returns:
        Years, or None for missing, unparsable or implausible (> 130 years) values.
    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        years = float(value)
    else:
        match = _AGE.match(str(value))
        if match is None:
            return None
        years = float(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()]
    return years if math.isfinite(years) and 0.0 <= years <= _MAX_AGE else None


def parse_sex(value: Any) -> str | None:
    """``"M"``, ``"F"`` or ``"O"`` from PatientSex or a table cell (``male``, ``Female``, ...)."""
    if value is None:
        return None
    return _SEX.get(str(value).strip().upper())


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def clean(record: dict[str, Any]) -> dict[str, Any]:
    """A record with every value parsed to its field's kind; unknown keys are refused.

    Args:
        record: canonical names to raw values (strings from a table, numbers, None).
    """
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown scan attribute(s) {unknown}; known: {sorted(FIELDS)}")
    out: dict[str, Any] = {}
    for name, value in record.items():
        if name == "age":
            out[name] = parse_age(value)
        elif name == "sex":
            out[name] = parse_sex(value)
        else:
            out[name] = _number(value) if FIELDS[name] == NUMBER else _text(value)
    return out


def header_attributes(metadata: dict[str, Any]) -> dict[str, Any]:
    """The canonical record of a DICOM keyword mapping such as ``CTVolume.metadata``."""
    raw = {name: metadata.get(keyword) for name, keyword in _FROM_HEADER.items()}
    raw["age"] = metadata.get("PatientAge")
    raw["sex"] = metadata.get("PatientSex")
    return clean(raw)


def air_statistics(hu: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and standard deviation of the air voxels' HU (calibration and noise, no anatomy).

    Args:
        hu: a volume or slice in HU.

    Returns:
        ``(mean, std)``; Nones when fewer than 100 voxels are air.
    """
    air = hu[(hu >= AIR_RANGE_HU[0]) & (hu <= AIR_RANGE_HU[1])]
    if air.size < _MIN_AIR_VOXELS:
        return None, None
    values = air.astype(np.float64)
    return float(values.mean()), float(values.std())


def volume_attributes(volume: CTVolume) -> dict[str, Any]:
    """The record of a volume: its header attributes, its grid and its air statistics."""
    return series_attributes(volume.metadata, volume.spacing, volume.shape, volume.hu)


def series_attributes(
    metadata: dict[str, Any],
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
    hu: np.ndarray | None = None,
) -> dict[str, Any]:
    """The record of a series from its header keywords and grid; air statistics need ``hu``
    (the file-by-file slice cache has no volume to give, so they stay None there).

    The slice thickness is the header's; without one (NIfTI) the slice spacing stands in.

    Args:
        metadata: DICOM keywords as in ``CTVolume.metadata``.
        spacing: voxel size ``(z, y, x)`` in mm.
        shape: ``(slices, rows, columns)``.
        hu: the volume in HU, for the air statistics.
    """
    record = header_attributes(metadata)
    spacing_z, spacing_y, spacing_x = spacing
    if record["slice_thickness"] is None:
        record["slice_thickness"] = round(spacing_z, 4)
    record["pixel_spacing"] = round((spacing_y + spacing_x) / 2, 4)
    record["rows"], record["columns"] = float(shape[1]), float(shape[2])
    if hu is not None:
        record["air_hu_mean"], record["air_hu_std"] = air_statistics(hu)
    return {name: record.get(name) for name in FIELDS}


KEY_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "filename", "file", "path"),
    "series": ("series_uid", "seriesinstanceuid", "series"),
    "patient": ("patient_id", "patientid", "patient", "patient_number", "study_id", "study"),
}
"""Columns that key a demographics row, by what they name (matched case-insensitively, with
spaces and hyphens read as underscores and a trailing unit in parentheses dropped)."""

VALUE_COLUMNS: dict[str, tuple[str, ...]] = {
    "age": ("age", "patient_age", "patientage"),
    "sex": ("sex", "gender", "patient_sex", "patientsex"),
    "manufacturer": ("manufacturer", "vendor", "scanner_manufacturer"),
    "model": ("model", "scanner_model", "manufacturer_model_name", "manufacturermodelname"),
    "site": ("site", "institution", "institution_name", "institutionname", "hospital", "centre"),
    "kernel": ("kernel", "convolution_kernel", "convolutionkernel", "reconstruction_kernel"),
    "slice_thickness": ("slice_thickness", "slicethickness", "slice_thickness_mm", "thickness"),
    "kvp": ("kvp",),
}
"""Columns of a demographics CSV that give an attribute; other columns are ignored."""


def _normalise(name: str) -> str:
    name = re.sub(r"\(.*\)\s*$", "", name.strip().lower()).strip()
    return re.sub(r"[\s\-]+", "_", name)


def _key_forms(key: str) -> list[str]:
    """A key and, for a number, its form without leading zeros ("049" also matches "49")."""
    return [key, str(int(key))] if key.isdigit() and str(int(key)) != key else [key]


@dataclass
class Demographics:
    """A demographics CSV: attribute records looked up by image, series or patient id.

    Attributes:
        path: the CSV.
        columns: attribute name -> the CSV column that gives it.
        rows: for each key kind, key -> (line, record); records of one key must agree.
    """

    path: Path
    columns: dict[str, str]
    rows: dict[str, dict[str, tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    conflicts: dict[str, dict[str, str]] = field(default_factory=dict)

    def lookup(
        self,
        images: Sequence[str] = (),
        series: str | None = None,
        patient: str | None = None,
    ) -> dict[str, Any] | None:
        """The record of the first key found: an image name, else the series, else the patient.

        Args:
            images: the file's names to try (path below the data root, file name).
            series: SeriesInstanceUID (or the reader's series id).
            patient: patient id.

        Raises:
            InputError: the matching key has rows that disagree.
        """
        tries = [("image", name) for name in images if name]
        tries += [("series", series), ("patient", patient)]
        for kind, key in tries:
            if key is None:
                continue
            for form in _key_forms(str(key)):
                if form in self.conflicts.get(kind, {}):
                    raise InputError(self.path, self.conflicts[kind][form])
                found = self.rows.get(kind, {}).get(form)
                if found is not None:
                    return dict(found[1])
        return None


def read_demographics(path: str | Path) -> Demographics:
    """Read a demographics CSV: a key column (image, series_uid or patient_id) and attributes.

    Age may be a number of years or a DICOM age string; sex M/F/O or male/female. Rows of one
    key that disagree are an error when that key is looked up (a patient scanned twice on two
    scanners is keyed by image or series instead).

    Args:
        path: the CSV file.

    Raises:
        InputError: unreadable file, no key column, or no attribute column.
    """
    from ichseg.io.labels import csv_rows

    path = Path(path)
    header, rows = csv_rows(path)
    normalised = [_normalise(name) for name in header]
    keys = {
        kind: normalised.index(next(c for c in names if c in normalised))
        for kind, names in KEY_COLUMNS.items()
        if any(c in normalised for c in names)
    }
    if not keys:
        wanted = ", ".join(names[0] for names in KEY_COLUMNS.values())
        raise InputError(path, f"no key column; expected one of {wanted} (columns: {header})")
    values = {
        attribute: normalised.index(next(c for c in names if c in normalised))
        for attribute, names in VALUE_COLUMNS.items()
        if any(c in normalised for c in names)
    }
    if not values:
        wanted = ", ".join(VALUE_COLUMNS)
        raise InputError(path, f"no attribute column; expected some of {wanted}")
    table = Demographics(path, {a: header[i] for a, i in values.items()})
    for line, cells in rows:
        record = clean({attribute: cells[i] or None for attribute, i in values.items()})
        for kind, column in keys.items():
            known = table.rows.setdefault(kind, {})
            for key in _key_forms(cells[column]) if cells[column] else []:
                if key in known and known[key][1] != record:
                    table.conflicts.setdefault(kind, {})[key] = (
                        f"lines {known[key][0]} and {line} give different attributes for "
                        f"{header[column]} {cells[column]!r}"
                    )
                known.setdefault(key, (line, record))
    return table


def empty_record() -> dict[str, Any]:
    """A record with every attribute unknown."""
    return dict.fromkeys(FIELDS)


def merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """``override``'s known values over ``base`` (a demographics row over the headers)."""
    merged = {**empty_record(), **base}
    merged.update({k: v for k, v in (override or {}).items() if v is not None})
    return merged

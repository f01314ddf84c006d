"""Readers for public hemorrhage label tables, into plain dicts of uint8 label vectors.

Every reader returns a :class:`LabelTable` whose ``labels`` map an id to a uint8 vector of six
0/1 labels in :data:`ichseg.volume.SUBTYPES` order. What the id is depends on the format:

* ``rsna``: the image id without its ``ID_`` prefix (``"63eb1e259"``); :func:`rsna_image_id`
  puts the prefix back. RSNA DICOMs carry the prefixed form as SOPInstanceUID.
* ``cq500``: the study name (``"CQ500-CT-1"``); the label is the majority of the three readers.
* ``ctich``: ``"<patient:03d>/<slice>"`` (``"049/12"``); :func:`ctich_patient_id` gives the
  patient part for patient-level splits.
* ``ichseg-slices``: the ``sop_uid`` column as written.

Problems that can be repaired without guessing (conflicting duplicates, an ``any`` label that
disagrees with the subtypes) are repaired towards the positive label and reported in
``LabelTable.warnings``; everything else raises :class:`ichseg.errors.InputError`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ichseg.errors import InputError
from ichseg.fileio import atomic_path
from ichseg.volume import SUBTYPES

FORMATS: tuple[str, ...] = ("rsna", "cq500", "ctich", "ichseg-slices")
"""Label formats that :func:`detect_label_format` recognises."""

_SUBTYPE_INDEX = {name: i for i, name in enumerate(SUBTYPES)}
_ANY = _SUBTYPE_INDEX["any"]
# Order of the six rows per image in the RSNA files, kept on write so that output diffs cleanly
# against the official tables.
_RSNA_ORDER = SUBTYPES[1:] + SUBTYPES[:1]
_CQ500_FINDINGS = {
    "ICH": "any",
    "EDH": "epidural",
    "IPH": "intraparenchymal",
    "IVH": "intraventricular",
    "SAH": "subarachnoid",
    "SDH": "subdural",
}
_CQ500_READERS = ("R1", "R2", "R3")
_CTICH_SUBTYPES = {
    "Epidural": "epidural",
    "Intraparenchymal": "intraparenchymal",
    "Intraventricular": "intraventricular",
    "Subarachnoid": "subarachnoid",
    "Subdural": "subdural",
}
# Cap per-row warnings so that a systematically broken file does not flood the log.
_MAX_ROW_WARNINGS = 50


@dataclass
class LabelTable:
    """Per-id label vectors read from one file.

    Attributes:
        labels: id -> uint8 vector of six 0/1 labels in SUBTYPES order.
        warnings: repairs made while reading (conflicting duplicates, inconsistent ``any``).
        format: one of :data:`FORMATS`.
        source: the file the table was read from ("" when built in memory).
    """

    labels: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    format: str = ""
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, key: object) -> bool:
        return key in self.labels

    def __getitem__(self, key: str) -> np.ndarray:
        return self.labels[key]

    def ids(self) -> list[str]:
        """Ids in file order."""
        return list(self.labels)

    def matrix(self, ids: list[str] | None = None) -> np.ndarray:
        """Stack labels into a ``(N, 6)`` uint8 array.

        Args:
            ids: rows to take, in this order; all ids in file order when None.
        """
        keys = self.ids() if ids is None else ids
        if not keys:
            return np.zeros((0, len(SUBTYPES)), dtype=np.uint8)
        return np.stack([self.labels[k] for k in keys]).astype(np.uint8, copy=False)


class _Warnings:
    """Collects row-level warnings, keeping the first few and counting the rest."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.dropped = 0

    def add(self, message: str) -> None:
        if len(self.items) < _MAX_ROW_WARNINGS:
            self.items.append(message)
        else:
            self.dropped += 1

    def finish(self) -> list[str]:
        if self.dropped:
            self.items.append(f"... and {self.dropped} more warnings of the same kinds")
        return self.items


# --------------------------------------------------------------------------------------------
# CSV plumbing


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "label file not found")
    if not path.is_file():
        raise InputError(path, "expected a CSV file, got a folder or special file")


def csv_rows(path: str | Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header and an iterator of ``(line number, cells)`` for the non-blank rows of a CSV.

    Cells are stripped; a UTF-8 BOM is dropped. The file is streamed, since RSNA's table has
    millions of rows, and stays open until the iterator is exhausted or dropped.

    Args:
        path: the CSV file.

    Raises:
        InputError: missing file, empty file, non-UTF-8 text, malformed CSV, or a row whose
            field count differs from the header's (raised while iterating, naming the line).
    """
    path = Path(path)
    rows = _stream(path)
    try:
        _, header = next(rows)
    except StopIteration:
        raise InputError(path, "empty file, expected a CSV header") from None
    return header, rows


def _stream(path: Path) -> Iterator[tuple[int, list[str]]]:
    _check_file(path)
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None
    with handle:
        reader = csv.reader(handle)
        width = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise InputError(path, f"line {reader.line_num}: malformed CSV ({exc})") from None
            except UnicodeDecodeError:
                raise InputError(
                    path, f"not UTF-8 text (near line {reader.line_num + 1})"
                ) from None
            except OSError as exc:
                raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None
            if not any(cell.strip() for cell in row):
                continue
            if not width:
                width = len(row)
            elif len(row) != width:
                raise InputError(
                    path, f"line {reader.line_num}: {len(row)} fields, header has {width}"
                )
            yield reader.line_num, [cell.strip() for cell in row]


def _binary(path: Path, line: int, column: str, value: str) -> int:
    """Parse a 0/1 cell; tolerate ``0.0``/``1.0`` as written by pandas."""
    if value in ("0", "1"):
        return int(value)
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number in (0.0, 1.0):
        return int(number)
    raise InputError(path, f"line {line}: column {column!r} must be 0 or 1, got {value!r}")


def _column_index(path: Path, header: list[str], names: list[str]) -> dict[str, int]:
    """Position of each required column; InputError naming the missing ones."""
    positions = {name: i for i, name in enumerate(header)}
    missing = [name for name in names if name not in positions]
    if missing:
        raise InputError(path, f"missing column(s): {', '.join(missing)}")
    return {name: positions[name] for name in names}


def _merge(
    table: dict[str, np.ndarray],
    key: str,
    vector: np.ndarray,
    line: int,
    warnings: _Warnings,
) -> None:
    """Add one row's vector; on a conflicting duplicate keep the positive label and warn."""
    previous = table.get(key)
    if previous is None:
        table[key] = vector
        return
    if not np.array_equal(previous, vector):
        differ = [SUBTYPES[i] for i in np.flatnonzero(previous != vector)]
        warnings.add(
            f"line {line}: {key!r} repeats with conflicting {', '.join(differ)}; kept positive"
        )
        table[key] = np.maximum(previous, vector)


def _fix_any(labels: dict[str, np.ndarray], warnings: _Warnings) -> None:
    """Set ``any`` wherever a subtype is positive; warn for each id repaired."""
    for key, vector in labels.items():
        if vector[_ANY] == 0 and vector[1:].any():
            positives = [SUBTYPES[i] for i in np.flatnonzero(vector) if i != _ANY]
            warnings.add(f"{key!r}: any=0 but {', '.join(positives)}=1; set any=1")
            vector[_ANY] = 1


# --------------------------------------------------------------------------------------------
# RSNA


def rsna_image_id(sop: str) -> str:
    """RSNA image id (``ID_<sop>``) for a key of :func:`read_rsna_labels`.

    Args:
        sop: the key as returned by the reader, e.g. ``"63eb1e259"``.
    """
    return "ID_" + sop


def rsna_key(image_id: str) -> str:
    """Reader key for an RSNA image id or SOPInstanceUID (strips a leading ``ID_``).

    Args:
        image_id: e.g. ``"ID_63eb1e259"`` as found in the DICOM SOPInstanceUID.
    """
    return image_id[3:] if image_id.startswith("ID_") else image_id


def split_rsna_id(label_id: str) -> tuple[str, str]:
    """Split ``ID_<sop>_<subtype>`` into ``(sop, subtype)``.

    The split is on the last underscore, so sops containing underscores or dots survive.

    Args:
        label_id: the ``ID`` cell of an RSNA label or submission row.

    Raises:
        ValueError: no underscore to split on, or an empty part.
    """
    sop, sep, subtype = label_id.rpartition("_")
    sop = rsna_key(sop)
    if not sep or not sop or not subtype:
        raise ValueError(f"expected ID_<sop>_<subtype>, got {label_id!r}")
    return sop, subtype


def read_rsna_labels(path: str | Path) -> LabelTable:
    """Read an RSNA ``stage_2_train.csv``-style table (``ID,Label``, six rows per image).

    Args:
        path: CSV with header ``ID,Label`` and rows ``ID_<sop>_<subtype>,<0|1>``.

    Returns:
        Table keyed by ``<sop>`` (no ``ID_`` prefix). Identical duplicate rows are ignored;
        conflicting ones keep 1 and add a warning, as does an ``any`` that is 0 while a
        subtype is 1 (``any`` is set to 1).

    Raises:
        InputError: wrong header, unknown subtype (names the line), a value other than 0/1,
            or an image lacking some of the six subtypes (names the image).
    """
    path = Path(path)
    header, rows = csv_rows(path)
    if [h.lower() for h in header] != ["id", "label"]:
        raise InputError(path, f"expected header 'ID,Label' for RSNA labels, got {header}")
    warnings = _Warnings()
    # -1 marks a subtype not seen yet, so missing rows can be told apart from zeros.
    seen: dict[str, list[int]] = {}
    for line, (label_id, value) in rows:
        try:
            sop, subtype = split_rsna_id(label_id)
        except ValueError:
            raise InputError(
                path, f"line {line}: expected ID_<sop>_<subtype>, got {label_id!r}"
            ) from None
        index = _SUBTYPE_INDEX.get(subtype)
        if index is None:
            raise InputError(
                path,
                f"line {line}: unknown subtype {subtype!r} (expected one of {', '.join(SUBTYPES)})",
            )
        label = _binary(path, line, "Label", value)
        vector = seen.setdefault(sop, [-1] * len(SUBTYPES))
        if vector[index] != -1 and vector[index] != label:
            warnings.add(
                f"line {line}: {label_id} repeats with conflicting labels "
                f"{vector[index]} and {label}; kept 1"
            )
            label = 1
        vector[index] = max(vector[index], label)
    labels: dict[str, np.ndarray] = {}
    for sop, vector in seen.items():
        if -1 in vector:
            missing = [SUBTYPES[i] for i, v in enumerate(vector) if v == -1]
            raise InputError(
                path, f"image {rsna_image_id(sop)} has no row for {', '.join(missing)}"
            )
        labels[sop] = np.array(vector, dtype=np.uint8)
    _fix_any(labels, warnings)
    return LabelTable(labels, warnings.finish(), "rsna", str(path))


def write_rsna_labels(path: str | Path, table: LabelTable | Mapping[str, np.ndarray]) -> None:
    """Write labels as an RSNA ``ID,Label`` table, replacing ``path`` atomically.

    Args:
        path: destination CSV; written to a temporary file in the same folder, then renamed.
        table: a :class:`LabelTable` or a mapping sop -> six 0/1 labels in SUBTYPES order.

    Raises:
        ValueError: a vector that is not six 0/1 values.
    """
    path = Path(path)
    labels = table.labels if isinstance(table, LabelTable) else table
    lines: list[tuple[str, int]] = []
    for sop, vector in labels.items():
        values = np.asarray(vector).ravel().tolist()
        if len(values) != len(SUBTYPES) or any(v not in (0, 1) for v in values):
            raise ValueError(f"labels for {sop!r} must be six 0/1 values, got {vector!r}")
        image_id = rsna_image_id(sop)
        for subtype in _RSNA_ORDER:
            lines.append((f"{image_id}_{subtype}", int(values[_SUBTYPE_INDEX[subtype]])))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("ID", "Label"))
        writer.writerows(lines)


# --------------------------------------------------------------------------------------------
# CQ500


def read_cq500_reads(path: str | Path) -> LabelTable:
    """Read CQ500 ``reads.csv``; the label of each scan is the majority of three readers.

    Args:
        path: CSV with a ``name`` column and ``R{1,2,3}:{ICH,EDH,IPH,IVH,SAH,SDH}`` columns.
            Other columns (Category, fractures, mass effect, bleed location, ...) are ignored.

    Returns:
        Table keyed by study name (``"CQ500-CT-1"``). A finding is 1 when at least two of the
        three readers marked it. ICH maps to ``any``; ``any`` is raised to 1 (with a warning)
        when a subtype has a majority but ICH has not.

    Raises:
        InputError: a missing reader or ``name`` column, or a value other than 0/1.
    """
    path = Path(path)
    header, rows = csv_rows(path)
    wanted = ["name"] + [f"{r}:{f}" for r in _CQ500_READERS for f in _CQ500_FINDINGS]
    columns = _column_index(path, header, wanted)
    warnings = _Warnings()
    labels: dict[str, np.ndarray] = {}
    for line, cells in rows:
        name = cells[columns["name"]]
        if not name:
            raise InputError(path, f"line {line}: empty 'name'")
        vector = np.zeros(len(SUBTYPES), dtype=np.uint8)
        for finding, subtype in _CQ500_FINDINGS.items():
            votes = 0
            for reader in _CQ500_READERS:
                column = f"{reader}:{finding}"
                votes += _binary(path, line, column, cells[columns[column]])
            vector[_SUBTYPE_INDEX[subtype]] = votes >= 2
        _merge(labels, name, vector, line, warnings)
    _fix_any(labels, warnings)
    return LabelTable(labels, warnings.finish(), "cq500", str(path))


# --------------------------------------------------------------------------------------------
# PhysioNet CT-ICH


def ctich_key(patient: int | str, slice_number: int | str) -> str:
    """Key ``"<patient:03d>/<slice>"`` used by :func:`read_physionet_ctich`.

    Args:
        patient: PatientNumber (49 -> ``"049"``, matching ``ct_scans/049.nii``).
        slice_number: SliceNumber as in the CSV (1-based there).
    """
    return f"{int(patient):03d}/{int(slice_number)}"


def ctich_patient_id(key: str) -> str:
    """Patient part of a CT-ICH key (``"049/12"`` -> ``"049"``), for patient-level splits.

    Args:
        key: a key of :func:`read_physionet_ctich`.
    """
    patient, sep, _ = key.partition("/")
    if not sep:
        raise ValueError(f"not a CT-ICH key (expected <patient>/<slice>): {key!r}")
    return patient


def read_physionet_ctich(path: str | Path) -> LabelTable:
    """Read PhysioNet CT-ICH ``hemorrhage_diagnosis_raw_ct.csv`` (one row per slice).

    Args:
        path: CSV with PatientNumber, SliceNumber, the five subtype columns and No_Hemorrhage
            (Fracture_Yes_No and other extra columns are ignored).

    Returns:
        Table keyed by ``"<patient:03d>/<slice>"`` (see :func:`ctich_key`). ``any`` is
        ``1 - No_Hemorrhage``; when that disagrees with the subtypes the positive side wins
        and a warning names the slice.

    Raises:
        InputError: missing columns, non-integer patient/slice numbers, values other than 0/1.
    """
    path = Path(path)
    header, rows = csv_rows(path)
    wanted = ["PatientNumber", "SliceNumber", *_CTICH_SUBTYPES, "No_Hemorrhage"]
    columns = _column_index(path, header, wanted)
    warnings = _Warnings()
    labels: dict[str, np.ndarray] = {}
    for line, cells in rows:
        try:
            key = ctich_key(cells[columns["PatientNumber"]], cells[columns["SliceNumber"]])
        except ValueError:
            raise InputError(
                path, f"line {line}: PatientNumber and SliceNumber must be integers"
            ) from None
        vector = np.zeros(len(SUBTYPES), dtype=np.uint8)
        for column, subtype in _CTICH_SUBTYPES.items():
            vector[_SUBTYPE_INDEX[subtype]] = _binary(path, line, column, cells[columns[column]])
        stated_any = 1 - _binary(path, line, "No_Hemorrhage", cells[columns["No_Hemorrhage"]])
        subtype_any = int(vector[1:].max())
        if stated_any != subtype_any:
            warnings.add(
                f"line {line}: slice {key} has No_Hemorrhage={1 - stated_any} but "
                f"max(subtypes)={subtype_any}; set any=1"
            )
        vector[_ANY] = max(stated_any, subtype_any)
        _merge(labels, key, vector, line, warnings)
    return LabelTable(labels, warnings.finish(), "ctich", str(path))


# --------------------------------------------------------------------------------------------
# ichseg per-slice table


def read_ichseg_slices(path: str | Path) -> LabelTable:
    """Read an ichseg per-slice table: a ``sop_uid`` column plus the six SUBTYPES columns.

    Args:
        path: CSV; other columns (series_uid, slice index, ...) are ignored.

    Returns:
        Table keyed by ``sop_uid`` as written; duplicates and ``any`` handled as elsewhere.

    Raises:
        InputError: missing columns, an empty sop_uid, values other than 0/1.
    """
    path = Path(path)
    header, rows = csv_rows(path)
    columns = _column_index(path, header, ["sop_uid", *SUBTYPES])
    warnings = _Warnings()
    labels: dict[str, np.ndarray] = {}
    for line, cells in rows:
        sop = cells[columns["sop_uid"]]
        if not sop:
            raise InputError(path, f"line {line}: empty 'sop_uid'")
        vector = np.array(
            [_binary(path, line, name, cells[columns[name]]) for name in SUBTYPES],
            dtype=np.uint8,
        )
        _merge(labels, sop, vector, line, warnings)
    _fix_any(labels, warnings)
    return LabelTable(labels, warnings.finish(), "ichseg-slices", str(path))


# --------------------------------------------------------------------------------------------
# Detection and dispatch


def detect_label_format(path: str | Path) -> str:
    """Name the label format of a CSV from its header.

    Args:
        path: the CSV file.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        InputError: unreadable file, or a header that matches no supported format.
    """
    path = Path(path)
    header, _ = csv_rows(path)
    columns = set(header)
    if [h.lower() for h in header] == ["id", "label"]:
        return "rsna"
    if "name" in columns and any(c.startswith(("R1:", "R2:", "R3:")) for c in columns):
        return "cq500"
    if {"PatientNumber", "SliceNumber", "No_Hemorrhage"} <= columns:
        return "ctich"
    if {"sop_uid", *SUBTYPES} <= columns:
        return "ichseg-slices"
    shown = ",".join(header[:8]) + (",..." if len(header) > 8 else "")
    raise InputError(
        path,
        f"unrecognised label header '{shown}'; supported: rsna (ID,Label), "
        "cq500 (name,R1:ICH,...), ctich (PatientNumber,SliceNumber,...,No_Hemorrhage), "
        "ichseg-slices (sop_uid + " + ",".join(SUBTYPES) + ")",
    )


_READERS = {
    "rsna": read_rsna_labels,
    "cq500": read_cq500_reads,
    "ctich": read_physionet_ctich,
    "ichseg-slices": read_ichseg_slices,
}


def read_labels(path: str | Path) -> LabelTable:
    """Read any supported label table, choosing the reader from its header.

    Args:
        path: a CSV in one of :data:`FORMATS`.
    """
    return _READERS[detect_label_format(path)](path)

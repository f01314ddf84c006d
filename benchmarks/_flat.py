"""A synthetic RSNA-layout folder: one flat folder of one-slice files named by random ids.

One phantom series is written with pydicom, its study/series/SOP UIDs and PatientID set to
placeholders of fixed length; every further series is those files' bytes with the placeholders
replaced by unique values of the same length (no re-encoding), so tens of thousands of files
take seconds. File names are hashes (``ID_<9 hex>.dcm``), so consecutive names belong to
different series, as in the RSNA training folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Placeholders: valid UIDs (no leading zeros in a component) whose last component is replaced
# by a number of the same width.
_ROOT = "1.2.826.0.1.3680043.10.543"
_WIDTH = 20
_STUDY = f"{_ROOT}.1.{'9' * _WIDTH}"
_SERIES = f"{_ROOT}.2.{'9' * _WIDTH}"
_SOP = f"{_ROOT}.3.{'9' * _WIDTH}"
_PATIENT = "PH" + "9" * 10


def _number(index: int) -> str:
    return str(10 ** (_WIDTH - 1) + index)  # _WIDTH digits, no leading zero


def _template(size: int, slices: int, seed: int) -> list[bytes]:
    """The bytes of one phantom series' files with the placeholder identifiers."""
    import io

    import pydicom

    from ichseg.phantom import PhantomConfig, generate_study
    from ichseg.phantom.writers import write_dicom_series

    study = generate_study(seed, PhantomConfig(size=size, num_slices=slices))
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_dicom_series(study, Path(folder))
        for z, path in enumerate(sorted(paths)):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = _STUDY
            ds.SeriesInstanceUID = _SERIES
            ds.SOPInstanceUID = f"{_SOP}.{z + 1:d}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = _PATIENT
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            out.append(buffer.getvalue())
    return out


def write_flat_folder(
    folder: Path, files: int, size: int = 256, slices: int = 32, seed: int = 3, start: int = 0
) -> list[Path]:
    """Write ``files`` one-slice files (``files // slices`` series and a partial one) into
    ``folder``; series are numbered from ``start`` (a series number, not a file count), so
    several calls can add new series to one folder.

    Returns:
        The paths written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    template = _template(size, slices, seed)
    marks = [m.encode() for m in (_STUDY, _SERIES, _SOP, _PATIENT)]
    written = []
    for index in range(files):
        series, z = divmod(index, slices)
        series += start
        number = _number(series).encode()
        data = template[z]
        data = data.replace(marks[0], f"{_ROOT}.1.".encode() + number)
        data = data.replace(marks[1], f"{_ROOT}.2.".encode() + number)
        data = data.replace(marks[2], f"{_ROOT}.3.".encode() + number)
        data = data.replace(marks[3], f"PH{series:010d}".encode())
        name = hashlib.sha1(f"{seed}/{series}/{z}".encode()).hexdigest()[:9]
        path = folder / f"ID_{name}.dcm"
        path.write_bytes(data)
        written.append(path)
    return written


def write_rsna_labels(path: Path, series_count: int, slices: int, start: int = 0) -> Path:
    """An RSNA-format label table (``ID_<sop>_<subtype>,Label``) for the folder's slices:
    "any" and "intraparenchymal" positive on the middle third of every series (synthetic)."""
    from ichseg.volume import SUBTYPES

    lines = ["ID,Label"]
    for series in range(start, start + series_count):
        number = _number(series)
        for z in range(slices):
            positive = slices // 3 <= z < 2 * slices // 3
            sop = f"{_ROOT}.3.{number}.{z + 1}"
            for name in SUBTYPES:
                value = int(positive and name in ("any", "intraparenchymal"))
                lines.append(f"ID_{sop}_{name},{value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def flat_series_uid(series: int) -> str:
    """The SeriesInstanceUID of series number ``series`` in a folder of this module."""
    return f"{_ROOT}.2.{_number(series)}"

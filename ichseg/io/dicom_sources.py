"""The source DICOM files behind a CT volume, for outputs that must reference them.

DICOM SEG, SR and Secondary Capture objects copy patient and study attributes from their source
images and list every source instance. These helpers find and check the source files of a
``CTVolume`` read from DICOM, in the volume's slice order.
"""

from __future__ import annotations

import os
import warnings as py_warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ichseg.errors import InputError
from ichseg.volume import CTVolume

_UID_TAGS = ["SOPInstanceUID"]


def _dcmread_header(path: Path, **kwargs: Any):
    import pydicom

    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True, **kwargs)


def source_files_for_volume(volume: CTVolume, folder: str | Path) -> list[Path]:
    """The file of each slice of ``volume`` under ``folder``, matched by SOPInstanceUID.

    Args:
        volume: a volume read from DICOM (``sop_uids`` filled).
        folder: folder searched recursively; files that are not DICOM are ignored.

    Raises:
        InputError: the volume has no SOP Instance UIDs, or some slice has no file.
    """
    folder = Path(folder)
    if not all(volume.sop_uids):
        raise InputError(volume.source, "volume has no SOPInstanceUID per slice (not DICOM)")
    wanted = set(volume.sop_uids)
    found: dict[str, Path] = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = Path(root) / name
            try:
                uid = str(_dcmread_header(path, specific_tags=_UID_TAGS).get("SOPInstanceUID", ""))
            except Exception:  # not DICOM, or damaged: pydicom raises many types
                continue
            if uid in wanted:
                found.setdefault(uid, path)
    missing = [uid for uid in volume.sop_uids if uid not in found]
    if missing:
        raise InputError(
            folder, f"no file for {len(missing)} slice(s) of the volume, e.g. {missing[0]}"
        )
    return [found[uid] for uid in volume.sop_uids]


def read_source_headers(volume: CTVolume, source_files: Sequence[str | Path]) -> list[Any]:
    """Headers (no pixels) of the source files, checked against the volume slice by slice.

    Args:
        volume: the CT the output belongs to.
        source_files: one file per slice, in the volume's slice order.

    Raises:
        InputError: wrong number of files, a file that is not DICOM, or a file whose
            SOPInstanceUID or matrix size differs from the volume's slice at that index.
    """
    from pydicom.errors import InvalidDicomError

    if len(source_files) != volume.num_slices:
        raise InputError(
            volume.source,
            f"{len(source_files)} source file(s) for a volume of {volume.num_slices} slices",
        )
    _, rows, columns = volume.shape
    headers = []
    for index, path in enumerate(source_files):
        try:
            ds = _dcmread_header(Path(path))
        except (InvalidDicomError, OSError) as error:
            raise InputError(path, f"not a readable DICOM file ({type(error).__name__})") from None
        expected = volume.sop_uids[index]
        if expected and str(ds.get("SOPInstanceUID", "")) != expected:
            raise InputError(
                path, f"SOPInstanceUID differs from slice {index} of the volume ({expected})"
            )
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, columns):
            raise InputError(path, f"matrix size differs from the volume's {rows}x{columns}")
        headers.append(ds)
    return headers

"""One entry point for any input the CLI accepts: a DICOM tree, NIfTI files, or a mix."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ichseg.errors import InputError
from ichseg.io.dicom import SeriesFiles, discover_series, is_nifti, read_series
from ichseg.io.nifti import nifti_stem, read_nifti
from ichseg.volume import CTVolume


@dataclass
class InputIndex:
    """What an input path holds, found without decoding pixels."""

    root: Path
    dicom_series: list[SeriesFiles] = field(default_factory=list)
    nifti_files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dicom_series) + len(self.nifti_files)

    def iter_volumes(self) -> Iterator[CTVolume | InputError]:
        """Yield each volume, or the error that stopped it, one at a time (bounded memory)."""
        for series in self.dicom_series:
            try:
                yield read_series(series)
            except InputError as error:
                yield error
        for path in self.nifti_files:
            try:
                yield read_nifti(path)
            except InputError as error:
                yield error


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return name[:80] or "volume"


def output_name(volume: CTVolume, used: set[str] | None = None) -> str:
    """File-name-safe name for a volume's outputs, the same in every command.

    A NIfTI keeps its file stem; a DICOM series is ``<PatientID>_<8 hex of its series uid>``.
    With ``used``, a repeated name gets ``_2``, ``_3``, ... (case-insensitively) and is recorded.
    """
    source = Path(volume.source)
    if is_nifti(source):
        name = _safe_name(nifti_stem(source))
    else:
        digest = hashlib.sha1(volume.series_uid.encode()).hexdigest()[:8]
        name = f"{_safe_name(volume.patient_id)}_{digest}"
    if used is None:
        return name
    candidate, number = name, 2
    while candidate.lower() in used:
        candidate = f"{name}_{number}"
        number += 1
    used.add(candidate.lower())
    return candidate


def index_input(path: str | Path) -> InputIndex:
    """Find every DICOM series and NIfTI file under ``path`` (a file or a folder tree).

    Raises:
        InputError: the path does not exist, or holds no CT at all.
    """
    root = Path(path)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    index = InputIndex(root=root)
    if root.is_file() and is_nifti(root):
        index.nifti_files = [root]
        return index
    scan = discover_series(root)
    index.dicom_series = scan.series
    index.skipped = scan.skipped
    if root.is_dir():
        index.nifti_files = sorted(p for p in root.rglob("*") if p.is_file() and is_nifti(p))
    if not index:
        if index.skipped:
            first_path, first_reason = index.skipped[0]
            detail = f"{len(index.skipped)} file(s) skipped, e.g. {first_path}: {first_reason}"
        else:
            detail = "folder is empty"
        raise InputError(root, f"no DICOM CT series or NIfTI volume found ({detail})")
    return index


def load_volumes(path: str | Path) -> tuple[list[CTVolume], list[tuple[str, str]]]:
    """Read everything under ``path``; return the volumes and (path, reason) of what failed."""
    index = index_input(path)
    volumes: list[CTVolume] = []
    skipped = list(index.skipped)
    for item in index.iter_volumes():
        if isinstance(item, InputError):
            skipped.append((item.path or str(index.root), item.reason))
        else:
            volumes.append(item)
    return volumes, skipped

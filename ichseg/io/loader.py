"""One entry point for any input the CLI accepts: a DICOM tree, NIfTI files, or a mix."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ichseg.errors import InputError
from ichseg.io.dicom import SeriesFiles, is_nifti, read_series, scan_files
from ichseg.io.nifti import nifti_stem, read_nifti, sidecar_path
from ichseg.io.walk import list_files
from ichseg.volume import CTVolume

log = logging.getLogger(__name__)


@dataclass
class InputIndex:
    """What an input path holds, found without decoding pixels.

    Attributes:
        root: the input path.
        dicom_series: DICOM CT series found (headers only).
        nifti_files: NIfTI files found.
        skipped: (path, reason) of files that cannot be used (not DICOM, not CT, broken links,
            ...). Slices dropped from a series are on the volume (``CTVolume.dropped``).
        ignored: (path, what) of DICOM objects without an image (DICOMDIR, reports), left out
            on purpose and not counted as skipped.
    """

    root: Path
    dicom_series: list[SeriesFiles] = field(default_factory=list)
    nifti_files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dicom_series) + len(self.nifti_files)

    def iter_volumes(self) -> Iterator[CTVolume | InputError]:
        """Yield each volume, or the error that stopped it, one at a time (bounded memory).

        DICOM series come first, then NIfTI files, one item each. A failure that is not an
        ``InputError`` (a reader bug, memory) becomes one too, naming the series or file, so
        one bad input never stops the others.
        """
        for series in self.dicom_series:
            yield _read_or_error(read_series, series, series.folder)
        for path in self.nifti_files:
            yield _read_or_error(read_nifti, path, path)


def _read_or_error(reader, source, where: Path) -> CTVolume | InputError:
    try:
        return reader(source)
    except InputError as error:
        return error
    except Exception as error:  # reported per input; --verbose logs the traceback
        log.debug("reading %s failed", where, exc_info=True)
        return InputError(where, f"unexpected {type(error).__name__} while reading: {error}")


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

    The tree is listed once (directory symlinks followed once, broken links skipped with a
    reason, see ``ichseg.io.walk``); DICOM headers are read, pixels are not.

    Raises:
        InputError: the path does not exist, or holds no CT at all.
    """
    root = Path(path)
    listing = list_files(root)
    nifti_files = sorted(p for p in listing.files if is_nifti(p))
    # A NIfTI's JSON sidecar is read with the NIfTI, not as a candidate DICOM file.
    sidecars = {sidecar_path(p) for p in nifti_files}
    scan = scan_files(p for p in listing.files if p not in sidecars)
    index = InputIndex(
        root=root,
        dicom_series=scan.series,
        nifti_files=nifti_files,
        skipped=listing.skipped + scan.skipped,
        ignored=scan.ignored,
    )
    if not index:
        if index.skipped:
            first_path, first_reason = index.skipped[0]
            detail = f"{len(index.skipped)} file(s) skipped, e.g. {first_path}: {first_reason}"
        elif index.ignored:
            detail = f"only {len(index.ignored)} DICOM object(s) without an image"
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

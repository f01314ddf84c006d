"""One entry point for any input the CLI accepts: a DICOM tree, NIfTI files, or a mix.

``index_input`` lists the input once and reads every DICOM header (in worker processes for
large inputs); ``InputIndex.iter_volumes`` then yields one volume at a time. For inputs of at
least ``MIN_PARALLEL_FILES`` DICOM files the pixels of the next series are decoded by worker
processes while the caller works on the current one (``predict``, ``segment``, ``inspect``):
each worker decodes its files with :func:`~ichseg.io.dicom.decode_slice` straight into a block
of shared memory that the series' ``read_series`` then copies from, so nothing is pickled but
a few numbers per slice and the volumes are those of the serial reader, bit for bit. Memory
stays bounded: at most ``PREFETCH_SERIES`` series ahead and ``PREFETCH_BYTES`` of shared
memory, and a series that does not fit is read in this process as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ichseg.errors import InputError
from ichseg.io.dicom import DecodedSlice, SeriesFiles, is_nifti, read_series, scan_files
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

    def iter_volumes(self, workers: int | None = None) -> Iterator[CTVolume | InputError]:
        """Yield each volume, or the error that stopped it, one at a time (bounded memory).

        DICOM series come first, then NIfTI files, one item each. A failure that is not an
        ``InputError`` (a reader bug, memory) becomes one too, naming the series or file, so
        one bad input never stops the others.

        Args:
            workers: processes decoding the series ahead (default: ``ICHSEG_WORKERS`` or the
                CPUs available; 1 decodes in this process). Inputs of fewer than
                ``MIN_PARALLEL_FILES`` DICOM files are decoded in this process.
        """
        from ichseg.io.workers import MIN_PARALLEL_FILES, resolve_workers

        workers = resolve_workers(workers)
        files = sum(len(s.headers) for s in self.dicom_series)
        if workers > 1 and files >= MIN_PARALLEL_FILES:
            with _Prefetcher(self.dicom_series, workers) as prefetcher:
                for series in self.dicom_series:
                    prefetcher.fill(series)
                    try:
                        yield _read_or_error(read_series, series, series.folder)
                    finally:
                        prefetcher.release(series)
        else:
            for series in self.dicom_series:
                yield _read_or_error(read_series, series, series.folder)
        for path in self.nifti_files:
            yield _read_or_error(read_nifti, path, path)


PREFETCH_SERIES = 2
"""Series decoded ahead of the one being read."""
PREFETCH_BYTES = 2 * 1024**3
"""Most shared memory held by decoded series waiting to be read (also at most a quarter of
what is free in ``/dev/shm``)."""
PREFETCH_CHUNK = 16
"""Slices per worker task."""


@dataclass
class _Block:
    """One series' shared memory and the decode tasks writing into it."""

    memory: object
    slots: dict[str, tuple[int, int, int]]  # path -> (offset, rows, columns)
    futures: list = field(default_factory=list)


class _Prefetcher:
    """Decodes the files of upcoming series in worker processes into shared memory."""

    def __init__(self, series: list[SeriesFiles], workers: int) -> None:
        from ichseg.io.workers import process_pool

        self.series = series
        self.position = {id(s): i for i, s in enumerate(series)}
        self.pool = process_pool(workers)
        self.blocks: dict[int, _Block] = {}
        self.next = 0  # index of the next series to submit
        self.broken = False

    def __enter__(self) -> _Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        for key in list(self.blocks):
            self._free(key)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _bytes_held(self) -> int:
        return sum(block.memory.size for block in self.blocks.values())  # type: ignore[attr-defined]

    def _submit_ahead(self, current: int) -> None:
        while (
            not self.broken
            and self.next < len(self.series)
            and self.next <= current + PREFETCH_SERIES
        ):
            series = self.series[self.next]
            block = self._allocate(series)
            if block is None and self.blocks and self.next > current:
                return  # no room now: try again once a block is freed
            self.next += 1
            if block is not None:
                self.blocks[id(series)] = block

    def _allocate(self, series: SeriesFiles) -> _Block | None:
        """Shared memory for the series' decodable slices and their decode tasks, or None when
        the series is left to ``read_series`` (too large, no room, nothing to decode)."""
        from multiprocessing import shared_memory

        from ichseg.io.dicom_header import max_volume_bytes
        from ichseg.io.dicom_pixels import pixel_problem

        slots: dict[str, tuple[int, int, int]] = {}
        offset = 0
        for header in series.headers:
            if pixel_problem(header) is None:
                slots[str(header.path)] = (offset, header.rows, header.columns)
                offset += header.rows * header.columns * 4
        if not slots or offset > min(max_volume_bytes(), PREFETCH_BYTES):
            return None
        if self._bytes_held() + offset > min(PREFETCH_BYTES, _shared_memory_free() // 4):
            return None
        try:
            memory = shared_memory.SharedMemory(create=True, size=offset)
        except OSError as error:
            log.debug("no shared memory for %s: %s", series.folder, error)
            return None
        block = _Block(memory, slots)
        items = [(path, *slot) for path, slot in slots.items()]
        for start in range(0, len(items), PREFETCH_CHUNK):
            chunk = items[start : start + PREFETCH_CHUNK]
            block.futures.append(self.pool.submit(_decode_into, memory.name, chunk))
        return block

    def fill(self, series: SeriesFiles) -> None:
        """Attach the series' decoded slices (``series.decoded``) and queue the next series."""
        from concurrent.futures.process import BrokenProcessPool

        current = self.position[id(series)]
        self._submit_ahead(current)
        block = self.blocks.get(id(series))
        if block is None:
            return
        decoded: dict[str, DecodedSlice | str] = {}
        buffer = block.memory.buf  # type: ignore[attr-defined]
        try:
            for future in block.futures:
                for path, outcome in future.result():
                    if isinstance(outcome, DecodedSlice) and outcome.hu is None:
                        offset, rows, columns = block.slots[path]
                        if outcome.shape == (rows, columns):
                            view = np.ndarray((rows, columns), np.float32, buffer, offset)
                            outcome.hu = view
                        else:
                            continue  # read_series decodes it again and reports the size
                    decoded[path] = outcome
        except BrokenProcessPool:
            log.warning("decoding workers stopped unexpectedly; reading in this process")
            self.broken = True
            decoded.clear()
            self._free(id(series))
            return
        series.decoded = decoded
        self._submit_ahead(current + 1)

    def release(self, series: SeriesFiles) -> None:
        """Forget the series' decoded slices and free its shared memory."""
        series.decoded = None
        self._free(id(series))

    def _free(self, key: int) -> None:
        block = self.blocks.pop(key, None)
        if block is None:
            return
        for future in block.futures:
            future.cancel()
        for future in block.futures:
            if not future.cancelled():
                try:
                    future.exception()  # wait: a worker may still be writing into the block
                except Exception:  # noqa: S110 - the pool is being torn down; nothing to report
                    pass
        memory = block.memory
        try:
            memory.unlink()  # type: ignore[attr-defined]
        except FileNotFoundError:
            pass
        try:
            memory.close()  # type: ignore[attr-defined]
        except BufferError:
            # A caller still holds a view; the mapping goes when that does.
            log.debug("shared memory of a series still in use; freed later")


def _shared_memory_free() -> int:
    """Bytes free where POSIX shared memory lives (no limit known: a large number)."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return 1 << 62
    return stats.f_bavail * stats.f_frsize


def _decode_into(
    name: str, items: list[tuple[str, int, int, int]]
) -> list[tuple[str, DecodedSlice | str]]:
    """Worker task: decode files into the shared block ``name`` at their offsets.

    Returns (path, outcome) per file: the :class:`DecodedSlice` without its array (the pixels
    are in the block, unless the decoded size differs from the header's), or the reason the
    pixels cannot be used.
    """
    from dataclasses import replace
    from multiprocessing import shared_memory

    from ichseg.io.dicom import decode_slice

    memory = shared_memory.SharedMemory(name=name)
    out: list[tuple[str, DecodedSlice | str]] = []
    try:
        for path, offset, rows, columns in items:
            try:
                result = decode_slice(Path(path))
            except InputError as error:
                out.append((path, error.reason))
                continue
            if result.shape == (rows, columns):
                target = np.ndarray((rows, columns), np.float32, memory.buf, offset)
                target[...] = result.hu
                del target
            out.append((path, replace(result, hu=None)))
    finally:
        memory.close()
    return out


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


def index_input(
    path: str | Path, workers: int | None = None, progress: bool | None = None
) -> InputIndex:
    """Find every DICOM series and NIfTI file under ``path`` (a file or a folder tree).

    The tree is listed once (directory symlinks followed once, broken links skipped with a
    reason, see ``ichseg.io.walk``); DICOM headers are read, pixels are not.

    Args:
        path: a file or a folder tree.
        workers: processes reading headers (default: ``ICHSEG_WORKERS`` or the CPUs
            available; inputs under ``MIN_PARALLEL_FILES`` files are read in this process).
        progress: a progress bar over the headers (default: for large inputs).

    Raises:
        InputError: the path does not exist, or holds no CT at all.
    """
    root = Path(path)
    listing = list_files(root)
    nifti_files = sorted(p for p in listing.files if is_nifti(p))
    # A NIfTI's JSON sidecar is read with the NIfTI, not as a candidate DICOM file.
    sidecars = {sidecar_path(p) for p in nifti_files}
    scan = scan_files(
        (p for p in listing.files if p not in sidecars), workers=workers, progress=progress
    )
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

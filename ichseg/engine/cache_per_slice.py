"""The slice cache built file by file: one parse per file, series assembled afterwards.

For DICOM-only data without intracranial masking (every preprocessing step works on one slice):
the RSNA layout, one flat folder of one-slice files whose series are complete only once the
whole folder has been read. :mod:`ichseg.engine.cache` describes the layout and chooses between
this build and the series-by-series one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ichseg.config import DataConfig, RunConfig
from ichseg.engine.cache_format import (
    CACHE_VERSION,
    PER_SLICE,
    SliceSet,
    cache_key,
    check_disk_space,
    open_slices,
    shard_name,
)
from ichseg.errors import InputError
from ichseg.fileio import write_json
from ichseg.volume import patient_id_of

log = logging.getLogger(__name__)

PER_SLICE_BATCH = 32
"""Most decoded slices a worker holds for windowing as one stack (slices of sizes the
stored-value tables do not cover; the others are windowed one by one as they are read)."""
PER_SLICE_BYTES = 16 * 1024**2
"""...and at most this many bytes of windowed float32 per stack (five 512 x 512 slices with three
windows). Below glibc's largest mmap threshold (32 MiB), so the stack's arrays reuse freed heap
memory instead of fresh pages: on a VM where first-touching a page is slow, stacks of 32
slices of 512 px made windowing several times slower."""


def per_slice_files(source, preprocessor) -> np.ndarray | None:
    """The files to cache one by one, or None when whole volumes are needed.

    Per-slice caching needs a source that offers its files (DICOM only) and a preprocessor whose
    every step works on single slices: no intracranial masking and no head crop (the segmenter
    and the crop box see the whole series).
    """
    offer = getattr(source, "per_slice_files", None)
    if offer is None or preprocessor.whole_volume or preprocessor.source_kind != "hu":
        return None
    return offer()


def build_per_slice(
    config: RunConfig,
    preprocessor,
    source,
    cache_root: Path,
    files: np.ndarray,
    progress: bool,
    workers: int | None,
    shard_slices: int,
) -> SliceSet:
    """The slice cache of a DICOM source, built file by file (the RSNA layout: one flat folder
    of one-slice files, series complete only once the whole folder is read).

    Args:
        config: the run config (``data`` matters).
        preprocessor: the run's preprocessor (no masking: see :func:`per_slice_files`).
        source: the data source (its labels, patient ids and scan attributes).
        cache_root: where caches live.
        files: the files to cache, from :func:`per_slice_files`.
        progress: progress output.
        workers: processes that build shards (``data.workers`` wins when set).
        shard_slices: files per shard.

    Raises:
        InputError: no files, not enough disk, or no usable labelled slice.
    """
    from ichseg.io.workers import MIN_PARALLEL_FILES, ordered_map, resolve_workers
    from ichseg.progress import progress as progress_bar

    data = config.data
    identity = source.identity()
    key = cache_key(preprocessor.describe(), {**identity, "layout": PER_SLICE})
    folder = cache_root / f"slices-{key}"
    if (folder / "done.json").exists():
        return open_slices(folder)
    count = len(files)
    if count == 0:
        raise InputError(data.root, "the data source holds no files")
    per_slice = len(data.windows) * data.image_size**2
    estimate = count * (per_slice + INDEX_BYTES_PER_SLICE)
    folder.mkdir(parents=True, exist_ok=True)
    check_disk_space(folder, estimate)
    shards = per_slice_plan(count, shard_slices)
    plan_path = folder / "plan.json"
    if plan_path.exists():
        # A half-built cache of the same files (same key) resumes with its own shard
        # boundaries, whatever shard size this build would choose: the arrays are the same.
        earlier = json.loads(plan_path.read_text())
        if earlier.get("files") != count or not earlier.get("shards"):
            raise InputError(folder, "a different build plan exists here; remove the folder")
        shards = earlier["shards"]
    plan = {
        "version": CACHE_VERSION,
        "layout": PER_SLICE,
        "files": count,
        "shards": shards,
        "estimated_bytes": estimate,
        "preprocess": preprocessor.describe(),
        "data": identity,
    }
    write_json(plan_path, plan)
    for path, reason in source.listing().skipped:
        log.warning("skipped %s: %s", path, reason)
    missing = [i for i in range(len(shards)) if not (folder / shard_name(i)).is_dir()]
    if progress:
        log.warning(
            "slice cache %s: %d file(s), ~%.2f GB, %d of %d shard(s) to build",
            folder,
            count,
            estimate / 1e9,
            len(missing),
            len(shards),
        )
    workers = resolve_workers(data.workers if data.workers is not None else workers)
    config_json = config.model_dump(mode="json")
    jobs = [(str(folder), i, files[shards[i][0] : shards[i][1]], config_json) for i in missing]
    bar = progress_bar(
        total=sum(len(job[2]) for job in jobs), desc="cache", unit="file", enabled=progress
    )
    # The shards' header tables as their builds return them, so that assembling the series
    # does not read them back from disk (a resumed build's earlier shards are read).
    tables: dict[int, Any] = {}
    # Starting workers costs about a second of imports each: not worth it for a few hundred
    # files.
    if workers > 1 and len(jobs) > 1 and count >= MIN_PARALLEL_FILES:
        built = ordered_map(_build_file_shard_job, jobs, min(workers, len(jobs)))
    else:
        built = (_build_file_shard(*job, preprocessor=preprocessor) for job in jobs)
    for job, shard in zip(jobs, built, strict=True):
        bar.update(shard.files)
        if shard.table is not None:
            tables[job[1]] = shard.table
        del shard  # so that ``tables`` alone holds the table, and the finish can release it
    bar.close()
    _finish_per_slice(folder, len(shards), source, data, tables)
    return open_slices(folder)


TAIL_SHARDS = 4
"""Shards' worth of files at the end of a file-by-file build that are cut four times finer."""


def per_slice_plan(count: int, shard_files: int) -> list[list[int]]:
    """``[start, end)`` file ranges of the shards of a file-by-file build, in file order.

    Shards hold ``shard_files`` files, except the last ``TAIL_SHARDS * shard_files`` files,
    which go in shards a quarter that size: the workers take shards in order, so the last ones
    decide how long one worker runs alone after the others have finished (on 2 cores, a
    256-file shard left to one worker was about a tenth of a 4,096-file build).
    """
    fine = max(1, shard_files // 4)
    tail = min(count, TAIL_SHARDS * shard_files) if shard_files > 1 else 0
    head = count - tail
    shards = [[start, min(head, start + shard_files)] for start in range(0, head, shard_files)]
    shards += [[start, min(count, start + fine)] for start in range(head, count, fine)]
    return shards


INDEX_BYTES_PER_SLICE = 3000
"""Disk for a slice's entries in the shard tables and the final index (an upper bound: 2.7 KB
measured with 256-file shards)."""


class ShardBuilt(NamedTuple):
    """What building one shard gives: the files it handled, and its header table (None when
    the shard had been built already)."""

    files: int
    table: Any = None


def _build_file_shard_job(job: tuple) -> ShardBuilt:
    """Process-pool entry point: one shard of files, preprocessor rebuilt in the worker.

    The pool's workers run one OpenMP thread each (``ichseg.io.workers``), which torch picks
    up if a resize imports it; without a resize, or with an exact twofold shrink (numpy), torch
    is never imported.
    """
    return _build_file_shard(*job)


def _build_file_shard(
    folder: str, shard: int, paths: np.ndarray, config_json: dict[str, Any], preprocessor=None
) -> ShardBuilt:
    """Parse each file once, write the windows of every decoded slice to the shard's
    ``images.u8`` and its header fields to ``files.npz``; returns the files handled and the
    header table.

    A slice the preprocessor's stored-value tables cover is windowed right after its parse;
    the others wait for a stack of at most ``PER_SLICE_BATCH`` slices and ``PER_SLICE_BYTES``
    of windowed float32, so a worker holds a bounded number of slices whatever the shard size.
    """
    from ichseg.config import validate_config
    from ichseg.io.dicom import parse_file
    from ichseg.io.dicom_table import DicomTable
    from ichseg.preprocess.pipeline import Preprocessor

    if (Path(folder) / shard_name(shard)).is_dir():
        # Built already: a pool that broke recomputes, in the parent, shards it had finished.
        return ShardBuilt(len(paths))
    config = validate_config(config_json, "cache worker")
    data = config.data
    preprocessor = preprocessor or Preprocessor.from_parts(data, config.masking, None, config.name)
    table = DicomTable()
    tmp = Path(folder) / f".{shard_name(shard)}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    written = 0
    try:
        with open(tmp / "images.u8", "wb") as images:
            # Parsed files from the first slice that waits for a stack on, in file order, not
            # yet in the table (the others go straight in), with their rows and flags by id.
            pending: list[Any] = []
            rows: dict[int, int] = {}
            keep: dict[int, bool] = {}
            stacked = stacked_bytes = 0  # slices in pending that still hold their pixels

            def flush() -> None:
                nonlocal written, stacked, stacked_bytes
                written = _window_stacks(pending, preprocessor, images, written, rows, keep)
                for parsed in pending:
                    table.append(parsed, rows.pop(id(parsed), -1), keep.pop(id(parsed), False))
                pending.clear()
                stacked = stacked_bytes = 0

            for raw_path in paths:
                parsed = parse_file(Path(os.fsdecode(raw_path)), keep_stored=True)
                decoded = parsed.decoded
                row, kept = -1, False
                if decoded is not None:
                    # Windowed at once, while its pixels are still in the CPU's cache:
                    # windowing a batch of 512 px slices after reading them cost ~15 % more.
                    looked_up = preprocessor.stored_slice(decoded.stored, decoded.rescale)
                    if looked_up is None:
                        stacked += 1
                        stacked_bytes += decoded.stored.size * 4 * len(data.windows)
                    else:
                        decoded.stored = None  # the table keeps no pixels
                        # Written from the array itself: a bytes copy of every slice cost
                        # as much as the write.
                        images.write(np.ascontiguousarray(looked_up[0]))
                        row, kept, written = written, looked_up[1], written + 1
                if not stacked:
                    table.append(parsed, row, kept)
                    continue
                if row >= 0:
                    rows[id(parsed)], keep[id(parsed)] = row, kept
                pending.append(parsed)
                if stacked >= PER_SLICE_BATCH or stacked_bytes >= PER_SLICE_BYTES:
                    flush()
            flush()
        table.save(tmp / "files.npz")
        shape = [len(data.windows), data.image_size, data.image_size]
        write_json(tmp / "meta.json", {"count": written, "shape": shape, "files": len(paths)})
        os.replace(tmp, Path(folder) / shard_name(shard))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ShardBuilt(len(paths), table.compact())


def _window_stacks(
    pending: list[Any],
    preprocessor,
    images,
    first_row: int,
    rows: dict[int, int],
    keep: dict[int, bool],
) -> int:
    """Window the slices of ``pending`` that still hold their stored values (those the lookup
    tables do not cover), append them to ``images`` and record their rows and slice-filter
    flags in ``rows`` and ``keep`` (by ``id``); returns the next free row.

    They are converted to HU and windowed in stacks of one size (the preprocessor works on
    stacks), each stack with the same steps as a whole volume.
    """
    from ichseg.volume import CTVolume

    by_shape: dict[tuple[int, ...], list[tuple[Any, np.ndarray]]] = {}
    for parsed in pending:
        decoded = parsed.decoded
        if decoded is None or decoded.stored is None:
            continue
        stored, rescale = decoded.stored, decoded.rescale
        decoded.stored = None  # the table keeps no pixels
        by_shape.setdefault(stored.shape, []).append((parsed, rescale.hu(stored)))
    row = first_row
    for items in by_shape.values():
        stack = np.stack([hu for _, hu in items])
        # Every unmasked step is per slice, so a stack of unrelated slices gives each slice
        # what its own volume would.
        volume = CTVolume(stack, np.eye(4), "", "", np.arange(len(items), dtype=np.float64))
        prepared = preprocessor(volume)
        images.write(np.ascontiguousarray(prepared.base))
        for k, (parsed, _) in enumerate(items):
            rows[id(parsed)] = row + k
            keep[id(parsed)] = bool(prepared.keep[k])
        row += len(items)
    return row


def _finish_per_slice(
    folder: Path, shard_count: int, source, data: DataConfig, tables_built: dict[int, Any]
) -> None:
    """Group the cached slices into series with the series reader's rules and write the index
    (labels, patient and series ids, slice order, 2.5D neighbour rows), then ``done.json``.

    Works on the shards' compact tables only (no pixels), one series at a time:
    ``tables_built`` by shard (taken out of the dict as they are used), the others read from
    the shards' ``files.npz``.
    """
    from ichseg.io.dicom import series_layout
    from ichseg.io.dicom_table import DicomTable
    from ichseg.preprocess.windowing import neighbour_index

    tables, total = [], 0
    for i in range(shard_count):
        shard = folder / shard_name(i)
        meta = json.loads((shard / "meta.json").read_text())
        # Taken out of the caller's dict, so that only the concatenated table outlives this
        # loop (at RSNA scale the tables are a few hundred MB).
        table = tables_built.pop(i, None)
        if table is None:
            table = DicomTable.load(shard / "files.npz")
        rows = table.columns["image_row"]
        table.columns["image_row"] = np.where(rows >= 0, rows + total, -1)
        total += int(meta["count"])
        tables.append(table)
    table = DicomTable.concatenate(tables)
    del tables
    width = 2 * data.context + 1
    labels = np.full((total, 6), np.nan, dtype=np.float32)
    slice_index = np.full(total, -1, dtype=np.int64)
    trainable = np.zeros(total, dtype=bool)
    neighbours = np.repeat(np.arange(total, dtype=np.int64)[:, None], width, axis=1)
    group_code = np.full(total, -1, dtype=np.int64)
    series_code = np.full(total, -1, dtype=np.int64)
    file_of_row = np.full(total, -1, dtype=np.int64)
    image_rows = table.columns["image_row"]
    used = image_rows >= 0
    file_of_row[image_rows[used]] = np.flatnonzero(used)
    groups: list[str] = []
    group_codes: dict[str, int] = {}
    series_names: list[str] = []
    skipped: list[dict[str, str]] = [
        {"unit": f"file:{path}", "reason": reason}
        for path, reason, ignored in table.skipped()
        if not ignored
    ]
    for entry in skipped:
        log.warning("cache: skipped %s: %s", entry["unit"][5:], entry["reason"])
    attribute_index = np.full(total, -1, dtype=np.int32)
    records: dict[str, int] = {}
    for uid, rows in table.series_rows():
        try:
            layout = series_layout(table.series(uid, rows))
        except InputError as error:
            skipped.append({"unit": f"dicom:{uid}", "reason": str(error)})
            log.warning("cache: skipped %s", error)
            continue
        for warning in layout.warnings:
            log.info("cache: dicom:%s: %s", uid, warning)
        patient = source.patient_id(layout.source, patient_id_of(layout.metadata, uid))
        sops = [h.sop_uid for h in layout.headers]
        volume_labels = source.labels_for(sops, patient)
        if np.isnan(volume_labels[:, 0]).all():
            log.info("cache: no labels for any slice of %s", layout.source)
        by_path = {os.fsdecode(table.columns["path"][r]): r for r in rows}
        files = np.array([by_path[str(h.path)] for h in layout.headers], dtype=np.int64)
        volume_rows = image_rows[files]
        labels[volume_rows] = volume_labels
        slice_index[volume_rows] = np.arange(len(files))
        trainable[volume_rows] = ~np.isnan(volume_labels[:, 0]) & table.columns["keep"][files]
        neighbours[volume_rows] = volume_rows[neighbour_index(len(files), data.context)]
        if patient not in group_codes:
            group_codes[patient] = len(groups)
            groups.append(patient)
        group_code[volume_rows] = group_codes[patient]
        record = _layout_attributes(layout, source, patient)
        attribute_index[volume_rows] = records.setdefault(
            json.dumps(record, sort_keys=True), len(records)
        )
        series_code[volume_rows] = len(series_names)
        series_names.append(uid)
    if not trainable.any():
        raise InputError(data.root, "no usable labelled slices found (see warnings for skips)")
    sop_bytes = table.columns["sop_uid"][np.maximum(file_of_row, 0)]
    sop_bytes[file_of_row < 0] = b""
    write_arrays = {
        "labels": labels,
        "classes": np.zeros(0, dtype=np.int64),
        "groups": _names(groups, group_code),
        "series": _names(series_names, series_code),
        "sop_uids": np.char.decode(sop_bytes, "utf-8", "surrogateescape").astype(str),
        "slice_index": slice_index,
        "trainable": trainable,
        "neighbours": neighbours,
        "attributes": attribute_index,
    }
    write_json(folder / "attributes.json", [json.loads(text) for text in records])
    tmp = folder / f".index.{uuid.uuid4().hex[:8]}.npz"
    np.savez(tmp, **write_arrays)
    os.replace(tmp, folder / "index.npz")
    write_json(folder / "skipped.json", skipped)
    meta = {"label_level": source.label_level, "has_classes": False, "class_names": None}
    write_json(folder / "index.json", meta)
    write_json(
        folder / "done.json", {"version": CACHE_VERSION, "shards": shard_count, "layout": PER_SLICE}
    )


def _layout_attributes(layout, source, patient: str) -> dict[str, Any]:
    """A series' scan-attribute record from its headers alone (no pixels at this stage, so
    no air statistics), merged with the demographics CSV's row as for whole volumes."""
    from ichseg.io.attributes import merge, series_attributes

    norms = np.linalg.norm(layout.affine[:3, :3], axis=0)
    spacing_x, spacing_y, spacing_z = (float(v) for v in norms)
    first = layout.headers[0]
    shape = (len(layout.headers), first.rows, first.columns)
    record = series_attributes(layout.metadata, (spacing_z, spacing_y, spacing_x), shape)
    return merge(record, source.demographics([], layout.series_uid, patient))


def _names(names: list[str], codes: np.ndarray) -> np.ndarray:
    """Strings by code (``""`` for -1), as one numpy string array."""
    table = np.array([*names, ""], dtype=str)
    return table[np.where(codes >= 0, codes, len(names))]

"""The slice cache: preprocessed classifier input on disk, sharded, parallel and resumable.

Layout of ``<cache_root>/slices-<key>/``::

    plan.json              units (series, studies, image chunks) -> shards, size estimate
    shard-00000/           one finished shard (appears by an atomic rename, never half-written)
        images.u8          uint8 (n, W, S, S): the W windows of each cached slice
        index.npz          labels, classes, patient/series ids, SOP UIDs, slice indices,
                           trainable flags, 2.5D neighbour rows (local to the shard), and
                           each slice's row in attributes.json
        attributes.json    the distinct scan-attribute records of the shard (age, sex,
                           scanner, ...; see ichseg.io.attributes), one per series at most
        skipped.json       units of this shard that could not be read, with reasons
    done.json              written last: the cache is complete

The key hashes what changes the arrays (the preprocessor's description and the data's identity)
and nothing else, so runs that differ only in training settings, seeds or splits share one
cache. Shards are built by worker processes; a build that is killed keeps its finished shards,
and the next build makes only the missing ones (the plan is deterministic, so the result is the
same arrays). Only the windows are stored: 2.5D neighbours are gathered when a sample is read,
so a context of k costs no extra disk.

Two ways to build, the same arrays:

* **Per slice** (DICOM-only data, no intracranial masking or head crop: every step works on one
  slice). Units are files: shards are consecutive runs of ``n`` files of the sorted listing
  (``n = PER_SLICE_SHARD_FILES``, 256), the last ``4 n`` files in runs of ``n / 4`` so that
  the workers finish together (``per_slice_plan``; ``plan.json`` keeps the ranges, and a
  resumed build uses its own). A worker parses each file once from memory
  (``ichseg.io.dicom.parse_file``, header and stored pixel values), windows the slice through
  the preprocessor's lookup tables of every stored value (``Preprocessor.stored_slice``: the
  same arrays as the float steps, without computing them per pixel), appends it to the shard's
  ``images.u8``, and keeps the file's header fields in the shard's
  ``files.npz`` (``ichseg.io.dicom_table``, ~280 bytes a file). When every shard is done, the
  series are assembled from those tables with the series reader's rules
  (``ichseg.io.dicom.series_layout``, one series at a time, no pixels) and one ``index.npz``
  holds labels, ids, slice order and 2.5D neighbour rows for all rows (rows of slices that no
  series kept stay in ``images.u8`` but are never trainable). Nothing per file is held in
  Python objects beyond the compact tables: a worker's memory does not grow with the folder;
  the building process holds the listing and, at the end, the tables (numbers in
  ``benchmarks/README.md``). This is the path for the RSNA layout, one flat folder of ~750,000
  one-slice files whose series are complete only once the whole folder has been read.
* **Per series** (masked runs, NIfTI, phantoms, pictures). Volume-level steps need the series
  assembled: the intracranial mask is predicted on the whole volume and the crop box is one
  per volume. Units are series: headers are read first (``index_input``, in workers), then each
  worker reads whole series (``read_series``) and preprocesses them. Each DICOM file is parsed
  twice (header pass, then decoding: about 1.3-1.6x the CPU of one pass) and the header pass
  keeps one ``SliceHeader`` per file in the building process (measured 2.3 KB each: ~1.7 GB
  for the RSNA folder), plus the segmenter's time per volume.

This module builds series by series and chooses the build; ``ichseg.engine.cache_per_slice``
builds file by file and ``ichseg.engine.cache_format`` holds the key and opens a finished cache.
Every public name is importable from here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import DataConfig, MaskingConfig, RunConfig
from ichseg.engine.cache_format import (
    CACHE_VERSION,
    DISK_MARGIN,
    PER_SLICE,
    ShardedImages,
    SliceSet,
    cache_key,
    cached_skips,
    check_disk_space,
    default_cache_root,
    open_slices,
    shard_name,
)
from ichseg.engine.cache_per_slice import (
    INDEX_BYTES_PER_SLICE,
    PER_SLICE_BATCH,
    PER_SLICE_BYTES,
    build_per_slice,
    per_slice_files,
)
from ichseg.errors import ConfigError, InputError
from ichseg.fileio import write_json

__all__ = [
    "CACHE_VERSION",
    "DISK_MARGIN",
    "INDEX_BYTES_PER_SLICE",
    "PER_SLICE",
    "PER_SLICE_BATCH",
    "PER_SLICE_BYTES",
    "SHARD_SLICES",
    "ShardedImages",
    "SliceSet",
    "build_slices",
    "cache_key",
    "cached_skips",
    "default_cache_root",
    "open_slices",
]

log = logging.getLogger(__name__)
SHARD_SLICES = 2048
"""Target slices per shard: small enough to lose little on a kill, large enough to be few."""
PER_SLICE_SHARD_FILES = 256
"""Files per shard of a file-by-file build: each shard is one task for a worker process
(about half a second of work), so that a folder of a few thousand files already keeps every
worker busy to the end; 750,000 files make ~2,900 shards."""


def _plan(units: list, shard_slices: int) -> list[list[int]]:
    """Consecutive units per shard, about ``shard_slices`` slices each (at least one unit)."""
    shards: list[list[int]] = []
    current: list[int] = []
    count = 0
    for i, unit in enumerate(units):
        current.append(i)
        count += max(unit.slices, 1)
        if count >= shard_slices:
            shards.append(current)
            current, count = [], 0
    if current:
        shards.append(current)
    return shards


def _estimate_bytes(units: list, per_slice: int) -> int:
    return int(sum(max(u.slices, 0) for u in units) * per_slice)


def build_slices(
    config: RunConfig,
    preprocessor=None,
    cache_root: Path | None = None,
    progress: bool = True,
    workers: int | None = None,
    shard_slices: int | None = None,
    per_slice: bool | None = None,
) -> SliceSet:
    """Preprocess the configured data into the cache (missing shards only) and open it.

    Args:
        config: the run config (``data`` and ``masking`` matter).
        preprocessor: the run's :class:`~ichseg.preprocess.pipeline.Preprocessor`; built from
            the config when None.
        cache_root: where caches live (default ``data.cache_dir``, ``$ICHSEG_CACHE`` or
            ``~/.cache/ichseg``).
        progress: progress output.
        workers: processes that build shards (default ``data.workers``, else the CPUs this
            process may use); 0 or 1 builds in this process.
        shard_slices: target slices per shard (per-slice builds: files per shard); default
            ``SHARD_SLICES``, or ``PER_SLICE_SHARD_FILES`` for per-slice builds.
        per_slice: build file by file (see the module docstring); None: whenever the source
            and the preprocessor allow it, False: series by series.

    Raises:
        InputError: no usable labelled slice, or not enough disk for the estimate.
    """
    from ichseg.engine.sources import make_source
    from ichseg.io.workers import process_pool, resolve_workers
    from ichseg.preprocess.pipeline import Preprocessor
    from ichseg.progress import progress as progress_bar

    data = config.data
    preprocessor = preprocessor or Preprocessor.from_config(config)
    cache_root = Path(cache_root or data.cache_dir or default_cache_root())
    source = make_source(data, cache_root)
    files = None if per_slice is False else per_slice_files(source, preprocessor)
    if per_slice and files is None:
        raise ConfigError(
            "a per-slice cache needs DICOM-only data, no intracranial masking and no head crop "
            "(both work on whole series)"
        )
    if files is not None:
        return build_per_slice(
            config,
            preprocessor,
            source,
            cache_root,
            files,
            progress,
            workers,
            shard_slices or PER_SLICE_SHARD_FILES,
        )
    folder = cache_root / f"slices-{cache_key(preprocessor.describe(), source.identity())}"
    if (folder / "done.json").exists():
        return open_slices(folder)
    shard_slices = shard_slices or SHARD_SLICES
    units = sorted(source.units(), key=lambda u: u.key)
    if not units:
        raise InputError(data.root or folder, "the data source holds no volumes or images")
    windows = 3 if data.source == "images" and preprocessor.channels != 1 else len(data.windows)
    per_slice = windows * data.image_size**2
    estimate = _estimate_bytes(units, per_slice)
    folder.mkdir(parents=True, exist_ok=True)
    check_disk_space(folder, estimate)
    shards = _plan(units, shard_slices)
    plan = {
        "version": CACHE_VERSION,
        "units": [u.key for u in units],
        "shards": shards,
        "estimated_bytes": estimate,
        "preprocess": preprocessor.describe(),
        "data": source.identity(),
    }
    plan_path = folder / "plan.json"
    if plan_path.exists() and json.loads(plan_path.read_text()).get("shards") != shards:
        raise InputError(folder, "a different build plan exists here; remove the folder")
    write_json(plan_path, plan)
    missing = [i for i in range(len(shards)) if not (folder / shard_name(i)).is_dir()]
    if progress:
        log.warning(
            "slice cache %s: %d unit(s), ~%.2f GB, %d of %d shard(s) to build",
            folder,
            len(units),
            estimate / 1e9,
            len(missing),
            len(shards),
        )
    workers = resolve_workers(data.workers if data.workers is not None else workers)
    jobs = [
        (
            str(folder),
            i,
            [units[j] for j in shards[i]],
            config.model_dump(mode="json"),
            str(preprocessor.segmenter_path) if preprocessor.segmenter_path else None,
            str(cache_root),
        )
        for i in missing
    ]
    bar = progress_bar(total=len(jobs), desc="cache", unit="shard", enabled=progress)
    if workers > 1 and len(jobs) > 1:
        # The readers' pool: never a fork of this process (its torch threads could deadlock
        # the copy), one OpenMP thread per worker, workers stop with their caller.
        with process_pool(min(workers, len(jobs))) as pool:
            for future in as_completed([pool.submit(_build_shard_job, job) for job in jobs]):
                future.result()
                bar.update(1)
    else:
        for job in jobs:
            _build_shard(*job, source=source, preprocessor=preprocessor)
            bar.update(1)
    bar.close()
    count = sum(
        int(json.loads((folder / shard_name(i) / "meta.json").read_text())["trainable"])
        for i in range(len(shards))
    )
    if count == 0:
        where = data.root if data.source != "phantom" else folder
        raise InputError(where, "no usable labelled slices found (see warnings for skips)")
    write_json(folder / "done.json", {"version": CACHE_VERSION, "shards": len(shards)})
    return open_slices(folder)


def _build_shard_job(job: tuple) -> None:
    """Process-pool entry point: rebuild the source and preprocessor in the worker."""
    import torch

    torch.set_num_threads(1)  # one process per core; threads would oversubscribe
    _build_shard(*job)


def _build_shard(
    folder: str,
    shard: int,
    units: list,
    config_json: dict[str, Any],
    segmenter: str | None,
    cache_root: str,
    source=None,
    preprocessor=None,
) -> None:
    from ichseg.config import validate_config
    from ichseg.engine.sources import iter_units, make_source
    from ichseg.preprocess.pipeline import Preprocessor
    from ichseg.preprocess.windowing import neighbour_index

    config = validate_config(config_json, "cache worker")
    data: DataConfig = config.data
    masking: MaskingConfig = config.masking
    source = source or make_source(data, Path(cache_root))
    preprocessor = preprocessor or Preprocessor.from_parts(data, masking, segmenter, config.name)
    parts: dict[str, list[Any]] = {
        k: []
        for k in (
            "images",
            "labels",
            "classes",
            "groups",
            "series",
            "sop",
            "index",
            "train",
            "nbr",
            "attr",
        )
    }
    # Distinct attribute records (JSON text -> row): a volume's slices share one.
    records: dict[str, int] = {}
    skipped: list[dict[str, str]] = []
    rows = 0
    for unit, item in iter_units(source, units):
        if isinstance(item, InputError):
            skipped.append({"unit": unit.key, "reason": str(item)})
            log.warning("cache: skipped %s", item)
            continue
        for warning in item.warnings:
            log.info("cache: %s: %s", unit.key, warning)
        labelled = ~np.isnan(item.labels[:, 0])
        if item.volume is not None:
            prepared = preprocessor(item.volume)
            base, keep = prepared.base, prepared.keep
            neighbours = neighbour_index(len(base), data.context)
        else:
            base = np.stack([preprocessor.image(p) for p in item.images])
            keep = np.ones(len(base), dtype=bool)
            neighbours = np.arange(len(base))[:, None]
        trainable = labelled & keep
        # Without 2.5D context only trainable slices are needed; with it, their neighbours too.
        stored = trainable.copy()
        if data.context:
            stored[np.unique(neighbours[trainable])] = True
        where = np.flatnonzero(stored)
        local = -np.ones(len(base), dtype=np.int64)
        local[where] = rows + np.arange(where.size)
        parts["images"].append(base[where])
        parts["labels"].append(item.labels[where])
        if item.classes is not None:
            parts["classes"].append(item.classes[where])
        parts["groups"] += [item.groups[z] for z in where]
        parts["series"] += [item.series[z] for z in where]
        parts["sop"] += [item.sop_uids[z] for z in where]
        parts["index"].append(where)
        parts["train"].append(trainable[where])
        parts["nbr"].append(local[neighbours[where]])
        parts["attr"].append(_attribute_rows(item.attributes, where, records))
        rows += where.size
    tmp = Path(folder) / f".{shard_name(shard)}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        images = (
            np.concatenate(parts["images"])
            if parts["images"]
            else np.zeros((0, 1, data.image_size, data.image_size), np.uint8)
        )
        images.tofile(tmp / "images.u8")
        width = 2 * data.context + 1
        np.savez(
            tmp / "index.npz",
            labels=_cat(parts["labels"], (0, 6), np.float32),
            classes=_cat(parts["classes"], (0,), np.int64),
            groups=np.array(parts["groups"], dtype=str),
            series=np.array(parts["series"], dtype=str),
            sop_uids=np.array(parts["sop"], dtype=str),
            slice_index=_cat(parts["index"], (0,), np.int64),
            trainable=_cat(parts["train"], (0,), bool),
            neighbours=_cat(parts["nbr"], (0, width), np.int64),
            attributes=_cat(parts["attr"], (0,), np.int32),
        )
        write_json(tmp / "attributes.json", [json.loads(text) for text in records])
        meta = {
            "count": int(images.shape[0]),
            "shape": list(images.shape[1:]),
            "trainable": int(_cat(parts["train"], (0,), bool).sum()),
            "has_classes": bool(parts["classes"]),
            "class_names": source.class_names() if hasattr(source, "class_names") else None,
            "label_level": source.label_level,
        }
        write_json(tmp / "meta.json", meta)
        write_json(tmp / "skipped.json", skipped)
        os.replace(tmp, Path(folder) / shard_name(shard))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _attribute_rows(
    attributes: list[dict[str, Any]], where: np.ndarray, records: dict[str, int]
) -> np.ndarray:
    """Rows in ``records`` of the stored slices' attributes (-1 when a unit has none)."""
    if not attributes:
        return np.full(where.size, -1, dtype=np.int32)
    seen: dict[int, int] = {}  # id of a record object -> its row, since volumes share one
    out = np.empty(where.size, dtype=np.int32)
    for position, z in enumerate(where):
        record = attributes[z]
        if id(record) not in seen:
            text = json.dumps(record, sort_keys=True)
            seen[id(record)] = records.setdefault(text, len(records))
        out[position] = seen[id(record)]
    return out


def _cat(arrays: list[np.ndarray], empty_shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(empty_shape, dtype)

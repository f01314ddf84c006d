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

* **Per slice** (DICOM-only data, no intracranial masking: every preprocessing step works on one
  slice). Units are files: shard ``i`` is files ``[i * shard_slices, (i + 1) * shard_slices)``
  of the sorted listing. A worker parses each file once (``ichseg.io.dicom.parse_file``),
  windows its slice with the run's preprocessor a few slices at a time (``PER_SLICE_BATCH``) and
  appends them to the shard's ``images.u8``, and keeps the file's header fields in the shard's
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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import DataConfig, MaskingConfig, RunConfig, TaskConfig
from ichseg.errors import ConfigError, InputError
from ichseg.fileio import write_json

log = logging.getLogger(__name__)

# 3: per-slice scan attributes; 4: slices shrunk past twofold resized with antialiasing.
CACHE_VERSION = 4
SHARD_SLICES = 2048
"""Target slices per shard: small enough to lose little on a kill, large enough to be few."""
DISK_MARGIN = 1.05


def default_cache_root() -> Path:
    return Path(os.environ.get("ICHSEG_CACHE", Path.home() / ".cache" / "ichseg"))


def cache_key(description: dict[str, Any], identity: dict[str, Any]) -> str:
    import hashlib

    payload = {"version": CACHE_VERSION, "preprocess": description, "data": identity}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ShardedImages:
    """Read-only ``(N, W, S, S)`` uint8 view over the shards' memory maps."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.offsets = np.r_[0, np.cumsum([len(a) for a in arrays])].astype(np.int64)
        self.shape = (int(self.offsets[-1]), *(arrays[0].shape[1:] if arrays else (0, 0, 0)))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        indices = np.atleast_1d(np.asarray(index, dtype=np.int64))
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((indices.size, *self.shape[1:]), dtype=np.uint8)
        for position, (s, i) in enumerate(zip(shard, indices, strict=True)):
            out[position] = self.arrays[s][i - self.offsets[s]]
        return out.reshape(*np.shape(index), *self.shape[1:]) if np.ndim(index) else out[0]


@dataclass
class SliceSet:
    """Cached slices and their labels.

    Attributes:
        images: the windows of every cached slice, ``(N, W, S, S)``.
        neighbours: ``(N, 2k+1)`` global rows of each slice's 2.5D neighbours.
        labels: ``(N, 6)`` float32 in SUBTYPES order, NaN where unknown.
        classes: ``(N,)`` int64 class index for picture datasets in multiclass mode, else None.
        class_names: names of ``classes``.
        groups: patient id per slice; series: series id; sop_uids; slice_index (in its volume).
        trainable: slices that are labelled and pass the slice filter (the others are kept
            only as 2.5D neighbours).
        label_level: ``"slice"`` or ``"series"`` (scan-level labels copied to slices).
        folder: the cache folder.
        attribute_index: ``(N,)`` row of each slice in ``attribute_records`` (-1: none known).
        attribute_records: distinct scan-attribute records (``ichseg.io.attributes.FIELDS``).
    """

    images: ShardedImages
    neighbours: np.ndarray
    labels: np.ndarray
    classes: np.ndarray | None
    class_names: list[str] | None
    groups: np.ndarray
    series: np.ndarray
    sop_uids: np.ndarray
    slice_index: np.ndarray
    trainable: np.ndarray
    label_level: str
    folder: Path
    attribute_index: np.ndarray | None = None
    attribute_records: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def attribute(self, name: str) -> np.ndarray:
        """``(N,)`` object array of one scan attribute per slice (None where unknown)."""
        out = np.full(len(self.labels), None, dtype=object)
        if self.attribute_index is None or not self.attribute_records:
            return out
        values = np.array([r.get(name) for r in self.attribute_records] + [None], dtype=object)
        return values[self.attribute_index]  # -1 picks the trailing None

    def usable(self) -> np.ndarray:
        """Rows that training and evaluation use."""
        return np.flatnonzero(self.trainable)

    def stack(self, index: int) -> np.ndarray:
        """uint8 ``(C, S, S)`` model input of one slice (its windows and its neighbours')."""
        from ichseg.preprocess.pipeline import gather_context

        rows = self.neighbours[index]
        return gather_context(self.images[rows], np.arange(len(rows))[None])[0]

    def targets(self, task: TaskConfig) -> np.ndarray:
        """``(N, 6)`` float labels (multilabel) or ``(N,)`` int64 classes (multiclass)."""
        if task.mode == "multilabel":
            return self.labels.astype(np.float32)
        if self.classes is not None:
            if task.classes and list(task.classes) != list(self.class_names or []):
                raise InputError(
                    self.folder,
                    f"task.classes {task.classes} differ from the data's classes "
                    f"{self.class_names}",
                )
            return self.classes
        from ichseg.engine.targets import multiclass_targets

        return multiclass_targets(self.labels, task.class_names)


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


def _check_disk(folder: Path, needed: int) -> None:
    probe = folder if folder.exists() else folder.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * DISK_MARGIN > free:
        raise InputError(
            folder,
            f"the slice cache needs about {needed / 1e9:.2f} GB and only {free / 1e9:.2f} GB "
            "are free there (set data.cache_dir or ICHSEG_CACHE to a larger disk)",
        )


def build_slices(
    config: RunConfig,
    preprocessor=None,
    cache_root: Path | None = None,
    progress: bool = True,
    workers: int | None = None,
    shard_slices: int = SHARD_SLICES,
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
        shard_slices: target slices per shard (per-slice builds: files per shard).
        per_slice: build file by file (see the module docstring); None: whenever the source
            and the preprocessor allow it, False: series by series.

    Raises:
        InputError: no usable labelled slice, or not enough disk for the estimate.
    """
    from ichseg.engine.sources import make_source
    from ichseg.preprocess.pipeline import Preprocessor
    from ichseg.progress import progress as progress_bar
    from ichseg.runtime import available_cpus

    data = config.data
    preprocessor = preprocessor or Preprocessor.from_config(config)
    cache_root = Path(cache_root or data.cache_dir or default_cache_root())
    source = make_source(data, cache_root)
    files = None if per_slice is False else _per_slice_files(source, preprocessor)
    if per_slice and files is None:
        raise ConfigError(
            "a per-slice cache needs DICOM-only data and no intracranial masking "
            "(masking works on whole series)"
        )
    if files is not None:
        return _build_per_slice(
            config, preprocessor, source, cache_root, files, progress, workers, shard_slices
        )
    folder = cache_root / f"slices-{cache_key(preprocessor.describe(), source.identity())}"
    if (folder / "done.json").exists():
        return open_slices(folder)
    units = sorted(source.units(), key=lambda u: u.key)
    if not units:
        raise InputError(data.root or folder, "the data source holds no volumes or images")
    windows = 3 if data.source == "images" and preprocessor.channels != 1 else len(data.windows)
    per_slice = windows * data.image_size**2
    estimate = _estimate_bytes(units, per_slice)
    folder.mkdir(parents=True, exist_ok=True)
    _check_disk(folder, estimate)
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
    missing = [i for i in range(len(shards)) if not (folder / _shard_name(i)).is_dir()]
    if progress:
        log.warning(
            "slice cache %s: %d unit(s), ~%.2f GB, %d of %d shard(s) to build",
            folder,
            len(units),
            estimate / 1e9,
            len(missing),
            len(shards),
        )
    workers = available_cpus() if workers is None else workers
    if data.workers is not None:
        workers = data.workers
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
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # fork after torch threads can deadlock
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            for future in as_completed([pool.submit(_build_shard_job, job) for job in jobs]):
                future.result()
                bar.update(1)
    else:
        for job in jobs:
            _build_shard(*job, source=source, preprocessor=preprocessor)
            bar.update(1)
    bar.close()
    count = sum(
        int(json.loads((folder / _shard_name(i) / "meta.json").read_text())["trainable"])
        for i in range(len(shards))
    )
    if count == 0:
        where = data.root if data.source != "phantom" else folder
        raise InputError(where, "no usable labelled slices found (see warnings for skips)")
    write_json(folder / "done.json", {"version": CACHE_VERSION, "shards": len(shards)})
    return open_slices(folder)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


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
    tmp = Path(folder) / f".{_shard_name(shard)}.{uuid.uuid4().hex[:8]}.tmp"
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
        os.replace(tmp, Path(folder) / _shard_name(shard))
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


def _shard_images(folder: Path, count: int) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Memory maps of the shards' images (empty shards left out) and every shard's meta."""
    arrays, metas = [], []
    for i in range(count):
        shard = folder / _shard_name(i)
        meta = json.loads((shard / "meta.json").read_text())
        if meta["count"]:
            arrays.append(
                np.memmap(shard / "images.u8", np.uint8, "r", shape=(meta["count"], *meta["shape"]))
            )
        metas.append(meta)
    return arrays, metas


def _cat(arrays: list[np.ndarray], empty_shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(empty_shape, dtype)


def open_slices(folder: str | Path) -> SliceSet:
    """Open a finished cache folder."""
    folder = Path(folder)
    done = json.loads((folder / "done.json").read_text())
    if done.get("layout") == PER_SLICE:
        return _open_per_slice(folder, done)
    arrays, metas = _shard_images(folder, done["shards"])
    indexes = []
    records: list[dict[str, Any]] = []
    attribute_rows: list[np.ndarray] = []
    for i, meta in enumerate(metas):
        shard = folder / _shard_name(i)
        index = np.load(shard / "index.npz")
        indexes.append(index)
        # Caches written before attributes existed have neither file: every slice unknown.
        local = index["attributes"] if "attributes" in index.files else None
        if local is None or not (shard / "attributes.json").exists():
            attribute_rows.append(np.full(meta["count"], -1, dtype=np.int64))
            continue
        attribute_rows.append(np.where(local >= 0, local.astype(np.int64) + len(records), -1))
        records += json.loads((shard / "attributes.json").read_text())
    offsets = np.r_[0, np.cumsum([m["count"] for m in metas])]
    neighbours = np.concatenate(
        [
            np.where(ix["neighbours"] >= 0, ix["neighbours"] + off, -1)
            for ix, off in zip(indexes, offsets, strict=False)
        ]
    )

    def cat(key: str) -> np.ndarray:
        return np.concatenate([ix[key] for ix in indexes])

    has_classes = any(m["has_classes"] for m in metas)
    return SliceSet(
        images=ShardedImages(arrays),
        neighbours=neighbours,
        labels=cat("labels"),
        classes=cat("classes") if has_classes else None,
        class_names=next((m["class_names"] for m in metas if m["class_names"]), None),
        groups=cat("groups"),
        series=cat("series"),
        sop_uids=cat("sop_uids"),
        slice_index=cat("slice_index"),
        trainable=cat("trainable"),
        label_level=metas[0]["label_level"] if metas else "slice",
        folder=folder,
        attribute_index=np.concatenate(attribute_rows) if attribute_rows else None,
        attribute_records=records,
    )


def cached_skips(folder: str | Path) -> list[dict[str, str]]:
    """Units the cache could not read, with reasons (from every shard)."""
    folder = Path(folder)
    found = []
    if (folder / "skipped.json").exists():
        found += json.loads((folder / "skipped.json").read_text())
    for shard in sorted(folder.glob("shard-*")):
        path = shard / "skipped.json"
        if path.exists():
            found += json.loads(path.read_text())
    return found


# ---------------------------------------------------------------------------------------------
# Per-slice build: one parse per file, series assembled afterwards from a compact index.

PER_SLICE = "per-slice"
PER_SLICE_BATCH = 32
"""Most decoded slices a worker windows and writes at once."""
PER_SLICE_BYTES = 16 * 1024**2
"""...and at most this many bytes of windowed float32 per batch (five 512 x 512 slices with three
windows). Below glibc's largest mmap threshold (32 MiB), so the batch arrays reuse freed heap
memory instead of fresh pages: on a VM where first-touching a page is slow, batches of 32
slices of 512 px made windowing several times slower."""


def _per_slice_files(source, preprocessor) -> np.ndarray | None:
    """The files to cache one by one, or None when whole volumes are needed.

    Per-slice caching needs a source that offers its files (DICOM only) and a preprocessor whose
    every step works on single slices: no intracranial masking (the segmenter and the crop box
    see the whole series).
    """
    offer = getattr(source, "per_slice_files", None)
    if offer is None or preprocessor.masker is not None or preprocessor.source_kind != "hu":
        return None
    return offer()


def _build_per_slice(
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
    of one-slice files, series complete only once the whole folder is read)."""
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
    _check_disk(folder, estimate)
    shards = [[start, min(count, start + shard_slices)] for start in range(0, count, shard_slices)]
    plan = {
        "version": CACHE_VERSION,
        "layout": PER_SLICE,
        "files": count,
        "shards": shards,
        "estimated_bytes": estimate,
        "preprocess": preprocessor.describe(),
        "data": identity,
    }
    plan_path = folder / "plan.json"
    if plan_path.exists() and json.loads(plan_path.read_text()).get("shards") != shards:
        raise InputError(folder, "a different build plan exists here; remove the folder")
    write_json(plan_path, plan)
    for path, reason in source.listing().skipped:
        log.warning("skipped %s: %s", path, reason)
    missing = [i for i in range(len(shards)) if not (folder / _shard_name(i)).is_dir()]
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
    # Workers start by importing torch (seconds each): not worth it for a few hundred files.
    if workers > 1 and len(jobs) > 1 and count >= MIN_PARALLEL_FILES:
        for done in ordered_map(_build_file_shard_job, jobs, min(workers, len(jobs)), workers):
            bar.update(done)
    else:
        for job in jobs:
            bar.update(_build_file_shard(*job, preprocessor=preprocessor))
    bar.close()
    _finish_per_slice(folder, len(shards), source, data)
    return open_slices(folder)


INDEX_BYTES_PER_SLICE = 400
"""Disk for a slice's entries in the shard tables and the final index (an upper bound)."""


def _build_file_shard_job(job: tuple) -> int:
    """Process-pool entry point: one shard of files, preprocessor rebuilt in the worker.

    The pool's workers run one OpenMP thread each (``ichseg.io.workers``), which torch picks
    up if a resize imports it; without a resize torch is never imported.
    """
    return _build_file_shard(*job)


def _build_file_shard(
    folder: str, shard: int, paths: np.ndarray, config_json: dict[str, Any], preprocessor=None
) -> int:
    """Parse each file once, write the windows of every decoded slice to the shard's
    ``images.u8`` and its header fields to ``files.npz``; returns the files handled.

    Files are handled in batches of at most ``PER_SLICE_BATCH`` decoded slices and
    ``PER_SLICE_BYTES`` of windowed float32, so a worker holds a bounded number of slices
    whatever the shard size.
    """
    from ichseg.config import validate_config
    from ichseg.io.dicom import parse_file
    from ichseg.io.dicom_table import DicomTable
    from ichseg.preprocess.pipeline import Preprocessor

    config = validate_config(config_json, "cache worker")
    data = config.data
    preprocessor = preprocessor or Preprocessor.from_parts(data, config.masking, None, config.name)
    table = DicomTable()
    tmp = Path(folder) / f".{_shard_name(shard)}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    written = 0
    try:
        with open(tmp / "images.u8", "wb") as images:
            pending: list[tuple[Any, np.ndarray | None]] = []

            def flush() -> None:
                nonlocal written
                rows, keep = _window_batch(pending, preprocessor, images, written)
                written += len(rows)
                for parsed, _ in pending:
                    table.append(parsed, rows.get(id(parsed), -1), keep.get(id(parsed), False))
                pending.clear()

            decoded = windowed = 0
            for raw_path in paths:
                parsed = parse_file(Path(os.fsdecode(raw_path)))
                hu = None
                if parsed.decoded is not None:
                    hu, parsed.decoded.hu = parsed.decoded.hu, None
                    decoded += 1
                    windowed += hu.size * 4 * len(data.windows)
                pending.append((parsed, hu))
                if decoded >= PER_SLICE_BATCH or windowed >= PER_SLICE_BYTES:
                    flush()
                    decoded = windowed = 0
            flush()
        table.save(tmp / "files.npz")
        shape = [len(data.windows), data.image_size, data.image_size]
        write_json(tmp / "meta.json", {"count": written, "shape": shape, "files": len(paths)})
        os.replace(tmp, Path(folder) / _shard_name(shard))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return len(paths)


def _window_batch(
    pending: list[tuple[Any, np.ndarray | None]], preprocessor, images, first_row: int
) -> tuple[dict[int, int], dict[int, bool]]:
    """Window the decoded slices of ``pending`` (slices of one size together: the preprocessor
    works on stacks) and append them to ``images``; their rows and slice-filter flags."""
    from ichseg.volume import CTVolume

    by_shape: dict[tuple[int, ...], list[tuple[Any, np.ndarray]]] = {}
    for parsed, hu in pending:
        if hu is not None:
            by_shape.setdefault(hu.shape, []).append((parsed, hu))
    rows: dict[int, int] = {}
    keep: dict[int, bool] = {}
    row = first_row
    for items in by_shape.values():
        stack = np.stack([hu for _, hu in items])
        # Every unmasked step is per slice, so a stack of unrelated slices gives each slice
        # what its own volume would.
        volume = CTVolume(stack, np.eye(4), "", "", np.arange(len(items), dtype=np.float64))
        prepared = preprocessor(volume)
        images.write(np.ascontiguousarray(prepared.base).tobytes())
        for k, (parsed, _) in enumerate(items):
            rows[id(parsed)] = row + k
            keep[id(parsed)] = bool(prepared.keep[k])
        row += len(items)
    return rows, keep


def _finish_per_slice(folder: Path, shard_count: int, source, data: DataConfig) -> None:
    """Group the cached slices into series with the series reader's rules and write the index
    (labels, patient and series ids, slice order, 2.5D neighbour rows), then ``done.json``.

    Works on the shards' compact tables only (no pixels), one series at a time.
    """
    from ichseg.io.dicom import series_layout
    from ichseg.io.dicom_table import DicomTable
    from ichseg.preprocess.windowing import neighbour_index

    tables, total = [], 0
    for i in range(shard_count):
        shard = folder / _shard_name(i)
        meta = json.loads((shard / "meta.json").read_text())
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
        metadata_id = str(
            layout.metadata.get("PatientID") or layout.metadata.get("StudyInstanceUID") or uid
        )
        patient = source.patient_id(layout.source, metadata_id)
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
    from ichseg.io.attributes import FIELDS, header_attributes, merge

    record = header_attributes(layout.metadata)
    first = layout.headers[0]
    if record["slice_thickness"] is None and len(layout.slice_positions) > 1:
        record["slice_thickness"] = round(
            float(np.median(np.abs(np.diff(layout.slice_positions)))), 4
        )
    if first.pixel_spacing is not None and len(first.pixel_spacing) == 2:
        record["pixel_spacing"] = round(sum(first.pixel_spacing) / 2, 4)
    record["rows"], record["columns"] = float(first.rows), float(first.columns)
    record = {name: record.get(name) for name in FIELDS}
    return merge(record, source.demographics([], layout.series_uid, patient))


def _names(names: list[str], codes: np.ndarray) -> np.ndarray:
    """Strings by code (``""`` for -1), as one numpy string array."""
    table = np.array([*names, ""], dtype=str)
    return table[np.where(codes >= 0, codes, len(names))]


def _open_per_slice(folder: Path, done: dict[str, Any]) -> SliceSet:
    arrays, _ = _shard_images(folder, done["shards"])
    meta = json.loads((folder / "index.json").read_text())
    with np.load(folder / "index.npz") as index:
        stored = {name: index[name] for name in index.files}
    attributes = folder / "attributes.json"
    records = json.loads(attributes.read_text()) if attributes.exists() else []
    return SliceSet(
        images=ShardedImages(arrays),
        neighbours=stored["neighbours"],
        labels=stored["labels"],
        classes=stored["classes"] if meta["has_classes"] else None,
        class_names=meta["class_names"],
        groups=stored["groups"],
        series=stored["series"],
        sop_uids=stored["sop_uids"],
        slice_index=stored["slice_index"],
        trainable=stored["trainable"],
        label_level=meta["label_level"],
        folder=folder,
        attribute_index=stored.get("attributes"),
        attribute_records=records,
    )

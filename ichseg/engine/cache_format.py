"""The slice cache on disk: its key, its folder layout, and opening a finished cache.

A cache folder holds shards of windowed slices and their index (the layout is described in
:mod:`ichseg.engine.cache`, which builds it); :func:`open_slices` opens a finished one as a
:class:`SliceSet`, whichever way it was built (series by series or file by file).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import TaskConfig
from ichseg.errors import InputError

# 3: per-slice scan attributes; 4: slices shrunk past twofold resized with antialiasing;
# 5: twofold shrinks as 2 x 2 block means in numpy (torch's order differed in the last bit
# on small images); 6: twofold shrinks summed in 1/64 of a uint8 level (integer lookups).
CACHE_VERSION = 6
DISK_MARGIN = 1.05
"""Free disk needed, as a multiple of a build's estimate."""


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


def check_disk_space(folder: Path, needed: int) -> None:
    """Refuse a build whose estimate (times ``DISK_MARGIN``) exceeds the free disk.

    Args:
        folder: the cache folder (or where it will be created).
        needed: the build's estimate in bytes.

    Raises:
        InputError: not enough free disk there.
    """
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


def shard_name(index: int) -> str:
    """The folder name of shard ``index`` inside a cache folder."""
    return f"shard-{index:05d}"


def _shard_images(folder: Path, count: int) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Memory maps of the shards' images (empty shards left out) and every shard's meta."""
    arrays, metas = [], []
    for i in range(count):
        shard = folder / shard_name(i)
        meta = json.loads((shard / "meta.json").read_text())
        if meta["count"]:
            arrays.append(
                np.memmap(shard / "images.u8", np.uint8, "r", shape=(meta["count"], *meta["shape"]))
            )
        metas.append(meta)
    return arrays, metas


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
        shard = folder / shard_name(i)
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


PER_SLICE = "per-slice"
"""``layout`` in ``done.json`` of a cache built file by file (``ichseg.engine.cache_per_slice``)."""


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

"""Per-slice embeddings of a trained backbone, computed once and cached on disk.

A sequence head trains for many epochs on the same embeddings, and evaluation reads them
again, so they are computed once per (slice cache, backbone weights, TTA, rows) and kept beside
the slice cache::

    <cache_root>/embeddings-<key>/
        embeddings.npy     (n, F) float16 when that holds every value exactly, else float32
        rows.npy           (n,) the slice-cache rows they belong to, ascending
        meta.json          what the key hashes (slice cache, backbone SHA-1, TTA), and F
        done.json          written last

The key hashes the slice cache's folder name (itself a hash of the preprocessing and the data),
the SHA-1 of the backbone checkpoint's bytes, the TTA views, the precision (bf16 or fp32) and the
rows, so a retrained backbone, a rebuilt cache or another precision never reuses stale
embeddings. The folder appears by an atomic rename. bf16
autocast leaves the backbone's features with 8 significant bits, so float16 storage (11 bits)
holds them exactly and halves the disk; fp32 features (where bf16 autocast does not pay) rarely fit
float16 exactly and are kept as float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.engine.cache import SliceSet
from ichseg.engine.predict import ForwardTimer, TestTimeAugmentation
from ichseg.fileio import write_json

EMBEDDINGS_VERSION = 2


@dataclass
class EmbeddingTable:
    """Embeddings of some rows of a :class:`SliceSet`.

    Attributes:
        rows: ``(n,)`` ascending slice-cache rows.
        values: ``(n, F)`` embeddings (float16 or float32; read-only memory map when cached).
        folder: the cache folder they were read from or written to.
        computed: True when this call computed them (False: read from the cache).
        precision: what the backbone ran in, ``"bf16"`` or ``"fp32"`` (part of the cache key).
    """

    rows: np.ndarray
    values: np.ndarray
    folder: Path
    computed: bool = False
    precision: str = "fp32"

    @property
    def num_features(self) -> int:
        return int(self.values.shape[1])

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """float32 ``(len(rows), F)`` embeddings of slice-cache ``rows``.

        Raises:
            KeyError: a row that has no embedding here.
        """
        rows = np.asarray(rows, dtype=np.int64)
        where = np.searchsorted(self.rows, rows)
        where = np.clip(where, 0, max(len(self.rows) - 1, 0))
        if len(rows) and (len(self.rows) == 0 or not np.array_equal(self.rows[where], rows)):
            raise KeyError("some rows have no cached embedding")
        return np.asarray(self.values[where], dtype=np.float32)


def embeddings_key(
    slices: SliceSet,
    backbone_sha1: str,
    rows: np.ndarray,
    tta: TestTimeAugmentation | None,
    precision: str = "fp32",
) -> str:
    """The cache key of the embeddings of ``rows`` (see the module docstring); ``precision``
    is what the backbone ran in ("bf16" or "fp32"), so features computed on a machine where
    bf16 autocast pays are not served to one that computes them in fp32."""
    payload = {
        "version": EMBEDDINGS_VERSION,
        "precision": precision,
        "slices": Path(slices.folder).name,
        "backbone_sha1": backbone_sha1,
        "tta": tta.to_dict() if tta is not None else None,
        "rows_sha1": hashlib.sha1(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest(),
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def embed_slices(
    model: Any,
    slices: SliceSet,
    rows: np.ndarray,
    *,
    backbone_sha1: str,
    amp: bool = True,
    tta: TestTimeAugmentation | None = None,
    timer: ForwardTimer | None = None,
    batch_size: int = 64,
    device: Any = None,
) -> EmbeddingTable:
    """Embeddings of ``rows`` of ``slices`` by ``model.forward_features``, cached on disk.

    Args:
        model: the backbone (:class:`~ichseg.models.classifiers.ClassifierModel`).
        slices: the slice cache the rows index.
        rows: slice-cache rows (any order; stored ascending).
        backbone_sha1: SHA-1 of the backbone checkpoint file (part of the key).
        amp: bf16 autocast, as the backbone was trained.
        tta: views whose features are averaged (part of the key).
        timer: collects forward seconds when the embeddings are computed.
        batch_size: slices per forward pass.
        device: torch device (default: CUDA when available).
    """
    import torch
    from torch.utils.data import DataLoader

    from ichseg.engine.dataset import SliceDataset
    from ichseg.engine.predict import default_device, precision_used, predict_features

    rows = np.unique(np.asarray(rows, dtype=np.int64))
    device = default_device(device)
    precision = precision_used(device, amp)
    key = embeddings_key(slices, backbone_sha1, rows, tta, precision)
    folder = Path(slices.folder).parent / f"embeddings-{key}"
    if (folder / "done.json").is_file():
        return EmbeddingTable(
            np.load(folder / "rows.npy"),
            np.load(folder / "embeddings.npy", mmap_mode="r"),
            folder,
            precision=precision,
        )
    model.to(device, memory_format=torch.channels_last)
    dummy = np.zeros(len(slices), dtype=np.float32)
    loader = DataLoader(SliceDataset(slices, rows, dummy), batch_size=batch_size)
    values = predict_features(model, loader, device, amp, tta, timer)
    if len(rows) == 0:
        values = np.zeros((0, int(getattr(model, "num_features", 0))), dtype=np.float32)
    stored = values.astype(np.float16)
    if not np.array_equal(stored.astype(np.float32), values):
        stored = values  # float16 only where it is exact, so cached and live embeddings agree
    _publish(folder, rows, stored, slices, backbone_sha1, tta, precision)
    return EmbeddingTable(rows, stored, folder, computed=True, precision=precision)


def _publish(
    folder: Path,
    rows: np.ndarray,
    values: np.ndarray,
    slices: SliceSet,
    backbone_sha1: str,
    tta: TestTimeAugmentation | None,
    precision: str,
) -> None:
    """Write the cache folder beside its final name and rename it into place."""
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "rows.npy", rows)
        np.save(tmp / "embeddings.npy", values)
        write_json(
            tmp / "meta.json",
            {
                "version": EMBEDDINGS_VERSION,
                "slices": str(slices.folder),
                "backbone_sha1": backbone_sha1,
                "tta": tta.to_dict() if tta is not None else None,
                "precision": precision,
                "rows": int(len(rows)),
                "num_features": int(values.shape[1]) if values.ndim == 2 else 0,
                "dtype": str(values.dtype),
            },
        )
        write_json(tmp / "done.json", {"version": EMBEDDINGS_VERSION})
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "done.json").is_file():  # not a concurrent writer's finished copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

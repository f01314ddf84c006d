"""Slices for classifier training: a memory-mapped cache, patient-level splits, a Dataset.

Volumes are decoded, optionally masked, windowed and resized once; the result is stored as a
uint8 memmap ``(N, C, H, W)`` (1/255 steps are 0.3 HU in the brain window, far below noise), so
every epoch after the first reads the cache instead of decoding DICOM again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import DataConfig, MaskingConfig, RunConfig, TaskConfig
from ichseg.errors import InputError
from ichseg.fileio import write_json
from ichseg.volume import SUBTYPES, CTVolume

log = logging.getLogger(__name__)

CACHE_VERSION = 1
Masker = Callable[[CTVolume], np.ndarray]


@dataclass
class LabeledVolume:
    """A volume with one six-label vector per slice (rows of NaN where unlabeled)."""

    volume: CTVolume
    labels: np.ndarray  # (Z, 6) float32, NaN = no label for that slice
    group: str


@dataclass
class SliceSet:
    """Preprocessed slices and their labels, backed by the cache on disk."""

    images: np.ndarray  # uint8 (N, C, H, W), memmap
    labels: np.ndarray  # float32 (N, 6) in SUBTYPES order
    groups: np.ndarray  # patient/study id per slice
    series: np.ndarray  # series uid per slice
    sop_uids: np.ndarray
    slice_index: np.ndarray
    cache_dir: Path

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def targets(self, task: TaskConfig) -> np.ndarray:
        """Targets for the task: (N, 6) float for multilabel, (N,) int64 for multiclass."""
        if task.mode == "multilabel":
            return self.labels.astype(np.float32)
        return multiclass_targets(self.labels, task.class_names)


def multiclass_targets(labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Exclusive classes from six-label rows.

    ``["normal", "hemorrhage"]`` maps ``any``; a list of ``normal`` plus subtype names takes the
    first listed subtype that is present (the dominant one by the list's order), else normal.
    """
    if class_names == ["normal", "hemorrhage"]:
        return labels[:, 0].astype(np.int64)
    if class_names[0] != "normal" or not set(class_names[1:]) <= set(SUBTYPES[1:]):
        raise InputError(
            None,
            "multiclass classes must be ['normal', 'hemorrhage'] or 'normal' followed by "
            f"subtype names from {', '.join(SUBTYPES[1:])}",
        )
    target = np.zeros(len(labels), dtype=np.int64)
    for class_index in range(len(class_names) - 1, 0, -1):
        column = SUBTYPES.index(class_names[class_index])
        target[labels[:, column] > 0.5] = class_index
    return target


# ---------------------------------------------------------------------------------------------
# Sources


def _phantom_volumes(data: DataConfig, cache_root: Path, progress: bool) -> Iterator[LabeledVolume]:
    from ichseg.io.nifti import read_nifti
    from ichseg.phantom import PhantomConfig, write_dataset

    spec = data.phantom
    key = hashlib.sha1(json.dumps(spec.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root / f"phantom-{key}"
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        log.info("generating %d phantom studies in %s", spec.studies, folder)
        write_dataset(
            folder,
            studies=spec.studies,
            seed=spec.seed,
            config=PhantomConfig(
                size=spec.size,
                num_slices=spec.slices,
                negative_fraction=spec.negative_fraction,
            ),
            write_dicom=False,
        )
    slice_labels: dict[tuple[str, int], np.ndarray] = {}
    with open(folder / "slices.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            vector = np.array([float(row[name]) for name in SUBTYPES], dtype=np.float32)
            slice_labels[(row["study_id"], int(row["slice_index"]))] = vector
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        volume = read_nifti(folder / row["ct_nifti"])
        labels = np.stack([slice_labels[(row["study_id"], z)] for z in range(volume.num_slices)])
        volume.series_uid = row["series_uid"]
        yield LabeledVolume(volume, labels, row["patient_id"])


def _labels_for_volume(volume: CTVolume, table, fmt: str) -> np.ndarray:
    from ichseg.io.labels import ctich_key, rsna_key

    labels = np.full((volume.num_slices, len(SUBTYPES)), np.nan, dtype=np.float32)
    for z, sop in enumerate(volume.sop_uids):
        if fmt == "rsna":
            key = rsna_key(sop)
        elif fmt == "ctich":
            key = ctich_key(volume.patient_id, z + 1)
        elif fmt == "cq500":
            # Scan-level reads: every slice carries its study's label (weak supervision).
            key = volume.patient_id
        else:
            key = sop
        if key in table:
            labels[z] = table[key]
    return labels


def _file_volumes(data: DataConfig, progress: bool) -> Iterator[LabeledVolume]:
    from ichseg.io.labels import read_labels
    from ichseg.io.loader import index_input

    if data.root is None:
        raise InputError(None, f"data.source '{data.source}' needs data.root")
    if data.labels is None:
        raise InputError(data.root, "no labels: set data.labels to a label CSV")
    table = read_labels(data.labels)
    index = index_input(data.root)
    for item in index.iter_volumes():
        if isinstance(item, InputError):
            log.warning("skipped %s", item)
            continue
        labels = _labels_for_volume(item, table, table.format)
        if np.isnan(labels[:, 0]).all():
            log.warning("no labels for any slice of %s", item.source)
            continue
        yield LabeledVolume(item, labels, item.patient_id)


# ---------------------------------------------------------------------------------------------
# Cache


def cache_key(data: DataConfig, masking: MaskingConfig) -> str:
    """Hash of everything that changes the cached arrays (not the split or training)."""
    fields = data.model_dump(mode="json", exclude={"split", "cache_dir"})
    fields["masking"] = masking.model_dump(mode="json") if masking.enabled else None
    fields["version"] = CACHE_VERSION
    for name in ("root", "labels"):
        path = getattr(data, name)
        if path is not None and Path(path).exists():
            stat = Path(path).stat()
            fields[f"{name}_stat"] = [str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size]
    if masking.enabled and masking.checkpoint is not None and Path(masking.checkpoint).exists():
        fields["checkpoint_mtime"] = Path(masking.checkpoint).stat().st_mtime_ns
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    return Path(os.environ.get("ICHSEG_CACHE", Path.home() / ".cache" / "ichseg"))


def preprocess_volume(
    volume: CTVolume,
    data: DataConfig,
    masking: MaskingConfig,
    masker: Masker | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Windowed uint8 slices ``(Z, C, S, S)`` of one volume, masked when configured.

    Args:
        volume: the CT.
        data: windows, 2.5D context and output size.
        masking: whether and how to mask.
        masker: computes the intracranial mask when masking is enabled and ``mask`` is None.
        mask: a mask already computed for this volume (inference writes it out as well).
    """
    from ichseg.preprocess.windowing import neighbour_indices, resize_slices, stack_windows

    hu = volume.hu
    if masking.enabled and mask is None:
        if masker is None:
            raise InputError(None, "masking is enabled but no segmenter was given")
        mask = masker(volume)
    pixel_spacing = volume.spacing[1:]
    if masking.enabled:
        from ichseg.segmentation.masking import apply_mask, crop_to_mask

        if masking.background == "air":
            hu = apply_mask(hu, mask, "air", masking.dilation_mm, pixel_spacing)
        if masking.crop:
            hu, box = crop_to_mask(hu, mask, masking.margin_mm, pixel_spacing)
            mask = mask[:, box[0] : box[1], box[2] : box[3]]
    size = (data.image_size, data.image_size)
    # Window every slice at once, resize, then gather 2.5D neighbours by index: each slice is
    # windowed and resized once however many neighbours use it.
    channels = stack_windows(hu, data.windows)  # (Z, windows, H, W)
    if masking.enabled and masking.background == "min":
        channels = apply_mask(channels, mask, "min", masking.dilation_mm, pixel_spacing)
    if channels.shape[-2:] != size:
        channels = resize_slices(channels, size)
    if data.context:
        z = channels.shape[0]
        picks = np.array([neighbour_indices(z, i, data.context) for i in range(z)])
        channels = channels[picks].reshape(z, -1, *size)
    channels *= 255.0
    np.rint(channels, out=channels)
    return channels.astype(np.uint8)


def build_slices(
    config: RunConfig,
    masker: Masker | None = None,
    cache_root: Path | None = None,
    progress: bool = True,
) -> SliceSet:
    """Preprocess the configured data into the cache (once) and open it.

    Raises:
        InputError: the source yields no usable labeled slice; the message names the folder.
    """
    data, masking = config.data, config.masking
    cache_root = Path(cache_root or data.cache_dir or default_cache_root())
    folder = cache_root / f"slices-{cache_key(data, masking)}"
    if (folder / "done.json").exists():
        return open_slices(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if data.source == "phantom":
        volumes = _phantom_volumes(data, cache_root, progress)
    elif data.source == "images":
        return _build_image_slices(data, folder)
    else:
        volumes = _file_volumes(data, progress)

    from tqdm.auto import tqdm

    images_path = folder / "images.u8"
    rows: dict[str, list[Any]] = {k: [] for k in ("labels", "groups", "series", "sop", "index")}
    count = 0
    shape: tuple[int, ...] | None = None
    with open(images_path, "wb") as sink:
        for item in tqdm(volumes, desc="preprocess", unit="vol", disable=not progress):
            keep = ~np.isnan(item.labels[:, 0])
            if data.min_brain_fraction > 0:
                from ichseg.preprocess.windowing import nonblank_slices

                keep &= nonblank_slices(item.volume.hu, data.min_brain_fraction)
            if not keep.any():
                continue
            slices = preprocess_volume(item.volume, data, masking, masker)[keep]
            shape = slices.shape[1:]
            sink.write(np.ascontiguousarray(slices).tobytes())
            count += len(slices)
            picked = np.flatnonzero(keep)
            rows["labels"].append(item.labels[keep])
            rows["groups"] += [item.group] * len(picked)
            rows["series"] += [item.volume.series_uid] * len(picked)
            rows["sop"] += [item.volume.sop_uids[z] for z in picked]
            rows["index"] += picked.tolist()
    if count == 0 or shape is None:
        where = data.root if data.source != "phantom" else folder
        raise InputError(where, "no usable labeled slices found")
    np.savez(
        folder / "index.npz",
        labels=np.concatenate(rows["labels"]).astype(np.float32),
        groups=np.array(rows["groups"]),
        series=np.array(rows["series"]),
        sop_uids=np.array(rows["sop"]),
        slice_index=np.array(rows["index"], dtype=np.int64),
    )
    _finish(folder, count, shape)
    return open_slices(folder)


def _finish(folder: Path, count: int, shape: tuple[int, ...]) -> None:
    # done.json is written last and atomically: a killed build is redone, never half-read.
    write_json(
        folder / "done.json", {"count": count, "shape": list(shape), "version": CACHE_VERSION}
    )


def _build_image_slices(data: DataConfig, folder: Path) -> SliceSet:
    from ichseg.io.images import read_image_folder

    if data.root is None:
        raise InputError(None, "data.source 'images' needs data.root")
    channels = len(data.windows) * (2 * data.context + 1)
    index = read_image_folder(
        data.root,
        labels_csv=data.labels,
        channels=1 if channels == 1 else 3,
        size=(data.image_size, data.image_size),
    )
    if index.task != "multilabel":
        raise InputError(
            data.root, "image folders for training need the six SUBTYPES columns in labels.csv"
        )
    images = np.empty(
        (len(index), 3 if channels != 1 else 1, data.image_size, data.image_size), dtype=np.uint8
    )
    for i in range(len(index)):
        image, _ = index.load(i)
        images[i] = np.clip(np.rint(image * 255.0), 0, 255)
    images.tofile(folder / "images.u8")
    np.savez(
        folder / "index.npz",
        labels=np.asarray(index.targets, dtype=np.float32),
        groups=np.array(index.groups),
        series=np.array(index.groups),
        sop_uids=np.array([p.name for p in index.paths]),
        slice_index=np.zeros(len(index), dtype=np.int64),
    )
    _finish(folder, len(index), images.shape[1:])
    return open_slices(folder)


def open_slices(folder: Path) -> SliceSet:
    """Open a finished cache folder."""
    meta = json.loads((folder / "done.json").read_text())
    images = np.memmap(
        folder / "images.u8", dtype=np.uint8, mode="r", shape=(meta["count"], *meta["shape"])
    )
    index = np.load(folder / "index.npz")
    return SliceSet(
        images=images,
        labels=index["labels"],
        groups=index["groups"],
        series=index["series"],
        sop_uids=index["sop_uids"],
        slice_index=index["slice_index"],
        cache_dir=folder,
    )


# ---------------------------------------------------------------------------------------------
# Splits


def split_by_group(
    groups: np.ndarray,
    positive: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, np.ndarray]:
    """Slice indices for train/val/test with every patient in exactly one split.

    Groups are stratified by whether they hold any positive slice, so small datasets still get
    positives in every split. With ``folds``, the test split is fold ``fold`` of a k-fold
    partition and validation is taken from the rest by ``val_fraction``.
    """
    unique = np.unique(groups)
    group_positive = {g: False for g in unique}
    for g, p in zip(groups, positive, strict=True):
        if p:
            group_positive[g] = True
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for stratum in (True, False):
        members = np.array(sorted(g for g in unique if group_positive[g] == stratum))
        rng.shuffle(members)
        n = len(members)
        if folds:
            test_members = set(members[np.arange(n) % folds == fold % folds])
            rest = [g for g in members if g not in test_members]
            n_val = int(round(val_fraction * len(rest)))
            for g in test_members:
                assignment[g] = "test"
            for i, g in enumerate(rest):
                assignment[g] = "val" if i < n_val else "train"
        else:
            n_test = int(round(test_fraction * n))
            n_val = int(round(val_fraction * n))
            for i, g in enumerate(members):
                assignment[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    labels = np.array([assignment[g] for g in groups])
    return {name: np.flatnonzero(labels == name) for name in ("train", "val", "test")}


def save_splits(splits: dict[str, np.ndarray], groups: np.ndarray, path: Path) -> None:
    """Write the patient ids of each split (JSON) so a run can be audited and repeated."""
    write_json(path, {name: sorted(set(groups[idx].tolist())) for name, idx in splits.items()})


# ---------------------------------------------------------------------------------------------
# Torch dataset


def build_augmentation(seed: int):
    """The training augmentation (albumentations): flip, rotate ±15°, scale, contrast, blur."""
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), p=0.7, border_mode=0, fill=0),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
            A.GaussianBlur(blur_limit=(3, 3), p=0.2),
        ],
        seed=seed,
    )


class SliceDataset:
    """Torch-style dataset over a :class:`SliceSet` subset; returns (float image, target)."""

    def __init__(
        self,
        slices: SliceSet,
        indices: np.ndarray,
        targets: np.ndarray,
        augmentation=None,
    ) -> None:
        self.slices = slices
        self.indices = np.asarray(indices)
        self.targets = targets
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.indices)

    def reseed(self, seed: int) -> None:
        """Fix the augmentation stream for an epoch, so a resumed run repeats it exactly."""
        if self.augmentation is not None:
            self.augmentation.set_random_seed(seed)

    def __getitem__(self, position: int):
        import torch

        index = int(self.indices[position])
        image = np.array(self.slices.images[index])  # (C, H, W) uint8, a writable copy
        if self.augmentation is not None:
            image = self.augmentation(image=image.transpose(1, 2, 0))["image"].transpose(2, 0, 1)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)
        return tensor, torch.as_tensor(self.targets[index])

"""Labelled data for classifier training, cut into units that can be cached independently.

A source lists its *units* (a phantom study, a DICOM series, a NIfTI file, a chunk of images)
without decoding pixels, and reads one unit at a time into labelled slices. Units are what the
slice cache builds in parallel and resumes: see :mod:`ichseg.engine.cache`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import DataConfig
from ichseg.errors import ConfigError, InputError
from ichseg.io.attributes import Demographics, merge, read_demographics, volume_attributes
from ichseg.io.nifti import nifti_stem
from ichseg.volume import SUBTYPES, CTVolume

log = logging.getLogger(__name__)

IMAGE_CHUNK = 256
"""Images per unit for picture datasets (units are the grain of parallel, resumable caching)."""


@dataclass
class Unit:
    """One independently cacheable piece of a source.

    Attributes:
        key: stable id, unique within the source.
        slices: expected number of slices (for the size estimate before the build).
        payload: what :meth:`Source.read` needs (picklable: paths, headers, table rows).
    """

    key: str
    slices: int
    payload: Any


@dataclass
class LabelledSlices:
    """What reading a unit gives: a volume with per-slice labels, or a chunk of pictures.

    Attributes:
        volume: the CT (None for pictures).
        images: picture paths (empty for volumes).
        labels: ``(Z, 6)`` float32 in SUBTYPES order, NaN where unknown.
        classes: ``(Z,)`` int64 class index for picture sources in multiclass mode, else None.
        groups: patient id per slice.
        series: series id per slice.
        sop_uids: SOPInstanceUID per slice (file name for pictures).
        warnings: why anything was skipped or assumed.
        attributes: scan attributes per slice (``ichseg.io.attributes``; one shared record for
            a volume); empty when none are known.
    """

    volume: CTVolume | None
    images: list[Path]
    labels: np.ndarray
    classes: np.ndarray | None
    groups: list[str]
    series: list[str]
    sop_uids: list[str]
    warnings: list[str] = field(default_factory=list)
    attributes: list[dict[str, Any]] = field(default_factory=list)


def _group_from_pattern(pattern: str | None, path: Path, root: Path | None) -> str | None:
    if not pattern:
        return None
    try:
        relative = path.resolve().relative_to(root.resolve()) if root else path
    except ValueError:
        relative = path
    match = re.search(pattern, relative.as_posix())
    if match is None or "group" not in match.groupdict():
        raise InputError(
            path, f"data.group_pattern {pattern!r} does not match (named group 'group')"
        )
    return match.group("group")


class Source(ABC):
    """A data config's labelled slices, as units (phantom, CT files or pictures)."""

    label_level = "slice"

    def __init__(self, data: DataConfig, cache_root: Path) -> None:
        self.data = data
        self.cache_root = cache_root
        # Read at once, so a bad table fails before any slice is cached.
        self._demographics: Demographics | None = (
            read_demographics(data.demographics) if data.demographics is not None else None
        )

    def demographics(
        self, images: list[str], series: str | None, patient: str | None
    ) -> dict[str, Any] | None:
        """The demographics CSV's record for these keys (None without a CSV or a match)."""
        if self._demographics is None:
            return None
        return self._demographics.lookup(images, series, patient)

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What identifies the data (part of the cache key)."""

    @abstractmethod
    def units(self) -> list[Unit]:
        """The cacheable units (a study, a series or volume, a batch of pictures), in order."""

    @abstractmethod
    def read(self, unit: Unit) -> LabelledSlices:
        """One unit's slices in HU (or pictures) with their labels and ids."""


def _stat(path: Path | None) -> list[Any] | None:
    if path is None or not Path(path).exists():
        return None
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size]


# Version of the generated phantom folder's tables: 2 added the manifest's demographics and
# scanner columns (the pixels are unchanged), so folders generated before are not reused.
_PHANTOM_LAYOUT = 2

# Manifest column -> the DICOM keyword the same value has in a phantom's headers.
_PHANTOM_HEADERS = {
    "patient_age": "PatientAge",
    "patient_sex": "PatientSex",
    "manufacturer": "Manufacturer",
    "model_name": "ManufacturerModelName",
    "convolution_kernel": "ConvolutionKernel",
    "kvp": "KVP",
    "tube_current_ma": "XRayTubeCurrent",
    "slice_thickness_mm": "SliceThickness",
}


class PhantomSource(Source):
    """Synthetic studies generated once into ``cache_root/phantom-<key>`` (NIfTI + labels)."""

    def _folder(self) -> Path:
        spec = self.data.phantom.model_dump() | {"layout": _PHANTOM_LAYOUT}
        key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        return self.cache_root / f"phantom-{key}"

    def identity(self) -> dict[str, Any]:
        return {"phantom": self.data.phantom.model_dump()}

    def units(self) -> list[Unit]:
        from ichseg.phantom import PhantomConfig, write_dataset

        spec = self.data.phantom
        folder = self._folder()
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
        with open(manifest, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [Unit(row["study_id"], int(row["num_slices"]), row) for row in rows]

    def read(self, unit: Unit) -> LabelledSlices:
        from ichseg.io.nifti import read_nifti

        folder = self._folder()
        row = unit.payload
        table = _phantom_slice_labels(str(folder / "slices.csv"))
        volume = read_nifti(folder / row["ct_nifti"], patient_id=row["patient_id"])
        volume.series_uid = row["series_uid"]
        # The NIfTI has no header: the manifest gives what the study's DICOM headers say.
        volume.metadata.update({key: row.get(column) for column, key in _PHANTOM_HEADERS.items()})
        labels = np.stack([table[(row["study_id"], z)] for z in range(volume.num_slices)])
        n = volume.num_slices
        return LabelledSlices(
            volume,
            [],
            labels,
            None,
            [row["patient_id"]] * n,
            [row["series_uid"]] * n,
            [f"{row['study_id']}_{z}" for z in range(n)],
            attributes=[volume_attributes(volume)] * n,
        )


@lru_cache(maxsize=4)
def _phantom_slice_labels(path: str) -> dict[tuple[str, int], np.ndarray]:
    table: dict[tuple[str, int], np.ndarray] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            vector = np.array([float(row[name]) for name in SUBTYPES], dtype=np.float32)
            table[(row["study_id"], int(row["slice_index"]))] = vector
    return table


@lru_cache(maxsize=2)
def _label_table(path: str):
    from ichseg.io.labels import read_labels

    return read_labels(path)


# Scan-level label formats: every slice carries its study's label.
_SCAN_LEVEL_FORMATS = ("cq500",)


class CTFileSource(Source):
    """DICOM series and NIfTI volumes under ``data.root`` with a label table.

    When every file under the root is DICOM (no NIfTI), :meth:`per_slice_files` offers the
    files for the slice cache's per-slice build (one parse per file, series assembled from a
    compact index afterwards: see :mod:`ichseg.engine.cache`); otherwise, and whenever a
    volume-level step (intracranial masking) needs whole series, units are series and volumes.
    """

    def __init__(self, data: DataConfig, cache_root: Path) -> None:
        super().__init__(data, cache_root)
        if data.root is None:
            raise ConfigError(f"data.source '{data.source}' needs data.root")
        if data.labels is None:
            raise ConfigError(f"data.source '{data.source}' needs data.labels (a label CSV)")
        from ichseg.io.labels import detect_label_format

        self.format = detect_label_format(data.labels)
        self.label_level = "series" if self.format in _SCAN_LEVEL_FORMATS else "slice"
        self._listing = None

    def listing(self):
        """The files under ``data.root`` (:func:`ichseg.io.walk.list_compact`), listed once."""
        if self._listing is None:
            from ichseg.io.walk import list_compact

            self._listing = list_compact(self.data.root)  # type: ignore[arg-type]
        return self._listing

    def identity(self) -> dict[str, Any]:
        listing = self.listing()
        return {
            "source": self.data.source,
            "root": _stat(self.data.root),
            # Every file's name, size and mtime: a file added, removed or rewritten anywhere
            # under the root is a different data set.
            "listing": [len(listing), listing.digest()],
            "labels": _stat(self.data.labels),
            "group_pattern": self.data.group_pattern,
            "demographics": _stat(self.data.demographics),
        }

    def per_slice_files(self) -> np.ndarray | None:
        """The candidate files (``os.fsencode`` paths, listing order) when the root holds no
        NIfTI, else None."""
        paths = self.listing().paths
        if len(paths):
            lower = np.char.lower(paths)
            if (np.char.endswith(lower, b".nii") | np.char.endswith(lower, b".nii.gz")).any():
                return None
        return paths

    def units(self) -> list[Unit]:
        from ichseg.io.loader import index_input

        index = index_input(self.data.root)  # type: ignore[arg-type]
        for path, reason in index.skipped:
            log.warning("skipped %s: %s", path, reason)
        units = [
            Unit(f"dicom:{s.series_uid}", len(s.headers), ("dicom", s)) for s in index.dicom_series
        ]
        units += [Unit(f"nifti:{p}", 0, ("nifti", p)) for p in index.nifti_files]
        return units

    def patient_id(self, source: str, metadata_patient_id: str) -> str:
        """The patient id of a volume read from ``source``: ``data.group_pattern`` when set."""
        group = _group_from_pattern(self.data.group_pattern, Path(source), self.data.root)
        return metadata_patient_id if group is None else group

    def labels_for(self, sop_uids: list[str], patient_id: str) -> np.ndarray:
        """``(Z, 6)`` labels of a volume's slices (NaN where the table has none)."""
        table = _label_table(str(self.data.labels))
        return _labels_for_slices(sop_uids, patient_id, table, self.format)

    def read(self, unit: Unit) -> LabelledSlices:
        from ichseg.io.dicom import read_series
        from ichseg.io.nifti import read_nifti

        kind, payload = unit.payload
        volume = read_series(payload) if kind == "dicom" else read_nifti(payload)
        group = _group_from_pattern(self.data.group_pattern, Path(volume.source), self.data.root)
        if group is not None:
            volume.metadata["PatientID"] = group
        labels = self.labels_for(list(volume.sop_uids), volume.patient_id)
        warnings = list(volume.warnings)
        if np.isnan(labels[:, 0]).all():
            warnings.append(f"no labels for any slice of {volume.source}")
        n = volume.num_slices
        attributes = self._volume_attributes(volume, kind, payload, warnings)
        return LabelledSlices(
            volume,
            [],
            labels,
            None,
            [volume.patient_id] * n,
            [volume.series_uid] * n,
            list(volume.sop_uids),
            warnings,
            [attributes] * n,
        )

    def _volume_attributes(
        self, volume: CTVolume, kind: str, payload: Any, warnings: list[str]
    ) -> dict[str, Any]:
        names: list[str] = []
        if kind == "nifti":
            path = Path(payload)
            names = [_relative_name(path, self.data.root), path.name, nifti_stem(path)]
        found = self.demographics(names, volume.series_uid, volume.patient_id)
        if found is None and self.data.demographics is not None:
            warnings.append(f"no row of {self.data.demographics} for {volume.source}")
        return merge(volume_attributes(volume), found)


def _labels_for_slices(sop_uids: list[str], patient_id: str, table, fmt: str) -> np.ndarray:
    from ichseg.io.labels import ctich_key, rsna_key

    labels = np.full((len(sop_uids), len(SUBTYPES)), np.nan, dtype=np.float32)
    for z, sop in enumerate(sop_uids):
        if fmt == "rsna":
            key = rsna_key(sop)
        elif fmt == "ctich":
            key = ctich_key(patient_id, z + 1)
        elif fmt == "cq500":
            key = patient_id
        else:
            key = sop
        if key in table:
            labels[z] = table[key]
    return labels


class ImageSource(Source):
    """Windowed PNG/JPG pictures with labels.csv or class sub-folders."""

    def __init__(self, data: DataConfig, cache_root: Path) -> None:
        super().__init__(data, cache_root)
        if data.root is None:
            raise ConfigError("data.source 'images' needs data.root")
        self._index = None

    def index(self):
        if self._index is None:
            from ichseg.io.images import read_image_folder

            self._index = read_image_folder(
                self.data.root,  # type: ignore[arg-type]
                labels_csv=self.data.labels,
                group_pattern=self.data.group_pattern,
            )
            for warning in self._index.warnings:
                log.warning("%s: %s", self.data.root, warning)
        return self._index

    def identity(self) -> dict[str, Any]:
        index = self.index()
        listing = hashlib.sha1()
        for path in index.paths:
            stat = path.stat()
            listing.update(f"{path}|{stat.st_mtime_ns}|{stat.st_size}\n".encode())
        return {
            "source": "images",
            "root": _stat(self.data.root),
            "labels": _stat(self.data.labels),
            "listing": listing.hexdigest(),
            "group_pattern": self.data.group_pattern,
            "demographics": _stat(self.data.demographics),
        }

    def class_names(self) -> list[str] | None:
        index = self.index()
        return list(index.classes) if index.task == "multiclass" else None

    def units(self) -> list[Unit]:
        index = self.index()
        n = len(index)
        return [
            Unit(
                f"images:{start}", min(IMAGE_CHUNK, n - start), (start, min(n, start + IMAGE_CHUNK))
            )
            for start in range(0, n, IMAGE_CHUNK)
        ]

    def read(self, unit: Unit) -> LabelledSlices:
        index = self.index()
        start, stop = unit.payload
        six = index.multilabel_targets()[start:stop]
        classes = index.multiclass_targets()[0][start:stop] if index.task == "multiclass" else None
        paths = index.paths[start:stop]
        groups = [str(g) for g in index.groups[start:stop]]
        names = [str(p.relative_to(index.root)) for p in paths]
        warnings: list[str] = []
        attributes: list[dict[str, Any]] = []
        if self.data.demographics is not None:
            for path, name, group in zip(paths, names, groups, strict=True):
                found = self.demographics([Path(name).as_posix(), path.name], None, group)
                if found is None:
                    warnings.append(f"no row of {self.data.demographics} for {name}")
                attributes.append(merge({}, found))
        return LabelledSlices(
            None,
            list(paths),
            np.asarray(six, dtype=np.float32),
            classes,
            groups,
            groups,
            names,
            warnings,
            attributes,
        )


def _relative_name(path: Path, root: Path | None) -> str:
    try:
        return path.resolve().relative_to(Path(root).resolve()).as_posix() if root else path.name
    except ValueError:
        return path.name


def make_source(data: DataConfig, cache_root: Path) -> Source:
    """The source a data config describes."""
    if data.source == "phantom":
        return PhantomSource(data, cache_root)
    if data.source == "images":
        return ImageSource(data, cache_root)
    return CTFileSource(data, cache_root)


def iter_units(
    source: Source, units: list[Unit]
) -> Iterator[tuple[Unit, LabelledSlices | InputError]]:
    """Read units one at a time; a unit that cannot be read yields its error."""
    for unit in units:
        try:
            yield unit, source.read(unit)
        except InputError as error:
            yield unit, error

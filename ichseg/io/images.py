"""2D image-folder datasets: windowed PNG/JPG pictures instead of HU volumes.

Two layouts are read by :func:`read_image_folder`:

* a ``labels.csv`` (in the root, or given explicitly) with an image column (``image``,
  ``filename`` or ``path``: a path relative to the root, or a numeric id such as ``49`` for
  ``049.png``) and either a ``label`` column (one class per image) or the SUBTYPES columns
  (multilabel);
* class sub-folders ``root/<class>/**/*.png|jpg|jpeg``.

Class names are read case-insensitively (:func:`canonical_class`): negative names (``normal``,
``negative``, ``no_hemorrhage``, ``0``, ...) become class 0 ``"normal"``; ``hemorrhage``,
``any``, ``ich`` and ``1`` an unspecified bleed ``"hemorrhage"``; subtype names and their
abbreviations (``EDH``, ``IPH``, ``IVH``, ``SAH``, ``SDH``) the SUBTYPES name. Binary data gives
``["normal", "hemorrhage"]``. :meth:`ImageFolderIndex.multilabel_targets` turns any layout into
the six-label ``(N, 6)`` targets, NaN where a subtype is unknown.

Every image has a group (patient or study) so that a split keeps a patient on one side: a group
column of labels.csv, the patient folder of ``root/<class>/<patient>/x.png``, or a user regex.
Without one, each image is its own group and :attr:`ImageFolderIndex.warnings` says so.

Pixels are decoded by :func:`load_image` into float32 ``(C, H, W)`` in [0, 1]. These pictures
are already windowed, so their values are display intensities, not HU.

Class names live in ``ichseg.io.image_classes`` and decoding and finding pictures in
``ichseg.io.image_files``; their public names are importable from here too.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ichseg.errors import ConfigError, InputError
from ichseg.io.image_classes import (
    HEMORRHAGE,
    HEMORRHAGE_NAMES,
    NEGATIVE_NAMES,
    NORMAL,
    SPECIFIC_SUBTYPES,
    SUBTYPE_NAMES,
    canonical_class,
    multilabel_from_classes,
    normalise_name,
    resolve_classes,
)
from ichseg.io.image_files import (
    IMAGE_SUFFIXES,
    check_image_options,
    find_images,
    is_image_file,
    load_image,
    verify_image,
)
from ichseg.io.labels import csv_rows

__all__ = [
    "GROUP_COLUMNS",
    "HEMORRHAGE",
    "HEMORRHAGE_NAMES",
    "IMAGE_COLUMNS",
    "IMAGE_SUFFIXES",
    "NEGATIVE_NAMES",
    "NORMAL",
    "SUBTYPE_NAMES",
    "ImageFolderIndex",
    "canonical_class",
    "find_images",
    "load_image",
    "multilabel_from_classes",
    "read_image_folder",
]
from ichseg.volume import SUBTYPES

IMAGE_COLUMNS: tuple[str, ...] = ("image", "filename", "path")
"""Accepted names of the image column of labels.csv, in order of preference."""

GROUP_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "patient",
    "study_id",
    "study",
    "group",
    "case",
)
"""Columns of labels.csv that give the group (patient or study) of an image, in order of
preference; matched case-insensitively, with spaces and hyphens read as underscores."""
_DIGITS = re.compile(r"\d+", re.ASCII)


@dataclass
class ImageFolderIndex:
    """The images of a 2D dataset with their targets; pixels are loaded on demand.

    Attributes:
        paths: image files.
        targets: int64 class index per image (multiclass) or ``(N, 6)`` float32 in SUBTYPES
            order (multilabel, from the subtype columns of labels.csv).
        classes: class names; index i names target i (multiclass) or column i (multilabel).
            In multiclass data with recognised names, class 0 is ``"normal"``.
        task: "multiclass" (a label column or class folders) or "multilabel".
        groups: patient/study id per image, to keep a patient on one side of a split.
        root: the dataset folder.
        channels: channels :meth:`load` returns (1 or 3).
        size: ``(h, w)`` :meth:`load` resizes to, or None for native size.
        warnings: things to tell the user: the one-group-per-image fallback, skipped class
            folders, stray images, class names that are not hemorrhage names.
        group_source: how :attr:`groups` were found: ``"column:<name>"`` (a labels.csv
            column), ``"folder"`` (``root/<class>/<patient>/``), ``"pattern"`` (the
            ``group_pattern`` regex) or ``"image"`` (one group per image, so a split may put
            one patient in train and test); ``"<source>+image"`` when only some images fell
            back to one group per image.
        labels_csv: the labels table, or None for the class-folder layout.
    """

    paths: list[Path]
    targets: np.ndarray
    classes: list[str]
    task: Literal["multiclass", "multilabel"]
    groups: list[str]
    root: Path = Path(".")
    channels: int = 3
    size: tuple[int, int] | None = None
    warnings: list[str] = field(default_factory=list)
    group_source: str = "image"
    labels_csv: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(C, H, W)`` float32 and target of one entry.

        Args:
            index: position in :attr:`paths`.
        """
        image = load_image(self.paths[index], self.channels, self.size)
        return image, self.targets[index]

    def multilabel_targets(self, exclusive_subtypes: bool = True) -> np.ndarray:
        """Six-label targets ``(N, 6)`` float32 in SUBTYPES order, NaN where unknown.

        Multilabel data is returned as read. For one class per image see
        :func:`multilabel_from_classes`: normal rows are all 0, a bleed of unspecified
        subtype is ``any`` = 1 with NaN subtypes, a subtype class sets its own column.

        Args:
            exclusive_subtypes: a subtype-named image has none of the other four subtypes
                (0); False leaves them unknown (NaN). Ignored for multilabel data.

        Raises:
            InputError: no class is a normal, hemorrhage or subtype name.
        """
        if self.task == "multilabel":
            return np.array(self.targets, dtype=np.float32)
        return multilabel_from_classes(
            self.targets, self.classes, exclusive_subtypes, where=self._source()
        )

    def multiclass_targets(self) -> tuple[np.ndarray, list[str]]:
        """Class index per image (int64) and the class names, for ``multiclass`` mode.

        Raises:
            InputError: the labels are the six subtype columns, not one class per image.
        """
        if self.task != "multiclass":
            raise InputError(
                self._source(),
                "labels are the subtype columns (multilabel); multiclass mode needs a "
                "'label' column or class sub-folders",
            )
        return np.array(self.targets, dtype=np.int64), list(self.classes)

    def _source(self) -> Path:
        return self.labels_csv if self.labels_csv is not None else self.root


class _ImageFinder:
    """Turns the image column of labels.csv into files, names first, numeric ids second."""

    def __init__(self, root: Path, csv_path: Path) -> None:
        self.root = root
        self.csv_path = csv_path
        self._numbered: dict[int, list[Path]] | None = None

    def find(self, name: str, line: int) -> Path:
        image = Path(name)
        full = image if image.is_absolute() else self.root / image
        if full.is_file():
            return full
        if not _DIGITS.fullmatch(name):
            raise InputError(self.csv_path, f"line {line}: image file {full} not found")
        number = int(name)
        matches = self._by_number().get(number, [])
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise InputError(
                self.csv_path,
                f"line {line}: image id {name} matches no file: no {full} and no image "
                f"named {number}, {number:03d}, ... (.png/.jpg) under {self.root}",
            )
        shown = ", ".join(_relative(p, self.root) for p in matches[:3])
        more = ", ..." if len(matches) > 3 else ""
        raise InputError(
            self.csv_path,
            f"line {line}: image id {name} matches {len(matches)} images ({shown}{more}); "
            "write the file path instead",
        )

    def _by_number(self) -> dict[int, list[Path]]:
        if self._numbered is None:
            self._numbered = defaultdict(list)
            for path in find_images(self.root):
                if _DIGITS.fullmatch(path.stem):
                    self._numbered[int(path.stem)].append(path)
        return self._numbered


def _relative(path: Path, root: Path) -> str:
    """Path relative to the root in POSIX form; absolute when it lies outside the root."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# --------------------------------------------------------------------------------------------
# Layouts


@dataclass
class _Layout:
    """What a layout reader found, before classes and groups are settled."""

    paths: list[Path]
    labels: list[str]  # one class name per image (multiclass)
    vectors: np.ndarray | None  # (N, 6) from the subtype columns (multilabel)
    known_groups: list[str | None]  # None: this image has no group of its own
    group_source: str
    no_group: str  # why images lack a group, for the fallback warning
    fix: str  # how the user gives them one
    warnings: list[str]


def _folder_layout(root: Path) -> _Layout:
    warnings: list[str] = []
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
    paths: list[Path] = []
    labels: list[str] = []
    groups: list[str | None] = []
    meaning: dict[str, list[str]] = defaultdict(list)
    for folder in class_dirs:
        images = find_images(folder)
        if not images:
            warnings.append(f"class folder {folder.name!r} has no images; skipped")
            continue
        meaning[canonical_class(folder.name) or folder.name.strip().lower()].append(folder.name)
        for image in images:
            paths.append(image)
            labels.append(folder.name)
            parts = image.relative_to(folder).parts
            # root/<class>/<patient>/x.png: the sub-folder is the patient. The bare folder name
            # is the group, so a patient with folders under two classes stays one group.
            groups.append(parts[0] if len(parts) > 1 else None)
    if not paths:
        if loose:
            raise InputError(
                root,
                "images but no labels.csv and no class sub-folders; "
                "add labels.csv or move images into <root>/<class>/",
            )
        raise InputError(root, f"no PNG/JPG images found under {root}")
    if loose:
        warnings.append(f"{len(loose)} image(s) directly under the root have no class; ignored")
    for name, folders in meaning.items():
        if len(folders) > 1:
            warnings.append(f"class folders {', '.join(folders)} all mean {name!r}; merged")
    return _Layout(
        paths=paths,
        labels=labels,
        vectors=None,
        known_groups=groups,
        group_source="folder",
        no_group="images sit directly in their class folder, not in a patient sub-folder",
        fix="move each patient's images into <root>/<class>/<patient>/ or set group_pattern",
        warnings=warnings,
    )


def _unit_float(csv_path: Path, line: int, column: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0.0 <= number <= 1.0:
        raise InputError(
            csv_path, f"line {line}: column {column!r} must be a number in [0, 1], got {value!r}"
        )
    return number


def _group_column(header: list[str]) -> int | None:
    normalised = [normalise_name(name) for name in header]
    for wanted in GROUP_COLUMNS:
        if wanted in normalised:
            return normalised.index(wanted)
    return None


def _csv_layout(root: Path, csv_path: Path) -> _Layout:
    header, rows = csv_rows(csv_path)
    lower = {name.lower(): i for i, name in reversed(list(enumerate(header)))}
    image_col = next((lower[c] for c in IMAGE_COLUMNS if c in lower), None)
    if image_col is None:
        raise InputError(
            csv_path,
            f"no image column; expected one of {', '.join(IMAGE_COLUMNS)} "
            f"(columns: {', '.join(header)})",
        )
    group_col = _group_column(header)
    # With only the five specific subtypes, "any" is their maximum, so a table that leaves it
    # out is still multilabel rather than unusable.
    multilabel = all(s in lower for s in SPECIFIC_SUBTYPES)
    if not multilabel and "label" not in lower:
        raise InputError(
            csv_path,
            "no label column; expected 'label' (one class per image) or the subtype columns "
            f"{', '.join(SUBTYPES)} (multilabel)",
        )
    finder = _ImageFinder(root, csv_path)
    paths: list[Path] = []
    groups: list[str | None] = []
    labels: list[str] = []
    vectors: list[list[float]] = []
    first_line: dict[Path, int] = {}
    repeats: list[str] = []
    for line, cells in rows:
        name = cells[image_col]
        if not name:
            raise InputError(csv_path, f"line {line}: empty image name")
        full = finder.find(name, line)
        if full in first_line:
            repeats.append(f"{_relative(full, root)} (lines {first_line[full]} and {line})")
        first_line.setdefault(full, line)
        paths.append(full)
        groups.append((cells[group_col] or None) if group_col is not None else None)
        if multilabel:
            vector = [_unit_float(csv_path, line, s, cells[lower[s]]) for s in SPECIFIC_SUBTYPES]
            any_value = (
                _unit_float(csv_path, line, "any", cells[lower["any"]])
                if "any" in lower
                else max(vector)
            )
            vectors.append([any_value, *vector])
        else:
            label = cells[lower["label"]]
            if not label:
                raise InputError(csv_path, f"line {line}: empty label")
            labels.append(label)
    if not paths:
        raise InputError(csv_path, "lists no images")
    warnings = []
    if repeats:
        warnings.append(
            f"{len(repeats)} image(s) listed more than once in {csv_path}, each row kept as a "
            f"sample: {', '.join(repeats[:3])}{', ...' if len(repeats) > 3 else ''}"
        )
    if group_col is None:
        no_group = f"{csv_path.name} has no patient/study column ({', '.join(GROUP_COLUMNS)})"
    else:
        no_group = f"column {header[group_col]!r} of {csv_path.name} is empty"
    return _Layout(
        paths=paths,
        labels=labels,
        vectors=np.asarray(vectors, dtype=np.float32) if multilabel else None,
        known_groups=groups,
        group_source=f"column:{header[group_col]}" if group_col is not None else "image",
        no_group=no_group,
        fix="add a patient_id column or set group_pattern",
        warnings=warnings,
    )


def _pattern_groups(pattern: str, paths: list[Path], root: Path) -> list[str]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"group_pattern {pattern!r}: not a regular expression ({exc})") from None
    if "group" not in regex.groupindex:
        raise ConfigError(f"group_pattern {pattern!r}: needs a named group (?P<group>...)")
    groups: list[str] = []
    failed: list[Path] = []
    for path in paths:
        found = regex.search(_relative(path, root))
        if found is None or not found.group("group"):
            failed.append(path)
        else:
            groups.append(found.group("group"))
    if failed:
        raise InputError(
            failed[0],
            f"path relative to {root} does not match group_pattern {pattern!r} "
            f"({len(failed)} of {len(paths)} images do not)",
        )
    return groups


def _settle_groups(
    layout: _Layout, root: Path, pattern: str | None
) -> tuple[list[str], str, list[str]]:
    """Group per image, the group source and the fallback warning (if any)."""
    if pattern is not None:
        return _pattern_groups(pattern, layout.paths, root), "pattern", []
    missing = sum(group is None for group in layout.known_groups)
    # The fallback group is the image's path, not its stem: normal/1.png and bleed/1.png are
    # two images, and a shared stem would make them one group.
    groups = [
        group if group is not None else _relative(path, root)
        for group, path in zip(layout.known_groups, layout.paths, strict=True)
    ]
    total = len(groups)
    if missing == 0:
        return groups, layout.group_source, []
    if missing == total:
        warning = (
            f"NO PATIENT GROUPS: {layout.no_group}, so each image is its own group; images of "
            "one patient may be split across train and test, which leaks and inflates test "
            f"scores; {layout.fix}"
        )
        return groups, "image", [warning]
    warning = (
        f"PARTIAL PATIENT GROUPS: {missing} of {total} images have no group "
        f"({layout.no_group}), so each of them is its own group; they may land in train and "
        f"test with other images of their patient; {layout.fix}"
    )
    return groups, f"{layout.group_source}+image", [warning]


def read_image_folder(
    root: str | Path,
    labels_csv: str | Path | None = None,
    channels: int = 3,
    size: tuple[int, int] | None = None,
    verify: bool = False,
    group_pattern: str | None = None,
) -> ImageFolderIndex:
    """Index a folder of windowed PNG/JPG images and their labels.

    Args:
        root: dataset folder; image paths in a labels CSV are relative to it.
        labels_csv: labels table; defaults to ``root/labels.csv`` when that exists, otherwise
            the class sub-folder layout is used.
        channels: channels :meth:`ImageFolderIndex.load` returns (1 or 3).
        size: ``(h, w)`` that :meth:`ImageFolderIndex.load` resizes to; None keeps each
            image's own size.
        verify: open every image now so corrupt files fail here rather than mid-training.
        group_pattern: regular expression with a named group ``group``, searched in each
            image's path relative to the root (POSIX separators), e.g.
            ``r"^(?P<group>[^/]+)/"`` or ``r"(?P<group>patient\\d+)_"``; it overrides group
            columns and patient folders.

    Raises:
        InputError: missing root or CSV, no images, a CSV row naming a missing file or an id
            that matches no image or several, a CSV without an image or label column, a
            corrupt image (with ``verify``), an image path that ``group_pattern`` misses.
        ConfigError: ``group_pattern`` is not a regex with a named group ``group``.
    """
    size = check_image_options(channels, size)
    root = Path(root)
    if not root.exists():
        raise InputError(root, "image folder not found")
    if not root.is_dir():
        raise InputError(root, "expected a folder of images, got a file")
    csv_path: Path | None = None
    if labels_csv is not None:
        csv_path = Path(labels_csv)
        if not csv_path.is_file():
            raise InputError(csv_path, "labels CSV not found")
    elif (root / "labels.csv").is_file():
        csv_path = root / "labels.csv"
    layout = _folder_layout(root) if csv_path is None else _csv_layout(root, csv_path)
    groups, group_source, group_warnings = _settle_groups(layout, root, group_pattern)
    if layout.vectors is not None:
        targets, classes = layout.vectors, list(SUBTYPES)
        task: Literal["multiclass", "multilabel"] = "multilabel"
        class_warnings: list[str] = []
    else:
        classes, targets, class_warnings = resolve_classes(layout.labels, csv_path or root)
        task = "multiclass"
    if verify:
        for path in layout.paths:
            verify_image(path)
    return ImageFolderIndex(
        paths=layout.paths,
        targets=targets,
        classes=classes,
        task=task,
        groups=groups,
        root=root,
        channels=channels,
        size=size,
        warnings=group_warnings + layout.warnings + class_warnings,
        group_source=group_source,
        labels_csv=csv_path,
    )

"""2D image-folder datasets: windowed PNG/JPG pictures instead of HU volumes.

Two layouts are read by :func:`read_image_folder`:

* a ``labels.csv`` (in the root, or given explicitly) with an image column (``image``,
  ``filename`` or ``path``, relative to the root) and either a ``label`` column (multiclass)
  or the SUBTYPES columns (multilabel);
* class sub-folders ``root/<class>/**/*.png|jpg|jpeg`` (multiclass, classes sorted by name).

Pixels are decoded by :func:`load_image` into float32 ``(C, H, W)`` in [0, 1]. These pictures
are already windowed, so their values are display intensities, not HU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from ichseg.errors import InputError
from ichseg.io.labels import csv_rows
from ichseg.volume import SUBTYPES

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
"""File suffixes (compared case-insensitively) that count as images in folder layouts."""

IMAGE_COLUMNS: tuple[str, ...] = ("image", "filename", "path")
"""Accepted names of the image column of labels.csv, in order of preference."""

GROUP_COLUMNS: tuple[str, ...] = ("patient_id", "study_id")
"""Columns of labels.csv that give the group (patient or study) of an image."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Pillow modes that convert losslessly (apart from dropping alpha) to L or RGB.
_GRAY_MODES = ("1", "L", "LA", "La")
_COLOR_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_INT = re.compile(r"[+-]?\d+")


@dataclass
class ImageFolderIndex:
    """The images of a 2D dataset with their targets; pixels are loaded on demand.

    Attributes:
        paths: image files.
        targets: int64 class index per image (multiclass) or ``(N, 6)`` float32 in SUBTYPES
            order (multilabel).
        classes: class names; index i names target i (multiclass) or column i (multilabel).
        task: "multiclass" or "multilabel".
        groups: patient/study id per image, to keep a patient on one side of a split.
        root: the dataset folder.
        channels: channels :meth:`load` returns (1 or 3).
        size: ``(h, w)`` :meth:`load` resizes to, or None for native size.
        warnings: things skipped while indexing (empty class folders, stray images).
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

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(C, H, W)`` float32 and target of one entry.

        Args:
            index: position in :attr:`paths`.
        """
        image = load_image(self.paths[index], self.channels, self.size)
        return image, self.targets[index]


def _check_options(channels: int, size: tuple[int, int] | None) -> tuple[int, int] | None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if size is None:
        return None
    if len(size) != 2 or any(int(v) != v or v < 1 for v in size):
        raise ValueError(f"size must be (height, width) with positive integers, got {size!r}")
    return int(size[0]), int(size[1])


# --------------------------------------------------------------------------------------------
# Pixels


def _to_float(image: Image.Image, path: Path) -> np.ndarray:
    """Pixels as float32 in [0, 1]: ``(H, W)`` for gray sources, ``(H, W, 3)`` for colour."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # "I" is how some Pillow versions hand back 16-bit PNGs; the stored range is 16 bits
        # either way, so divide by the full range, not by the image's own maximum.
        values = np.asarray(image).astype(np.float32) / 65535.0
        return np.clip(values, 0.0, 1.0)
    if mode in _GRAY_MODES:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if mode in ("P", "PA"):
        # Through RGBA so palette transparency is honoured by Pillow, then alpha is dropped.
        return np.asarray(image.convert("RGBA"), dtype=np.float32)[..., :3] / 255.0
    if mode in _COLOR_MODES:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    raise InputError(path, f"unsupported image mode {mode!r} (expected gray, RGB or palette)")


def _resize(channel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # Resizing in float ("F" mode) keeps 16-bit precision that an 8-bit round trip would lose.
    resized = Image.fromarray(channel).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def load_image(
    path: str | Path, channels: int = 3, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode a PNG/JPG into float32 ``(C, H, W)`` in [0, 1].

    8-bit data is divided by 255 and 16-bit gray by 65535; alpha is dropped (not composited),
    palettes are expanded, EXIF orientation is applied. Colour to gray uses ITU-R 601 luma.

    Args:
        path: the image file.
        channels: 1 (gray) or 3 (RGB; gray sources are repeated).
        size: ``(h, w)`` to resize to with bilinear filtering, or None for native size.

    Raises:
        InputError: missing, unreadable or corrupt file, or an unsupported pixel mode.
        ValueError: bad ``channels`` or ``size``.
    """
    size = _check_options(channels, size)
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "image not found")
    try:
        with Image.open(path) as image:
            image.load()
            if image.getexif().get(0x0112, 1) != 1:
                image = ImageOps.exif_transpose(image)
            pixels = _to_float(image, path)
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(path, f"unreadable or corrupt image ({detail})") from None
    if pixels.ndim == 2:
        pixels = pixels[None]
    else:
        pixels = pixels.transpose(2, 0, 1)
    if channels == 1 and pixels.shape[0] == 3:
        pixels = np.tensordot(_LUMA, pixels, axes=1)[None]
    if size is not None and pixels.shape[1:] != size:
        pixels = np.stack([_resize(np.ascontiguousarray(c), size) for c in pixels])
        pixels = np.clip(pixels, 0.0, 1.0)
    if channels == 3 and pixels.shape[0] == 1:
        pixels = np.repeat(pixels, 3, axis=0)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _verify(path: Path) -> None:
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(path, f"unreadable or corrupt image ({detail})") from None


# --------------------------------------------------------------------------------------------
# Layouts


def _is_image(path: Path) -> bool:
    # Dot files include macOS "._name.png" resource forks, which are not images.
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative[:-1]):
            continue
        if _is_image(path) and path.is_file():
            found.append(path)
    return sorted(found)


def _index_from_folders(root: Path) -> ImageFolderIndex:
    warnings: list[str] = []
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = [p for p in root.iterdir() if p.is_file() and _is_image(p)]
    paths: list[Path] = []
    targets: list[int] = []
    groups: list[str] = []
    classes: list[str] = []
    for folder in class_dirs:
        images = _images_under(folder)
        if not images:
            warnings.append(f"class folder {folder.name!r} has no images; skipped")
            continue
        for image in images:
            paths.append(image)
            targets.append(len(classes))
            parts = image.relative_to(folder).parts
            # root/<class>/<patient>/x.png: the sub-folder is the patient, and grouping by it
            # keeps all slices of a patient on one side of a split.
            groups.append(parts[0] if len(parts) > 1 else image.stem)
        classes.append(folder.name)
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
    return ImageFolderIndex(
        paths=paths,
        targets=np.asarray(targets, dtype=np.int64),
        classes=classes,
        task="multiclass",
        groups=groups,
        root=root,
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


def _index_from_csv(root: Path, csv_path: Path) -> ImageFolderIndex:
    header, rows = csv_rows(csv_path)
    lower = {name.lower(): i for i, name in reversed(list(enumerate(header)))}
    image_col = next((lower[c] for c in IMAGE_COLUMNS if c in lower), None)
    if image_col is None:
        raise InputError(
            csv_path,
            f"no image column; expected one of {', '.join(IMAGE_COLUMNS)} "
            f"(columns: {', '.join(header)})",
        )
    group_col = next((lower[c] for c in GROUP_COLUMNS if c in lower), None)
    specific = SUBTYPES[1:]
    # With only the five specific subtypes, "any" is their maximum, so a table that leaves it
    # out is still multilabel rather than unusable.
    multilabel = all(s in lower for s in specific)
    if not multilabel and "label" not in lower:
        raise InputError(
            csv_path,
            "no label column; expected 'label' (multiclass) or the subtype columns "
            f"{', '.join(SUBTYPES)} (multilabel)",
        )
    paths: list[Path] = []
    groups: list[str] = []
    raw_labels: list[str] = []
    vectors: list[list[float]] = []
    for line, cells in rows:
        name = cells[image_col]
        if not name:
            raise InputError(csv_path, f"line {line}: empty image name")
        image = Path(name)
        full = image if image.is_absolute() else root / image
        if not full.is_file():
            raise InputError(csv_path, f"line {line}: image file {full} not found")
        paths.append(full)
        group = cells[group_col] if group_col is not None else ""
        groups.append(group or full.stem)
        if multilabel:
            vector = [_unit_float(csv_path, line, s, cells[lower[s]]) for s in specific]
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
            raw_labels.append(label)
    if not paths:
        raise InputError(csv_path, "lists no images")
    if multilabel:
        return ImageFolderIndex(
            paths=paths,
            targets=np.asarray(vectors, dtype=np.float32),
            classes=list(SUBTYPES),
            task="multilabel",
            groups=groups,
            root=root,
        )
    if all(_INT.fullmatch(label) for label in raw_labels):
        # Integer labels are class indices already; keep them, so that a gap (no class 1 in
        # this subset) does not renumber the classes relative to other subsets.
        numbers = [int(label) for label in raw_labels]
        if min(numbers) < 0:
            raise InputError(csv_path, f"negative class index {min(numbers)} in 'label'")
        classes = [str(i) for i in range(max(numbers) + 1)]
        targets = np.asarray(numbers, dtype=np.int64)
    else:
        classes = sorted(set(raw_labels))
        position = {name: i for i, name in enumerate(classes)}
        targets = np.asarray([position[label] for label in raw_labels], dtype=np.int64)
    return ImageFolderIndex(
        paths=paths,
        targets=targets,
        classes=classes,
        task="multiclass",
        groups=groups,
        root=root,
    )


def read_image_folder(
    root: str | Path,
    labels_csv: str | Path | None = None,
    channels: int = 3,
    size: tuple[int, int] | None = None,
    verify: bool = False,
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

    Raises:
        InputError: missing root or CSV, no images, a CSV row naming a missing file, a CSV
            without an image or label column, a corrupt image (with ``verify``).
    """
    size = _check_options(channels, size)
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
    index = _index_from_folders(root) if csv_path is None else _index_from_csv(root, csv_path)
    index.channels = channels
    index.size = size
    if verify:
        for path in index.paths:
            _verify(path)
    return index

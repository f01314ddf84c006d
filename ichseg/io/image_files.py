"""PNG/JPG pictures: decoding to float32 in [0, 1], and finding them in a folder.

The pictures are already windowed, so their values are display intensities, not HU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ichseg.errors import InputError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
"""File suffixes (compared case-insensitively) that count as images in folder layouts."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Pillow modes that convert losslessly (apart from dropping alpha) to L or RGB.
_GRAY_MODES = ("1", "L", "LA", "La")
_COLOR_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def check_image_options(channels: int, size: tuple[int, int] | None) -> tuple[int, int] | None:
    """Validate the ``channels`` and ``size`` of :func:`load_image`; ``size`` as two ints.

    Raises:
        ValueError: channels other than 1 or 3, or a size that is not two positive integers.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if size is None:
        return None
    if len(size) != 2 or any(int(v) != v or v < 1 for v in size):
        raise ValueError(f"size must be (height, width) with positive integers, got {size!r}")
    return int(size[0]), int(size[1])


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
    size = check_image_options(channels, size)
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


def verify_image(path: Path) -> None:
    """Check that a picture's file is intact without decoding its pixels.

    Raises:
        InputError: unreadable or corrupt file.
    """
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(path, f"unreadable or corrupt image ({detail})") from None


# --------------------------------------------------------------------------------------------
# Files


def is_image_file(path: Path) -> bool:
    """Whether a path has an image suffix and is not a dot file."""
    # Dot files include macOS "._name.png" resource forks, which are not images.
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_images(folder: str | Path) -> list[Path]:
    """Every PNG/JPG file under a folder, sorted, skipping dot files and dot folders.

    Args:
        folder: the folder to search recursively.
    """
    folder = Path(folder)
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative[:-1]):
            continue
        if is_image_file(path) and path.is_file():
            found.append(path)
    return sorted(found)

"""Pure mask operations used by the masking step (:mod:`ichseg.preprocess.pipeline`).

Masking happens on HU (background set to air) or on windowed channels (background set to the
window minimum, 0.0). An in-plane dilation in mm keeps a rim around the mask so blood against
the inner table is never cut by a slightly tight mask, and a crop to the (dilated) mask's
bounding box (one box for the whole volume, so all slices keep one size) removes the scalp and
the field of view around the head. The policy that combines them is decided in one place, the
run's :class:`~ichseg.preprocess.pipeline.Preprocessor`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from ichseg.config import MaskingConfig
from ichseg.errors import ConfigError
from ichseg.options import look_up_option
from ichseg.volume import AIR_HU, CTVolume

BACKGROUND_VALUES: dict[str, float] = {"air": AIR_HU, "min": 0.0}
"""Fill value per background mode: air in HU, or the minimum of a [0, 1] window."""


def _pixel_spacing(spacing: Sequence[float]) -> tuple[float, float]:
    """In-plane (y, x) spacing from a (y, x) or (z, y, x) sequence."""
    values = tuple(float(s) for s in spacing)
    if len(values) == 3:
        values = values[1:]
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"spacing must be (y, x) or (z, y, x) in mm, got {spacing}")
    return values  # type: ignore[return-value]


def dilate_mask(mask: np.ndarray, dilation_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Grow a ``(y, x)`` or ``(z, y, x)`` mask in-plane by ``dilation_mm`` (Euclidean disk).

    Slices are dilated independently; an empty slice stays empty.
    """
    mask = np.asarray(mask, dtype=bool)
    if dilation_mm <= 0 or not mask.any():
        return mask.copy()
    sy, sx = _pixel_spacing(spacing)
    if mask.ndim == 2:
        return ndi.distance_transform_edt(~mask, sampling=(sy, sx)) <= dilation_mm
    if mask.ndim != 3:
        raise ValueError(f"mask must be 2D or 3D, got shape {mask.shape}")
    out = np.zeros_like(mask)
    for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        out[z] = ndi.distance_transform_edt(~mask[z], sampling=(sy, sx)) <= dilation_mm
    return out


def _broadcast_mask(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shape ``mask`` to broadcast against ``images``.

    Accepted pairs: a ``(H, W)`` mask with any ``(..., H, W)`` images; a ``(Z, H, W)`` mask with
    ``(Z, H, W)`` HU or ``(Z, C, H, W)`` channels.
    """
    if mask.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"mask {mask.shape} and images {images.shape} differ in (H, W)")
    if mask.ndim == 2 or mask.shape == images.shape:
        return mask
    if mask.ndim == 3 and images.ndim == 4 and mask.shape[0] == images.shape[0]:
        return mask[:, None]
    raise ValueError(f"cannot match mask {mask.shape} to images {images.shape}")


def apply_mask(
    images: np.ndarray,
    mask: np.ndarray,
    mode: Literal["air", "min"] = "air",
    dilation_mm: float = 0.0,
    spacing: Sequence[float] = (1.0, 1.0),
) -> np.ndarray:
    """Set everything outside ``mask`` to the background value; the input is not modified.

    Args:
        images: HU (``mode="air"``) or windowed channels (``mode="min"``), shaped ``(H, W)``,
            ``(C, H, W)``, ``(Z, H, W)`` or ``(Z, C, H, W)``.
        mask: ``(H, W)`` or ``(Z, H, W)``; non-zero is inside.
        mode: ``"air"`` fills -1000 HU, ``"min"`` fills 0.0 (the bottom of every window).
        dilation_mm: in-plane growth of the mask before applying it.
        spacing: pixel size ``(y, x)`` (or ``(z, y, x)``) in mm, for the dilation.

    Returns:
        A new array of the same shape and dtype as ``images``.
    """
    look_up_option("background mode", mode, BACKGROUND_VALUES, ValueError)
    images = np.asarray(images)
    keep = _broadcast_mask(images, dilate_mask(mask, dilation_mm, spacing))
    return np.where(keep, images, np.asarray(BACKGROUND_VALUES[mode], dtype=images.dtype))


def mask_bbox(
    mask: np.ndarray, margin_mm: float = 0.0, spacing: Sequence[float] = (1.0, 1.0)
) -> tuple[int, int, int, int]:
    """In-plane bounding box ``(y0, y1, x0, x1)`` (half-open) of a mask over all its slices.

    The margin is converted to whole pixels per axis (rounded up) and the box is clipped to the
    image. An empty mask gives the whole image.
    """
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape[-2:]
    if not mask.any():
        return 0, height, 0, width
    flat = mask.reshape(-1, height, width).any(axis=0)
    rows, cols = np.flatnonzero(flat.any(axis=1)), np.flatnonzero(flat.any(axis=0))
    sy, sx = _pixel_spacing(spacing)
    my, mx = math.ceil(margin_mm / sy - 1e-9), math.ceil(margin_mm / sx - 1e-9)
    return (
        max(int(rows[0]) - my, 0),
        min(int(rows[-1]) + 1 + my, height),
        max(int(cols[0]) - mx, 0),
        min(int(cols[-1]) + 1 + mx, width),
    )


HEAD_THRESHOLD_HU = -300.0
"""Above it: skin, fat, brain, bone; below it: air, foam head rests and pillows."""

HEAD_OPENING_MM = 5.0
"""Bridges narrower than about twice this (a strap, a cushion's edge touching the head holder in
one slice) are opened before the head is chosen, so they do not join the table to it."""


def head_bbox(
    hu: np.ndarray,
    margin_mm: float = 5.0,
    spacing: Sequence[float] = (1.0, 1.0),
    threshold_hu: float = HEAD_THRESHOLD_HU,
) -> tuple[int, int, int, int]:
    """In-plane bounding box ``(y0, y1, x0, x1)`` (half-open) of the head in a volume.

    The head is the largest connected region of the tissue above ``threshold_hu`` seen through
    the whole volume (its projection along z), after an opening by ``HEAD_OPENING_MM`` that
    cuts thin bridges, so a table or head holder is left out, and one box covers every slice.
    No mask is needed: the crop works on unmasked rungs and on series the intracranial
    segmenter never saw. Parts of the head thinner than the opening (ears, the nose tip) can
    fall outside the box; the margin takes most of them back.

    Args:
        hu: ``(Z, H, W)`` or ``(H, W)`` Hounsfield units.
        margin_mm: margin around the box in mm.
        spacing: pixel size ``(y, x)`` (or ``(z, y, x)``) in mm.
        threshold_hu: tissue threshold.

    Returns:
        The box; the whole image when no tissue is found.
    """
    hu = np.asarray(hu)
    tissue = (hu > threshold_hu).reshape(-1, *hu.shape[-2:]).any(axis=0)
    radius = max(1, round(HEAD_OPENING_MM / max(_pixel_spacing(spacing))))
    opened = ndi.binary_opening(tissue, ndi.generate_binary_structure(2, 1), iterations=radius)
    if opened.any():  # a head smaller than the opening keeps its unopened shape
        tissue = opened
    from ichseg.segmentation.classical import largest_component

    return mask_bbox(largest_component(tissue), margin_mm, spacing)


def crop_to_mask(
    images: np.ndarray,
    mask: np.ndarray,
    margin_mm: float = 5.0,
    spacing: Sequence[float] = (1.0, 1.0),
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop the last two axes of ``images`` to the mask's bounding box plus a margin.

    Args:
        images: any ``(..., H, W)`` array.
        mask: ``(H, W)`` or ``(Z, H, W)``; for a volume one box covers all slices so they keep a
            common size.
        margin_mm: margin around the box in mm.
        spacing: pixel size ``(y, x)`` (or ``(z, y, x)``) in mm.

    Returns:
        The cropped array (a copy) and the box ``(y0, y1, x0, x1)``, half-open.
    """
    images = np.asarray(images)
    if np.shape(mask)[-2:] != images.shape[-2:]:
        raise ValueError(f"mask {np.shape(mask)} and images {images.shape} differ in (H, W)")
    y0, y1, x0, x1 = mask_bbox(mask, margin_mm, spacing)
    return images[..., y0:y1, x0:x1].copy(), (y0, y1, x0, x1)


def make_masker(config: MaskingConfig) -> Callable[[CTVolume], np.ndarray]:
    """A function ``CTVolume -> uint8 (z, y, x) mask`` for the configured method.

    Raises:
        ConfigError: ``method="unet"`` without a readable checkpoint.
    """
    if config.method == "classical":
        from ichseg.segmentation.classical import classical_intracranial_mask

        def classical(volume: CTVolume) -> np.ndarray:
            return classical_intracranial_mask(volume.hu, volume.spacing)

        return classical
    if config.checkpoint is None:
        raise ConfigError("masking.method 'unet' needs masking.checkpoint")
    if not Path(config.checkpoint).is_file():
        raise ConfigError(f"masking.checkpoint {config.checkpoint}: no such file")
    from ichseg.segmentation.unet import load_segmenter

    return load_segmenter(config.checkpoint)

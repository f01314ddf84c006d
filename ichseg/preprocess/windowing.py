"""HU windowing and channel stacking as pure numpy functions.

Every function here is side-effect free and works on any leading shape, so the same code serves
a single slice, a volume and a batch; transforms and datasets only call these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """A display window in HU."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"window width must be positive, got {self.width}")

    @property
    def low(self) -> float:
        return self.center - self.width / 2.0

    @property
    def high(self) -> float:
        return self.center + self.width / 2.0


STANDARD_WINDOWS: dict[str, Window] = {
    "brain": Window(40.0, 80.0),
    "subdural": Window(80.0, 200.0),
    "bone": Window(600.0, 2800.0),
    "stroke": Window(32.0, 8.0),
    "soft_tissue": Window(40.0, 380.0),
}
"""Named windows; configs refer to these by name or give ``{center, width}`` explicitly."""

DEFAULT_WINDOWS: tuple[str, ...] = ("brain", "subdural", "bone")

# Brain tissue, CSF and blood lie in this range; used to tell brain slices from the vertex/base.
BRAIN_HU_RANGE: tuple[float, float] = (0.0, 100.0)


def resolve_window(window: str | Window | tuple[float, float] | dict) -> Window:
    """Turn a name, a ``(center, width)`` pair or a mapping into a :class:`Window`."""
    if isinstance(window, Window):
        return window
    if isinstance(window, str):
        from ichseg.options import look_up_option

        return STANDARD_WINDOWS[look_up_option("window", window, STANDARD_WINDOWS, ValueError)]
    if isinstance(window, dict):
        return Window(float(window["center"]), float(window["width"]))
    center, width = window
    return Window(float(center), float(width))


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map HU linearly to [0, 1]: ``center - width/2`` -> 0 and ``center + width/2`` -> 1.

    Values outside the window are clipped. Output is float32.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def stack_windows(
    hu: np.ndarray, windows: Sequence[str | Window | tuple[float, float]] = DEFAULT_WINDOWS
) -> np.ndarray:
    """Window ``hu`` once per window and stack the results on a new axis before the last two.

    ``(..., H, W)`` -> ``(..., C, H, W)`` with C = len(windows).
    """
    resolved = [resolve_window(w) for w in windows]
    if not resolved:
        raise ValueError("at least one window is needed")
    hu = np.asarray(hu, dtype=np.float32)
    out = np.empty(hu.shape[:-2] + (len(resolved),) + hu.shape[-2:], dtype=np.float32)
    for index, w in enumerate(resolved):
        # In place in the output: the same arithmetic as window() without its temporaries.
        channel = out[..., index, :, :]
        np.subtract(hu, np.float32(w.low), out=channel)
        channel /= np.float32(w.width)
        np.clip(channel, 0.0, 1.0, out=channel)
    return out


def neighbour_index(num_slices: int, context: int) -> np.ndarray:
    """``(num_slices, 2k+1)`` indices of each slice's neighbours ``z-k .. z+k``, edges repeated.

    The one 2.5D gather of ichseg: channel stacks of a volume are indexed with it, so each
    slice is windowed and resized once however many neighbours use it.
    """
    if context < 0:
        raise ValueError("context must be >= 0")
    if num_slices < 1:
        raise ValueError("num_slices must be >= 1")
    offsets = np.arange(-context, context + 1)
    return np.clip(np.arange(num_slices)[:, None] + offsets[None, :], 0, num_slices - 1)


def in_range(hu: np.ndarray, hu_range: tuple[float, float] = BRAIN_HU_RANGE) -> np.ndarray:
    """Boolean per pixel: ``hu_range[0] <= hu <= hu_range[1]``."""
    hu = np.asarray(hu)
    return (hu >= hu_range[0]) & (hu <= hu_range[1])


def brain_fraction(hu: np.ndarray, hu_range: tuple[float, float] = BRAIN_HU_RANGE) -> np.ndarray:
    """Fraction of pixels within ``hu_range`` per slice (over the last two axes)."""
    hu = np.asarray(hu)
    return in_range(hu, hu_range).reshape(*hu.shape[:-2], -1).mean(axis=-1)


def nonblank_slices(
    volume_hu: np.ndarray,
    min_fraction: float = 0.2,
    hu_range: tuple[float, float] = BRAIN_HU_RANGE,
    within: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean per slice: True where at least ``min_fraction`` of pixels are brain-range HU.

    Args:
        volume_hu: ``(Z, H, W)``.
        min_fraction: threshold on the fraction of brain-range pixels.
        hu_range: HU interval counted as brain.
        within: optional ``(Z, H, W)`` mask; the fraction is then taken inside the head
            (pixels above -500 HU) instead of the whole field of view, which is steadier when
            the head fills a varying part of the image.
    """
    if within is None:
        return brain_fraction(volume_hu, hu_range) >= min_fraction
    inside = (volume_hu >= hu_range[0]) & (volume_hu <= hu_range[1]) & within
    denominator = np.maximum(within.reshape(within.shape[0], -1).sum(axis=1), 1)
    return inside.reshape(inside.shape[0], -1).sum(axis=1) / denominator >= min_fraction


def halve_slices(images: np.ndarray) -> np.ndarray:
    """A twofold shrink of the last two axes (even sizes): the mean of each 2 x 2 block.

    Bilinear sampling at pixel centres gives exactly this at a factor of two, in exact
    arithmetic (each output centre falls halfway between two input pixels on each axis), so
    :func:`resize_slices` uses it for 512 -> 256, in numpy: as fast as torch, and the slice
    cache's workers need not import torch (seconds each). The blocks are summed in one fixed
    order, ``((top left + top right) + (bottom left + bottom right)) / 4``.
    """
    height, width = images.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"halving needs even sizes, got {height} x {width}")
    out = np.add(images[..., 0::2, 0::2], images[..., 0::2, 1::2], dtype=np.float32)
    out += np.add(images[..., 1::2, 0::2], images[..., 1::2, 1::2], dtype=np.float32)
    out *= np.float32(0.25)
    return out


HALVING_UNITS_PER_LEVEL = 64
"""Fixed-point step of the twofold shrink to uint8 (:func:`halve_units`): windowed values are
summed in 1/64 of a uint8 level, so the four values of a 2 x 2 block (each at most 255 x 64)
sum within 16 bits."""
BLOCK_SUM_SHIFT = 8
"""A 2 x 2 block's sum in units, shifted right by this, is its mean in levels (4 x 64 = 2 ** 8)."""


def window_units(
    hu: np.ndarray, windows: Sequence[str | Window | tuple[float, float]] = DEFAULT_WINDOWS
) -> np.ndarray:
    """:func:`stack_windows` in uint16 counts of 1/64 of a uint8 level (0 to 16320, rounded
    half up): ``(..., H, W)`` -> ``(..., C, H, W)``, the input of :func:`halve_units`.

    Computed straight from HU (one float scratch slice per window, no float stack), so a
    512 -> 256 volume is shrunk as fast as the float path did it.
    """
    resolved = [resolve_window(w) for w in windows]
    if not resolved:
        raise ValueError("at least one window is needed")
    hu = np.asarray(hu, dtype=np.float32)
    out = np.empty(hu.shape[:-2] + (len(resolved),) + hu.shape[-2:], dtype=np.uint16)
    top = np.float32(255 * HALVING_UNITS_PER_LEVEL)
    scratch = np.empty(hu.shape, dtype=np.float32)
    for index, w in enumerate(resolved):
        np.subtract(hu, np.float32(w.low), out=scratch)
        scratch *= top / np.float32(w.width)
        scratch += np.float32(0.5)
        np.clip(scratch, np.float32(0.0), top + np.float32(0.5), out=scratch)
        np.copyto(out[..., index, :, :], scratch, casting="unsafe")  # truncation: half up
    return out


def block_sums_to_uint8(sums: np.ndarray) -> np.ndarray:
    """uint8 levels from sums of four :func:`window_units` values: the block mean, rounded
    half up (``(sum + 128) >> 8``)."""
    rounded = np.asarray(sums, dtype=np.uint32) + np.uint32(1 << (BLOCK_SUM_SHIFT - 1))
    rounded >>= np.uint32(BLOCK_SUM_SHIFT)
    return rounded.astype(np.uint8)


def halve_units(units: np.ndarray) -> np.ndarray:
    """:func:`window_units` slices (even sizes) shrunk twofold to uint8 levels: the mean of
    each 2 x 2 block.

    The same as :func:`halve_slices` of :func:`stack_windows` quantised to 0-255, except where
    a block's mean lies within 1/128 of a level from a rounding boundary (about 0.2 % of a CT
    slice's pixels then differ by one level). Integer sums are what make the slice cache's
    lookups fast (one 64-bit lookup per pixel gives every window's units); the whole-volume
    path uses this very function, so both give the same numbers.
    """
    height, width = units.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"halving needs even sizes, got {height} x {width}")
    units = np.asarray(units)
    if units.dtype != np.uint16:
        raise ValueError(f"halving takes window_units' uint16 units, got {units.dtype}")
    rows = np.add(units[..., 0::2, :], units[..., 1::2, :], order="C")  # at most 2 x 16320
    # Each two neighbouring columns read as one uint32: the sum of its halves is the pair's
    # sum in either byte order. Contiguous passes: twice as fast as four strided ones.
    pairs = rows.view(np.uint32)
    sums = pairs & np.uint32(0xFFFF)
    sums += pairs >> np.uint32(16)
    return block_sums_to_uint8(sums)


def resize_slices(images: np.ndarray, size: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize the last two axes to ``size``: bilinear for images, ``order=0`` for labels.

    Bilinear resizing samples pixel centres (``align_corners=False``), the grid of
    ``scipy.ndimage.zoom(..., grid_mode=True)``, through torch, which is an order of magnitude
    faster on CPU for stacks of slices; an exact twofold shrink is :func:`halve_slices`.
    Shrinking an axis more than twofold (512 -> 224) widens the filter to the scale factor
    (torch's ``antialias``): plain bilinear weights span two input pixels, so it would skip
    input pixels and a thin bleed could vanish from the slice.
    """
    images = np.asarray(images)
    height, width = images.shape[-2:]
    if (height, width) == tuple(size):
        return images.copy()
    if order == 0:
        from scipy.ndimage import zoom

        factors = (1.0,) * (images.ndim - 2) + (size[0] / height, size[1] / width)
        return zoom(images, factors, order=0, grid_mode=True, mode="nearest").astype(
            images.dtype, copy=False
        )
    if order != 1:
        raise ValueError(f"order must be 0 or 1, got {order}")
    if (height, width) == (2 * size[0], 2 * size[1]):
        return halve_slices(np.asarray(images, dtype=np.float32)).astype(images.dtype, copy=False)
    import torch
    import torch.nn.functional as F

    flat = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).reshape(
        -1, 1, height, width
    )
    shrink_past_two = height > 2 * size[0] or width > 2 * size[1]
    resized = F.interpolate(
        flat, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink_past_two
    )
    out = resized.reshape(*images.shape[:-2], *size).numpy()
    return out.astype(images.dtype, copy=False)

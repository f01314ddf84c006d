"""The one path from a CT volume (or a windowed picture) to classifier input.

A :class:`Preprocessor` is built once from a run's ``data`` and ``masking`` config. The slice
cache of training, ``evaluate``, ``predict`` and the MONAI bundle all call it, so the mask
policy (which segmenter, fill, dilation, crop), the windows, 2.5D context, resizing and the
slice filter are decided in exactly one place and a model is served with the input it was
trained on.

Per volume: the intracranial mask (when masking is on) is dilated in-plane by
``dilation_mm``; with ``background: air`` the HU outside it become air before windowing, with
``background: min`` the windowed channels outside it become 0; with ``crop`` every slice is cut
to one box around the dilated mask plus ``margin_mm`` (one box per volume, so the slices keep one
size and 2.5D neighbours stay aligned). Without a mask crop, ``data.head_crop`` cuts the slices
to one box around the head (the table and the air around it go) plus ``data.head_margin_mm``.
Then windows -> resize to ``image_size`` -> 2.5D neighbours -> uint8 (1/255 steps are 0.3 HU in
the brain window, far below CT noise).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ichseg.config import DataConfig, MaskingConfig, RunConfig
from ichseg.errors import ConfigError, InputError
from ichseg.preprocess.windowing import (
    BLOCK_SUM_SHIFT,
    block_sums_to_uint8,
    halve_units,
    in_range,
    neighbour_index,
    nonblank_slices,
    resize_slices,
    resolve_window,
    stack_windows,
    window_units,
)
from ichseg.volume import CTVolume

if TYPE_CHECKING:
    from ichseg.io.dicom_pixels import Rescale

Masker = Callable[[CTVolume], np.ndarray]


@dataclass
class PreparedVolume:
    """Classifier input of one volume.

    Attributes:
        base: uint8 ``(Z, W, S, S)``: the W windows of every slice (volume order), masked and
            resized. The slice cache stores these; 2.5D neighbours are gathered from them.
        keep: bool ``(Z,)``: slices that pass ``data.min_brain_fraction`` (all True when it is
            0). Training and evaluation use only these; ``predict`` scores only these.
        mask: the uint8 ``(z, y, x)`` intracranial mask used for the input, or None when
            masking is off.
        context: 2.5D neighbours on each side.
    """

    base: np.ndarray
    keep: np.ndarray
    mask: np.ndarray | None
    context: int = 0

    @property
    def images(self) -> np.ndarray:
        """uint8 ``(Z, C, S, S)`` model input, ``C = W * (2 * context + 1)``, slice-major."""
        return gather_context(self.base, neighbour_index(len(self.base), self.context))


def gather_context(base: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Stack each slice's neighbours' windows: ``(N, W, S, S)`` x ``(M, 2k+1)`` -> ``(M, C, S, S)``.

    The one 2.5D gather: :attr:`PreparedVolume.images` and the slice cache's dataset use it.
    """
    stacked = base[neighbours]  # (M, 2k+1, W, S, S)
    return stacked.reshape(len(neighbours), -1, *base.shape[-2:])


def crop_kind(data: DataConfig, masking: MaskingConfig) -> Literal["mask", "head"] | None:
    """Which box slices are cut to before resizing: the dilated intracranial mask's
    (``masking.crop``, the tighter one, wins), the head's (``data.head_crop``), or none."""
    if masking.enabled and masking.crop:
        return "mask"
    return "head" if data.head_crop else None


def file_digest(path: str | Path) -> str:
    """SHA-1 of a file's bytes (identifies a segmenter checkpoint whatever its path)."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Preprocessor:
    """Turns a :class:`CTVolume` (or a windowed PNG/JPG) into uint8 classifier input.

    Args:
        data: windows, context, image size, slice filter, source kind.
        masking: the mask policy.
        masker: the intracranial segmenter; required when masking is enabled.
        segmenter_digest: SHA-1 of the U-Net checkpoint behind ``masker`` (part of
            :meth:`describe`, so a cache built with another segmenter is never reused).
    """

    def __init__(
        self,
        data: DataConfig,
        masking: MaskingConfig,
        masker: Masker | None = None,
        segmenter_digest: str | None = None,
    ) -> None:
        if masking.enabled and masker is None:
            raise ConfigError("masking is enabled but no intracranial segmenter was given")
        self.data = data
        self.masking = masking
        self.masker = masker if masking.enabled else None
        self.segmenter_digest = segmenter_digest if masking.enabled else None

    @classmethod
    def from_config(cls, config: RunConfig, segmenter: str | Path | None = None) -> Preprocessor:
        """Decide the mask policy once for a run config.

        Args:
            config: the run config.
            segmenter: the U-Net checkpoint for ``masking.method: unet``; default
                ``masking.checkpoint``. Ignored for unmasked or classical-mask runs.

        Raises:
            ConfigError: a U-Net-masked config without a readable checkpoint.
        """
        return cls.from_parts(config.data, config.masking, segmenter, config.name)

    @classmethod
    def from_parts(
        cls,
        data: DataConfig,
        masking: MaskingConfig,
        segmenter: str | Path | None = None,
        name: str = "config",
    ) -> Preprocessor:
        """:meth:`from_config` from the two config sections (what cache workers receive)."""
        if not masking.enabled:
            return cls(data, masking)
        if masking.method == "classical":
            from ichseg.segmentation.masking import make_masker

            return cls(data, masking, make_masker(masking))
        checkpoint = segmenter or masking.checkpoint
        if checkpoint is None:
            raise ConfigError(
                f"{name}: masking.method 'unet' needs masking.checkpoint or --segmenter"
            )
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise ConfigError(f"{name}: segmenter checkpoint {checkpoint} not found")
        from ichseg.segmentation.unet import load_segmenter

        return cls(data, masking, load_segmenter(checkpoint), file_digest(checkpoint))

    @property
    def segmenter_path(self) -> Path | None:
        """The U-Net checkpoint behind the masker, when there is one."""
        return getattr(self.masker, "checkpoint_path", None)

    @property
    def source_kind(self) -> str:
        """``"images"`` for models trained on windowed pictures, else ``"hu"``."""
        return "images" if self.data.source == "images" else "hu"

    @property
    def channels(self) -> int:
        return self.data.in_channels

    def describe(self) -> dict[str, Any]:
        """Everything that changes the arrays, as plain data (cache key, run record)."""
        masking = self.masking.model_dump(mode="json") if self.masking.enabled else None
        if masking is not None:
            masking.pop("checkpoint", None)  # the digest identifies the weights, not the path
            masking["segmenter_sha1"] = self.segmenter_digest
        described = {
            "source_kind": self.source_kind,
            "windows": self.data.model_dump(mode="json")["windows"],
            "context": self.data.context,
            "image_size": self.data.image_size,
            "min_brain_fraction": self.data.min_brain_fraction,
            "masking": masking,
        }
        if self._crops_to_head:
            # Only when it applies: caches and backbone runs of uncropped input keep their keys.
            from ichseg.segmentation.masking import HEAD_OPENING_MM, HEAD_THRESHOLD_HU

            described["head_crop"] = {
                "margin_mm": self.data.head_margin_mm,
                "threshold_hu": HEAD_THRESHOLD_HU,
                "opening_mm": HEAD_OPENING_MM,
            }
        return described

    @property
    def _crops_to_head(self) -> bool:
        return crop_kind(self.data, self.masking) == "head"

    def __call__(self, volume: CTVolume, mask: np.ndarray | None = None) -> PreparedVolume:
        """Classifier input for every slice of ``volume``.

        Args:
            volume: the CT.
            mask: an intracranial mask already computed with this preprocessor's masker
                (saves a second segmentation when the caller also writes the mask out).
        """
        if self.source_kind != "hu":
            raise InputError(
                volume.source,
                "this model was trained on windowed PNG/JPG images; give it images of the "
                "same kind, not CT volumes",
            )
        hu = volume.hu
        keep = (
            nonblank_slices(hu, self.data.min_brain_fraction)
            if self.data.min_brain_fraction > 0
            else np.ones(volume.num_slices, dtype=bool)
        )
        grown = None
        if self.masking.enabled:
            if mask is None:
                mask = np.asarray(self.masker(volume), dtype=np.uint8)  # type: ignore[misc]
            from ichseg.segmentation.masking import apply_mask, dilate_mask

            grown = dilate_mask(mask, self.masking.dilation_mm, volume.spacing[1:])
            if self.masking.background == "air":
                hu = apply_mask(hu, grown, "air")
        box = self._crop_box(volume, grown)
        if box is not None:
            hu = hu[:, box[0] : box[1], box[2] : box[3]]
            if grown is not None:
                grown = grown[:, box[0] : box[1], box[2] : box[3]]
        size = (self.data.image_size, self.data.image_size)
        inside = grown if grown is not None and self.masking.background == "min" else None
        windows = len(self.data.windows)
        images = np.empty((hu.shape[0], windows, *size), dtype=np.uint8)
        # A few slices at a time: the windows of a whole 512 px volume (100 MB as float32)
        # leave the CPU's caches between passes; slice by slice they stay in them (2.5x
        # faster).
        step = max(1, _CHUNK_BYTES // max(1, 4 * windows * hu.shape[-2] * hu.shape[-1]))
        for start in range(0, hu.shape[0], step):
            part = slice(start, start + step)
            chunk_inside = None if inside is None else inside[part]
            images[part] = self._windowed(hu[part], chunk_inside, size)
        return PreparedVolume(
            images,
            keep,
            mask if self.masking.enabled else None,
            self.data.context,
        )

    def _windowed(
        self, hu: np.ndarray, inside: np.ndarray | None, size: tuple[int, int]
    ) -> np.ndarray:
        """uint8 ``(Z, W, S, S)``: the windows of HU slices, zero outside ``inside`` when
        given, resized to ``size``. Every step works on each slice alone."""
        if hu.shape[-2:] == (2 * size[0], 2 * size[1]):
            # 512 -> 256: in the slice cache's integer arithmetic (the same numbers).
            units = window_units(hu, self.data.windows)  # (Z, windows, H, W)
            if inside is not None:
                units = np.where(inside[:, None], units, np.uint16(0))
            return halve_units(units)
        channels = stack_windows(hu, self.data.windows)  # (Z, windows, H, W)
        if inside is not None:
            channels = np.where(inside[:, None], channels, np.float32(0.0))
        if channels.shape[-2:] != size:
            channels = resize_slices(channels, size)
        return _quantise(channels)

    @property
    def whole_volume(self) -> bool:
        """True when a step needs the whole series (the segmenter, a crop box shared by the
        slices), so slices cannot be prepared one by one."""
        return self.masking.enabled or self.data.head_crop

    def crop_box(
        self, volume: CTVolume, mask: np.ndarray | None = None
    ) -> tuple[int, int, int, int] | None:
        """The box ``(y0, y1, x0, x1)`` every slice of ``volume`` is cut to before resizing, or
        None when this preprocessor does not crop: where the input's pixels lie on the native
        slice (Grad-CAM maps go back through it).

        Args:
            volume: the CT.
            mask: the intracranial mask the input is prepared with (computed when masking
                crops and it is not given).
        """
        grown = None
        if crop_kind(self.data, self.masking) == "mask":
            from ichseg.segmentation.masking import dilate_mask

            if mask is None:
                mask = np.asarray(self.masker(volume), dtype=np.uint8)  # type: ignore[misc]
            grown = dilate_mask(mask, self.masking.dilation_mm, volume.spacing[1:])
        return self._crop_box(volume, grown)

    def _crop_box(
        self, volume: CTVolume, grown: np.ndarray | None
    ) -> tuple[int, int, int, int] | None:
        from ichseg.segmentation.masking import head_bbox, mask_bbox

        spacing = volume.spacing[1:]
        kind = crop_kind(self.data, self.masking)
        if kind == "mask":
            return mask_bbox(grown, self.masking.margin_mm, spacing)
        if kind == "head":
            return head_bbox(volume.hu, self.data.head_margin_mm, spacing)
        return None

    def stored_slice(self, stored: np.ndarray, rescale: Rescale) -> tuple[np.ndarray, bool] | None:
        """One slice given as stored DICOM values: its uint8 ``(W, S, S)`` windows and its
        slice-filter flag, the same arrays as :meth:`__call__` on its HU.

        Every unmasked step up to the resize works on each pixel alone, so they are looked up
        in tables of every stored value instead of computed (the resize, when the slice is not
        ``image_size`` already, and the quantisation follow as in :meth:`__call__`): several
        times faster for the slice cache's file-by-file build.

        None where tables do not apply: masking (a whole-series step) or stored values other
        than native 8- or 16-bit integers.
        """
        if (
            self.whole_volume
            or self.source_kind != "hu"
            or stored.ndim != 2
            or stored.dtype.kind not in "iu"
            or stored.dtype.itemsize > 2
            or not stored.dtype.isnative
        ):
            return None
        tables = _stored_value_tables(rescale, stored.dtype.str, self._window_key)
        index = stored.view(f"u{stored.dtype.itemsize}")
        size = (self.data.image_size, self.data.image_size)
        if stored.shape == size:
            images = np.take(tables.quantised, index, axis=1)
        elif stored.shape == (2 * size[0], 2 * size[1]):
            images = _halve_looked_up(tables, index)
        else:
            windowed = np.take(tables.windowed, index, axis=1)
            images = _quantise(resize_slices(windowed, size))
        fraction = self.data.min_brain_fraction
        keep = fraction <= 0 or bool(np.take(tables.in_brain_range, index).mean() >= fraction)
        return images, keep

    @cached_property
    def _window_key(self) -> tuple[tuple[float, float], ...]:
        """The windows as ``(center, width)`` pairs, resolved once (looked up per slice)."""
        return tuple((w.center, w.width) for w in map(resolve_window, self.data.windows))

    def image(self, path: str | Path) -> np.ndarray:
        """uint8 ``(C, S, S)`` classifier input of one windowed PNG/JPG."""
        if self.source_kind != "images":
            raise InputError(
                path,
                "this model was trained on CT in Hounsfield units; a windowed picture has lost "
                "the HU it needs (give it DICOM or NIfTI)",
            )
        from ichseg.io.images import load_image

        size = (self.data.image_size, self.data.image_size)
        pixels = load_image(path, channels=1 if self.channels == 1 else 3, size=size)
        return _quantise(pixels)


_BLOCK = ((0, 0), (0, 1), (1, 0), (1, 1))
"""The offsets of a 2 x 2 block's four pixels."""

_LANE_BITS = 16
_LANES = 64 // _LANE_BITS
"""Windows packed into one uint64 per stored value for the 512 -> 256 lookups."""


def _halve_looked_up(tables: _StoredValueTables, index: np.ndarray) -> np.ndarray:
    """uint8 ``(W, S/2, S/2)``: :func:`~ichseg.preprocess.windowing.halve_units` of the
    windows of stored values ``index`` (unsigned view), from the tables.

    Up to four windows are looked up together, each a 16-bit lane of one uint64, and the
    four pixels of each block are summed in the lanes: one lookup and one add per pixel
    for all windows, where float lookups per window cost four times as much.
    """
    first, *others = (index[i::2, j::2] for i, j in _BLOCK)
    if tables.packed_units is None:
        sums = np.take(tables.halving_units, first, axis=1)
        for quarter in others:
            sums += np.take(tables.halving_units, quarter, axis=1)
        return block_sums_to_uint8(sums)
    sums = np.take(tables.packed_units, first)
    for quarter in others:
        sums += np.take(tables.packed_units, quarter)
    windows = tables.halving_units.shape[0]
    half = 1 << (BLOCK_SUM_SHIFT - 1)
    sums += np.uint64(sum(half << (_LANE_BITS * lane) for lane in range(windows)))
    # With a shift of 8, the high byte of each lane is (lane sum + 128) >> 8, the rounded block
    # mean (no lane can carry into the next: 4 x 16320 + 128 < 2 ** 16).
    high_bytes = sums.view(np.uint8).reshape(*sums.shape, _LANES * 2)[..., 1 : 2 * windows : 2]
    return np.ascontiguousarray(np.moveaxis(high_bytes, -1, 0))


@dataclass(frozen=True)
class _StoredValueTables:
    """Per stored value (indexed by its bit pattern read as unsigned): float32 ``(W, N)``
    windows, their uint8 ``(W, N)`` quantisation, their uint16 ``(W, N)`` halving units
    (packed into one uint64 ``(N,)`` for up to four windows on little-endian machines, else
    None) and the bool ``(N,)`` brain-range flag."""

    windowed: np.ndarray
    quantised: np.ndarray
    halving_units: np.ndarray
    packed_units: np.ndarray | None
    in_brain_range: np.ndarray


@lru_cache(maxsize=16)
def _stored_value_tables(
    rescale: Rescale, dtype: str, windows: tuple[tuple[float, float], ...]
) -> _StoredValueTables:
    """The tables of one rescale and stored type (~2 MB for 16-bit values).

    Computed with the very functions :meth:`Preprocessor.__call__` applies to a slice (HU
    conversion, windows, quantisation, the brain-range test), each of them per pixel, so a
    lookup gives exactly their result.
    """
    stored_type = np.dtype(dtype)
    every = np.arange(2 ** (8 * stored_type.itemsize), dtype=f"u{stored_type.itemsize}")
    hu = rescale.hu(every.view(stored_type))[None]  # one (1, N) slice
    windowed = stack_windows(hu, windows)[:, 0]
    units = window_units(hu, windows)[:, 0]
    packed = None
    if len(units) <= _LANES and sys.byteorder == "little":
        packed = np.zeros(units.shape[1], dtype=np.uint64)
        for lane, lane_units in enumerate(units):
            packed |= lane_units.astype(np.uint64) << np.uint64(_LANE_BITS * lane)
    return _StoredValueTables(windowed, _quantise(windowed), units, packed, in_range(hu)[0])


_CHUNK_BYTES = 4 * 1024**2
"""Float32 windows prepared at once by :meth:`Preprocessor.__call__` (one 512 px slice with
three windows, five of 256 px)."""


def _quantise(channels: np.ndarray) -> np.ndarray:
    channels = np.asarray(channels, dtype=np.float32) * np.float32(255.0)
    np.rint(channels, out=channels)
    np.clip(channels, 0, 255, out=channels)
    return channels.astype(np.uint8)

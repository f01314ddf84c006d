"""Hemorrhage label maps for the commands: the segmenter and the volume columns of a series.

``predict`` and ``segment`` share these, so a series gets the same label map and the same
numbers from either command when both bound the blood with the same intracranial mask
(``segment``: its ``--method``; ``predict``: the model's output mask).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ichseg.errors import InputError
from ichseg.volume import HEMORRHAGE_CODES, CTVolume

VOLUME_DECIMALS = 3
"""Volumes are reported to 0.001 ml, the precision the Structured Report stores."""
VOLUME_COLUMNS: tuple[str, ...] = (
    *(f"volume_ml_{name}" for name in HEMORRHAGE_CODES.values()),
    "volume_ml_total",
    "abc2_ml_intraparenchymal",
)


def load_hemorrhage_segmenter(path: str | Path | None, device: str = "cpu"):
    """The hemorrhage U-Net of a checkpoint (None gives None).

    Raises:
        InputError: a missing or damaged checkpoint, or a U-Net of the intracranial target.
    """
    if path is None:
        return None
    from ichseg.segmentation.unet import load_segmenter

    segmenter = load_segmenter(path, device=device)
    if segmenter.config.target != "hemorrhage":
        raise InputError(
            path,
            f"is a U-Net of the {segmenter.config.target} target, not a hemorrhage segmenter "
            "(train one with: ichseg train-segmenter OUT --target hemorrhage)",
        )
    return segmenter


def hemorrhage_volumes(labels: np.ndarray, volume: CTVolume) -> dict[str, float]:
    """The ``VOLUME_COLUMNS`` of one label map in ml, rounded to 0.001 ml.

    Volumes integrate the label map over the volume's true geometry (gantry tilt and missing
    slices included, see :mod:`ichseg.volumetry`); ``abc2_ml_intraparenchymal`` is ABC/2 of
    the largest intraparenchymal bleed (0 without one).

    Args:
        labels: uint8 ``(z, y, x)`` label map with the codes of ``HEMORRHAGE_CODES``.
        volume: the CT it was drawn on.
    """
    from ichseg.volumetry import largest_component_abc2, volumes_by_label

    volumes = volumes_by_label(labels, volume)
    row = {
        f"volume_ml_{name}": round(volumes[name], VOLUME_DECIMALS)
        for name in HEMORRHAGE_CODES.values()
    }
    row["volume_ml_total"] = round(volumes["total"], VOLUME_DECIMALS)
    row["abc2_ml_intraparenchymal"] = round(largest_component_abc2(labels, volume), VOLUME_DECIMALS)
    return row


def write_series_seg(
    volume: CTVolume, mask: np.ndarray, labels: np.ndarray | None, path: str | Path
) -> Path:
    """The intracranial mask and the hemorrhage subtypes present as one DICOM SEG.

    Args:
        volume: a CT read from DICOM (``slice_paths`` filled).
        mask: its intracranial mask.
        labels: its hemorrhage label map, or None for the intracranial segment alone.
        path: the ``.dcm`` file to write (atomically).

    Raises:
        InputError: a volume without source files, or source files that changed since.
    """
    from ichseg.io.dicom_seg import segments_from_label_map, write_dicom_seg

    if not volume.slice_paths:
        raise InputError(volume.source, "a DICOM SEG needs DICOM sources")
    segments = segments_from_label_map(
        np.zeros(volume.shape, np.uint8) if labels is None else labels, mask
    )
    return write_dicom_seg(volume, segments, volume.slice_paths, path)

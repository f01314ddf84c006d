"""Overlap and surface distance between masks: Dice and the 95th-percentile Hausdorff distance."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient of two masks (non-zero = inside); two empty masks agree (1.0)."""
    pred, ref = np.asarray(pred) > 0, np.asarray(ref) > 0
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total


def mask_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float | None]:
    """Dice and 95th-percentile Hausdorff distance (mm) between two masks.

    The distance uses MONAI's ``compute_hausdorff_distance(percentile=95, spacing=...)``. Two
    empty masks agree perfectly (dice 1, hd95 0); when only one is empty dice is 0 and the
    distance is undefined (None).

    Args:
        pred: predicted mask, non-zero inside.
        ref: reference mask of the same shape.
        spacing: voxel size per axis in mm, in the arrays' axis order.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    pred = np.asarray(pred) > 0
    ref = np.asarray(ref) > 0
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs one entry per axis of {pred.shape}")
    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not pred_any and not ref_any:
        return {"dice": 1.0, "hd95_mm": 0.0}
    if not pred_any or not ref_any:
        return {"dice": 0.0, "hd95_mm": None}
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own internal use of a deprecated argument.
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None].float(),
            torch.from_numpy(ref)[None, None].float(),
            include_background=True,
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return {"dice": dice(pred, ref), "hd95_mm": float(hd95.item())}

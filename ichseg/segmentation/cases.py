"""A segmenter training case: one volume in HU, its target on the same grid, its patient.

Its own module so that the recipes (which build cases from a config) and the trainer (which
consumes them) both depend on it and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class SegmentationCase:
    """One training volume: HU ``(z, y, x)``, its target on the same grid, its patient."""

    hu: np.ndarray
    target: np.ndarray
    group: str


def as_case(item: Any, index: int, target: str = "intracranial") -> SegmentationCase:
    """A :class:`SegmentationCase` from a case, a ``(hu, target)`` pair, or a phantom study."""
    if isinstance(item, SegmentationCase):
        return item
    if isinstance(item, tuple | list) and len(item) == 2:
        hu, labels, group = item[0], item[1], f"case{index}"
    elif hasattr(item, "hu") and hasattr(item, "intracranial_mask"):
        labels = item.intracranial_mask if target == "intracranial" else item.hemorrhage
        hu, group = item.hu, str(getattr(item, "patient_id", f"case{index}"))
    else:
        raise TypeError("training items must be cases, (hu, target) pairs or phantom studies")
    hu = np.asarray(hu, dtype=np.float32)
    labels = np.asarray(labels)
    if hu.ndim != 3 or hu.shape != labels.shape:
        raise ValueError(f"hu {hu.shape} and target {labels.shape} must be equal 3D shapes")
    if target == "intracranial":
        labels = labels > 0
    return SegmentationCase(hu, labels.astype(np.uint8), group)

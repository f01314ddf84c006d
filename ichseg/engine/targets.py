"""Training targets from six-label rows: multilabel as is, multiclass by explicit rules."""

from __future__ import annotations

import numpy as np

from ichseg.errors import InputError
from ichseg.volume import SUBTYPES

OTHER_HEMORRHAGE = "other_hemorrhage"
"""Multiclass class for a bleed whose subtype is not among the listed classes (or unknown)."""
MULTIPLE = "multiple"
"""Multiclass class for a slice holding more than one of the listed subtypes."""


def multiclass_targets(labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Exclusive class indices from ``(N, 6)`` six-label rows (NaN = unknown).

    ``["normal", "hemorrhage"]`` maps ``any``. Otherwise the classes are ``normal`` followed
    by subtype names and optionally :data:`OTHER_HEMORRHAGE` and :data:`MULTIPLE`. A bleed
    is never made normal: a row with ``any`` = 1 and none of the listed subtypes (or unknown
    subtypes) goes to ``other_hemorrhage``, and a row with several listed subtypes to
    ``multiple``; when the needed class is not listed, the data cannot be mapped and an
    InputError says how many rows and which class to add.

    Raises:
        InputError: bad class list, unlabelled rows, or rows no listed class can hold.
    """
    labels = np.asarray(labels, dtype=np.float32)
    if np.isnan(labels[:, 0]).any():
        raise InputError(None, "multiclass targets need a known 'any' label on every row")
    positive = labels[:, 0] > 0.5
    if class_names == ["normal", "hemorrhage"]:
        return positive.astype(np.int64)
    allowed = set(SUBTYPES[1:]) | {OTHER_HEMORRHAGE, MULTIPLE}
    if class_names[0] != "normal" or not set(class_names[1:]) <= allowed:
        raise InputError(
            None,
            "multiclass classes must be ['normal', 'hemorrhage'] or 'normal' followed by "
            f"names from {', '.join(SUBTYPES[1:])}, {OTHER_HEMORRHAGE}, {MULTIPLE}",
        )
    listed = [name for name in class_names[1:] if name in SUBTYPES]
    columns = [SUBTYPES.index(name) for name in listed]
    present = np.nan_to_num(labels[:, columns], nan=0.0) > 0.5
    count = present.sum(axis=1)
    target = np.zeros(len(labels), dtype=np.int64)
    single = positive & (count == 1)
    target[single] = np.array([class_names.index(listed[i]) for i in present[single].argmax(1)])
    for rows, name, why in (
        (positive & (count > 1), MULTIPLE, "hold more than one listed subtype"),
        (positive & (count == 0), OTHER_HEMORRHAGE, "are bleeds of no listed or known subtype"),
    ):
        if rows.any():
            if name not in class_names:
                raise InputError(
                    None,
                    f"{int(rows.sum())} positive slice(s) {why}; add '{name}' to task.classes "
                    "or use task.mode multilabel",
                )
            target[rows] = class_names.index(name)
    return target

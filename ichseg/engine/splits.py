"""Patient-level splits: every patient (or study) in exactly one of train, val and test.

A run writes its split as ``splits.json`` (the patient ids of each split) and everything after
training (``evaluate``, the ablation, calibration) reads that file rather than recomputing the
split, so a changed cache, a new seed or a code change can never move a patient between splits
unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ichseg.errors import InputError
from ichseg.fileio import write_json

SPLITS = ("train", "val", "test")


def split_by_group(
    groups: np.ndarray,
    positive: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, np.ndarray]:
    """Row indices for train/val/test with every group (patient) in exactly one split.

    Groups are stratified by whether they hold any positive row, so small datasets still get
    positives in every split. With ``folds``, the test split is fold ``fold`` of a k-fold
    partition and validation is taken from the rest by ``val_fraction``.

    Args:
        groups: ``(N,)`` patient/study id per row.
        positive: ``(N,)`` bool, whether a row is positive (for stratification).
        val_fraction: share of groups (per stratum) for validation.
        test_fraction: share of groups (per stratum) for testing (ignored with ``folds``).
        seed: split seed.
        folds: number of folds, or None.
        fold: which fold is the test split.
    """
    unique = np.unique(groups)
    group_positive = {g: False for g in unique}
    for g, p in zip(groups, positive, strict=True):
        if p:
            group_positive[g] = True
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for stratum in (True, False):
        members = np.array(sorted(g for g in unique if group_positive[g] == stratum))
        rng.shuffle(members)
        n = len(members)
        if folds:
            test_members = set(members[np.arange(n) % folds == fold % folds])
            rest = [g for g in members if g not in test_members]
            n_val = int(round(val_fraction * len(rest)))
            for g in test_members:
                assignment[g] = "test"
            for i, g in enumerate(rest):
                assignment[g] = "val" if i < n_val else "train"
        else:
            n_test = int(round(test_fraction * n))
            n_val = int(round(val_fraction * n))
            for i, g in enumerate(members):
                assignment[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    labels = np.array([assignment[g] for g in groups])
    return {name: np.flatnonzero(labels == name) for name in SPLITS}


def save_splits(splits: dict[str, np.ndarray], groups: np.ndarray, path: str | Path) -> Path:
    """Write the patient ids of each split (JSON) so a run can be audited and repeated."""
    return write_json(
        path, {name: sorted(set(groups[idx].tolist())) for name, idx in splits.items()}
    )


def load_splits(path: str | Path, groups: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices of each split from a saved ``splits.json``, for rows with ``groups``.

    Raises:
        InputError: missing or malformed file, a patient listed in two splits, or rows whose
            patient the file does not list (the data changed since the run was trained).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "splits file not found")
    try:
        data = json.loads(path.read_text())
        members = {name: set(map(str, data[name])) for name in SPLITS}
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(path, "not a valid splits file (train/val/test lists)") from None
    owner: dict[str, str] = {}
    for name, ids in members.items():
        for g in ids:
            if g in owner:
                raise InputError(path, f"patient {g!r} is in both {owner[g]} and {name}")
            owner[g] = name
    labels = np.array([owner.get(str(g), "") for g in groups])
    unknown = sorted({str(g) for g, lab in zip(groups, labels, strict=True) if not lab})
    if unknown:
        raise InputError(
            path,
            f"{len(unknown)} patient(s) of the data are in no split (e.g. {unknown[0]!r}): "
            "the data differ from those the run was trained on",
        )
    return {name: np.flatnonzero(labels == name) for name in SPLITS}

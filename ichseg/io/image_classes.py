"""Class names of 2D image datasets: what a label or class folder means, and six-label targets.

Names are read case-insensitively (:func:`canonical_class`): negative names (``normal``,
``negative``, ``no_hemorrhage``, ``0``, ...) become class 0 ``"normal"``; ``hemorrhage``,
``any``, ``ich`` and ``1`` an unspecified bleed ``"hemorrhage"``; subtype names and their
abbreviations (``EDH``, ``IPH``, ``IVH``, ``SAH``, ``SDH``) the SUBTYPES name.
:func:`multilabel_from_classes` turns one class per image into ``(N, 6)`` targets.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ichseg.errors import InputError
from ichseg.volume import SUBTYPES

NORMAL = "normal"
"""Name of the negative class, always class 0."""

HEMORRHAGE = "hemorrhage"
"""Name of the class of images with a bleed of unspecified subtype."""

NEGATIVE_NAMES: frozenset[str] = frozenset(
    {"normal", "negative", "none", "no_hemorrhage", "no_haemorrhage", "no_ich", "0"}
)
"""Class names (normalised by :func:`canonical_class`) that mean "no hemorrhage"."""

HEMORRHAGE_NAMES: frozenset[str] = frozenset(
    {"hemorrhage", "haemorrhage", "any", "ich", "bleed", "positive", "1"}
)
"""Class names that mean "hemorrhage of unspecified subtype"."""

SUBTYPE_NAMES: dict[str, str] = {
    "epidural": "epidural",
    "extradural": "epidural",
    "edh": "epidural",
    "intraparenchymal": "intraparenchymal",
    "iph": "intraparenchymal",
    "intraventricular": "intraventricular",
    "ivh": "intraventricular",
    "subarachnoid": "subarachnoid",
    "sah": "subarachnoid",
    "subdural": "subdural",
    "sdh": "subdural",
}
"""Class names (and abbreviations) of the five specific subtypes -> their SUBTYPES name."""
_INT = re.compile(r"[+-]?\d+", re.ASCII)
SPECIFIC_SUBTYPES = SUBTYPES[1:]
"""The five specific subtypes (SUBTYPES without ``any``)."""


def normalise_name(name: str) -> str:
    """A name lower-cased and stripped, with runs of spaces and hyphens read as ``_``."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def canonical_class(label: str) -> str | None:
    """The class a label names: ``"normal"``, ``"hemorrhage"``, a specific subtype, or None.

    Case, surrounding spaces and the spelling of separators are ignored (``No Hemorrhage``,
    ``no-hemorrhage`` and ``NO_HEMORRHAGE`` are the same name).

    Args:
        label: a class name as written in a label column or a class folder name.
    """
    key = normalise_name(label)
    if key in NEGATIVE_NAMES:
        return NORMAL
    if key in HEMORRHAGE_NAMES:
        return HEMORRHAGE
    return SUBTYPE_NAMES.get(key)


def resolve_classes(labels: list[str], where: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Class names, int64 target per label, and warnings, by the rules of the module docstring.

    Labels that are all integers are class indices (0 is ``"normal"``); otherwise names are
    read with :func:`canonical_class`, class 0 is ``"normal"`` and unrecognised names follow.

    Args:
        labels: one label per image, as written.
        where: file or folder named in errors.

    Raises:
        InputError: a negative class index.
    """
    warnings: list[str] = []
    if all(_INT.fullmatch(label) for label in labels):
        numbers = [int(label) for label in labels]
        if min(numbers) < 0:
            raise InputError(where, f"negative class index {min(numbers)} in the labels")
        if max(numbers) > 1:
            # Integers beyond 0/1 are class indices already; keep them, so that a gap (no class
            # 1 in this subset) does not renumber the classes relative to other subsets.
            top = max(numbers)
            warnings.append(
                f"integer labels 0-{top}: class 0 is 'normal', classes 1-{top} have no names; "
                "multilabel targets count them as hemorrhage (any=1) with unknown subtypes"
            )
            classes = [NORMAL] + [str(i) for i in range(1, top + 1)]
            return classes, np.asarray(numbers, dtype=np.int64), warnings
    names = [canonical_class(label) or label.strip().lower() for label in labels]
    present = set(names)
    known = (NORMAL, HEMORRHAGE, *SPECIFIC_SUBTYPES)
    unknown = sorted(present.difference(known))
    if len(unknown) == len(present):
        warnings.append(
            f"no class ({', '.join(unknown)}) is a normal, hemorrhage or subtype name; "
            "multiclass training works, six-label (multilabel) targets are unavailable"
        )
        classes = unknown
    else:
        classes = [NORMAL]
        if present <= {NORMAL, HEMORRHAGE}:
            classes.append(HEMORRHAGE)
        else:
            classes += [name for name in known[1:] if name in present]
        classes += unknown
        if unknown:
            warnings.append(
                f"class(es) {', '.join(unknown)} are not hemorrhage or subtype names; "
                "multilabel targets count them as hemorrhage (any=1) with unknown subtypes"
            )
    position = {name: i for i, name in enumerate(classes)}
    return classes, np.asarray([position[n] for n in names], dtype=np.int64), warnings


def multilabel_from_classes(
    targets: np.ndarray,
    classes: list[str],
    exclusive_subtypes: bool = True,
    where: str | Path | None = None,
) -> np.ndarray:
    """Six-label targets ``(N, 6)`` float32 in SUBTYPES order from one class per image.

    ``any`` is 0 for the normal class and 1 for every other class. A subtype column is 1 when
    the class names that subtype; 0 for normal images; 0 for images of another subtype when
    ``exclusive_subtypes`` (one class per image means one subtype), NaN otherwise; and NaN for
    a bleed of unspecified subtype or an unrecognised class, so that a loss can skip it.

    Args:
        targets: int class index per image.
        classes: class names, read with :func:`canonical_class`.
        exclusive_subtypes: whether an image of one subtype has none of the others.
        where: file or folder named in the error.

    Raises:
        InputError: no class is a normal, hemorrhage or subtype name (nothing to map).
    """
    kinds = [canonical_class(name) for name in classes]
    if all(kind is None for kind in kinds):
        raise InputError(
            where,
            f"no class ({', '.join(classes)}) is a normal, hemorrhage or subtype name; "
            "six-label targets need class names such as normal, hemorrhage, epidural or SDH",
        )
    table = np.full((len(classes), len(SUBTYPES)), np.nan, dtype=np.float32)
    for row, kind in zip(table, kinds, strict=True):
        if kind == NORMAL:
            row[:] = 0.0
        elif kind in SPECIFIC_SUBTYPES:
            row[0] = 1.0
            if exclusive_subtypes:
                row[1:] = 0.0
            row[SUBTYPES.index(kind)] = 1.0
        else:
            row[0] = 1.0
    return table[np.asarray(targets, dtype=np.int64)]

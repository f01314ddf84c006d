"""Atomic output: every file ichseg writes appears complete or not at all.

Each writer writes to a hidden temporary file in the destination folder and renames it over
the destination (``os.replace`` is atomic within one file system); on any error the temporary
file is removed and an existing destination is left untouched.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    Args:
        path: the final file.
        suffix: extension the temporary name must end with, for writers that infer the
            format from it (``.png``, ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, payload: Any, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(payload, indent=indent))


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: list[str]) -> Path:
    """Rows as CSV with a header; keys not in ``columns`` are an error."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def save_figure(figure: Any, path: str | Path, dpi: int = 110, **kwargs: Any) -> Path:
    """Save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=dpi, **kwargs)
    plt.close(figure)
    return Path(path)


def torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)

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


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` drawn by the Agg canvas.

    The object API keeps pyplot's global state (backend, open-figure list) out of the library,
    so figures work headless and in threads, and nothing has to be closed.

    Args:
        kwargs: passed to ``matplotlib.figure.Figure`` (``figsize``, ``layout``, ...).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: str | Path, dpi: int = 110, **kwargs: Any) -> Path:
    """Save a figure made by :func:`new_figure` as PNG, atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=dpi, format="png", **kwargs)
    return Path(path)


def check_output_folder(out_dir: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an output folder that is an existing file or lies inside an input folder.

    Called before any slow work (model loading, decoding), so a wrong path fails at once.

    Args:
        out_dir: the folder a command will write to.
        inputs: input files or folders that must never receive output.

    Raises:
        InputError: naming the output path and the reason.
    """
    from ichseg.errors import InputError

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    target = out.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if source.is_dir() and (target == source or source in target.parents):
            raise InputError(out, f"output folder must not be inside the input {item}")
    return out


def torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)

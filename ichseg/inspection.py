"""``ichseg inspect``: a summary of every series/volume under an input path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ichseg.errors import InputError
from ichseg.io.loader import index_input


def inspect_input(path: str | Path) -> dict[str, Any]:
    """Summaries of every volume under ``path`` plus the files that were skipped and why."""
    index = index_input(path)
    volumes: list[dict[str, Any]] = []
    skipped = [{"path": p, "reason": r} for p, r in index.skipped]
    for item in index.iter_volumes():
        if isinstance(item, InputError):
            skipped.append({"path": item.path or str(index.root), "reason": item.reason})
        else:
            volumes.append(item.summary())
    return {"input": str(path), "volumes": volumes, "skipped": skipped}


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines for :func:`inspect_input`'s result."""
    lines = []
    for volume in report["volumes"]:
        z, y, x = volume["shape"]
        sz, sy, sx = volume["spacing_mm"]
        lines.append(f"{volume['source']}")
        lines.append(f"  series {volume['series_uid']}  patient {volume['patient_id']}")
        lines.append(
            f"  {volume['num_slices']} slices, {z}x{y}x{x} (z,y,x), spacing "
            f"{sz:.3g}x{sy:.3g}x{sx:.3g} mm, HU min/median/max "
            f"{volume['hu_min']:.0f}/{volume['hu_median']:.0f}/{volume['hu_max']:.0f}"
        )
        for warning in volume["warnings"]:
            lines.append(f"  warning: {warning}")
    for item in report["skipped"]:
        lines.append(f"skipped {item['path']}: {item['reason']}")
    lines.append(f"{len(report['volumes'])} volume(s), {len(report['skipped'])} skipped")
    return "\n".join(lines)

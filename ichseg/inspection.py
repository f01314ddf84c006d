"""``ichseg inspect``: a summary of every series/volume under an input path.

Each file and each series is judged on its own: whatever can be read is reported, and every
file left out is listed with its reason (``skipped``: files that are not usable CT, and series
that could not be read; ``dropped`` under a volume: slices left out of that series).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ichseg.errors import InputError
from ichseg.io.loader import index_input

# Dropped slices listed per volume in the text report; the JSON report lists them all.
_DROPPED_SHOWN = 10


def inspect_input(path: str | Path) -> dict[str, Any]:
    """Summaries of every volume under ``path`` plus the files that were skipped and why.

    Returns:
        ``input``; ``volumes`` (``CTVolume.summary()`` each, with ``quality_flags`` and
        ``dropped``); ``skipped`` (``path``, ``reason``, and for a series none of whose slices
        could be used, ``dropped``); ``ignored`` (DICOM objects without an image, e.g.
        DICOMDIR); ``partial`` (True when anything was skipped or dropped).

    Raises:
        InputError: the path does not exist or holds no DICOM/NIfTI at all.
    """
    index = index_input(path)
    volumes: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = [{"path": p, "reason": r} for p, r in index.skipped]
    for item in index.iter_volumes():
        if isinstance(item, InputError):
            entry: dict[str, Any] = {"path": item.path or str(index.root), "reason": item.reason}
            dropped = getattr(item, "dropped", None)
            if dropped:
                entry["dropped"] = [{"path": p, "reason": r} for p, r in dropped]
            skipped.append(entry)
        else:
            volumes.append(item.summary())
    partial = bool(skipped) or any(v["dropped"] for v in volumes)
    return {
        "input": str(path),
        "volumes": volumes,
        "skipped": skipped,
        "ignored": [{"path": p, "what": w} for p, w in index.ignored],
        "partial": partial,
    }


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines for :func:`inspect_input`'s result."""
    lines = []
    dropped_total = 0
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
        if volume["quality_flags"]:
            lines.append(f"  quality flags: {', '.join(volume['quality_flags'])}")
        for warning in volume["warnings"]:
            lines.append(f"  warning: {warning}")
        lines.extend(_dropped_lines(volume["dropped"], "  "))
        dropped_total += len(volume["dropped"])
    for item in report["skipped"]:
        lines.append(f"skipped {item['path']}: {item['reason']}")
        lines.extend(_dropped_lines(item.get("dropped", []), "  "))
    summary = f"{len(report['volumes'])} volume(s), {len(report['skipped'])} skipped"
    if dropped_total:
        summary += f", {dropped_total} slice(s) dropped"
    if report.get("ignored"):
        summary += f", {len(report['ignored'])} non-image DICOM object(s) left out"
    lines.append(summary)
    return "\n".join(lines)


def _dropped_lines(dropped: list[dict[str, str]], indent: str) -> list[str]:
    lines = [f"{indent}dropped {d['path']}: {d['reason']}" for d in dropped[:_DROPPED_SHOWN]]
    if len(dropped) > _DROPPED_SHOWN:
        lines.append(f"{indent}... and {len(dropped) - _DROPPED_SHOWN} more (see --json)")
    return lines

"""``ichseg segment``: intracranial masks for every series or volume under an input path.

For each volume the output folder receives, under a safe unique ``<name>``:

* ``<name>_image.nii.gz``: the HU volume as read (DICOM slices in sorted series order);
* ``<name>_mask.nii.gz``: the uint8 mask on exactly the same grid (shape and affine);
* ``<name>_preview.png``: a grid of slices in the brain window with the mask contour;

then ``summary.csv`` and ``summary.json`` with one row per volume (``status`` ``ok`` or
``error``), and one row with ``status`` ``skipped`` and the reason in ``error`` per file that was
skipped or slice that was dropped from its series; ``quality_flags`` lists the volume's reading
assumptions (``ichseg.volume.QUALITY_FLAGS``). ``<name>`` is the NIfTI file
stem, or ``<PatientID>_<8 hex of sha1(SeriesInstanceUID)>`` for DICOM; a repeated name gets
``_2``, ``_3``, ... in input order.

With a hemorrhage U-Net (``hemorrhage_checkpoint``) each volume also gets
``<name>_hemorrhage.nii.gz`` (the label map, codes of ``ichseg.volume.HEMORRHAGE_CODES``, on the
same grid) and the summary gains ``hemorrhage`` and the volume columns ``volume_ml_<subtype>``,
``volume_ml_total`` and ``abc2_ml_intraparenchymal`` (see
:func:`ichseg.segmentation.hemorrhage.hemorrhage_volumes`). Bleeds are kept inside the
intracranial mask of the chosen method when the segmenter's config asks for it.

``output_format``: ``"nifti"`` (the files above), ``"dicom-seg"`` (instead of the NIfTI image and
masks, ``<name>_seg.dcm``: a DICOM Segmentation of the intracranial mask and the hemorrhage
subtypes that references the source instances; summary column ``seg``) or ``"both"``. A DICOM
SEG needs DICOM sources: a NIfTI input gets its NIfTI files and a warning saying so.

Reference masks (``reference_dir``) are matched by name: ``<name>_mask.nii.gz`` (or ``.nii``)
first, which is how this command names its own masks, then, for NIfTI inputs, a file with the
input's own file name. A reference must have the volume's shape; it is binarised (> 0).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ichseg.errors import InputError
from ichseg.fileio import atomic_path
from ichseg.io.loader import index_input, output_name
from ichseg.io.nifti import write_nifti_atomic
from ichseg.metrics.overlap import mask_metrics
from ichseg.options import MASK_FORMATS, look_up_option
from ichseg.volume import CTVolume

logger = logging.getLogger(__name__)

SUMMARY_FIELDS: tuple[str, ...] = (
    "input",
    "series_uid",
    "name",
    "image",
    "mask",
    "preview",
    "num_slices",
    "intracranial_ml",
    "dice",
    "hd95_mm",
    "warnings",
    "quality_flags",
    "status",
    "error",
)
PREVIEW_SLICES = 12
PREVIEW_COLUMNS = 4
# Brain window (center 40, width 80) for the preview.
PREVIEW_HU_RANGE = (0.0, 80.0)
# Affines that differ by more than this (mm) are reported when comparing with a reference.
AFFINE_TOLERANCE_MM = 1e-3
OUTPUT_FORMATS = MASK_FORMATS
SEG_NEEDS_DICOM = "DICOM SEG not written: it needs DICOM sources (NIfTI masks written)"


def summary_fields(hemorrhage: bool = False, seg: bool = False) -> list[str]:
    """Summary columns: ``SUMMARY_FIELDS`` plus those of a hemorrhage model and a SEG."""
    from ichseg.segmentation.hemorrhage import VOLUME_COLUMNS

    fields: list[str] = []
    for name in SUMMARY_FIELDS:
        fields.append(name)
        if name == "preview":
            fields += (["hemorrhage"] if hemorrhage else []) + (["seg"] if seg else [])
        if name == "intracranial_ml" and hemorrhage:
            fields += VOLUME_COLUMNS
    return fields


@dataclass
class SegmentResult:
    """What :func:`segment_folder` wrote.

    ``skipped`` holds (path, reason) of every file left out: files that are not usable CT and
    slices dropped from their series; each also has a ``skipped`` row in ``rows``.
    """

    out_dir: Path
    rows: list[dict[str, Any]]
    summary_csv: Path
    summary_json: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_ok(self) -> int:
        return sum(row["status"] == "ok" for row in self.rows)

    @property
    def num_error(self) -> int:
        return sum(row["status"] == "error" for row in self.rows)


def _check_output(input_path: Path, out_dir: Path) -> None:
    source = input_path.resolve()
    target = out_dir.resolve()
    if target == source or source in target.parents:
        raise InputError(out_dir, f"output folder must not be inside the input {input_path}")
    if target.exists() and not target.is_dir():
        raise InputError(out_dir, "output path exists and is not a folder")


def _replace_atomic(path: Path, write) -> Path:
    """Write through a hidden temporary file in the same folder, then rename over ``path``."""
    with atomic_path(path, suffix="".join(path.suffixes)) as tmp:
        write(tmp)
    return path


def write_preview(hu: np.ndarray, mask: np.ndarray, path: str | Path, title: str = "") -> Path:
    """PNG grid of up to 12 slices (brain window) with the mask contour in red.

    Slices are spread evenly over those holding mask, or over the whole volume when the mask
    is empty.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    with_mask = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    candidates = with_mask if with_mask.size else np.arange(hu.shape[0])
    count = min(PREVIEW_SLICES, candidates.size)
    picks = candidates[np.unique(np.linspace(0, candidates.size - 1, count).round().astype(int))]
    columns = min(PREVIEW_COLUMNS, picks.size)
    rows = int(np.ceil(picks.size / columns))
    figure = Figure(figsize=(2.6 * columns, 2.6 * rows + (0.4 if title else 0.0)), dpi=80)
    FigureCanvasAgg(figure)
    for i, z in enumerate(picks):
        axis = figure.add_subplot(rows, columns, i + 1)
        axis.imshow(hu[z], cmap="gray", vmin=PREVIEW_HU_RANGE[0], vmax=PREVIEW_HU_RANGE[1])
        if mask[z].any() and not mask[z].all():
            axis.contour(mask[z].astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)
        axis.set_title(f"z={int(z)}", fontsize=8)
        axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return _replace_atomic(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def _find_reference(reference_dir: Path, name: str, source: Path | None) -> Path | None:
    candidates = [reference_dir / f"{name}_mask.nii.gz", reference_dir / f"{name}_mask.nii"]
    if source is not None:
        candidates.append(reference_dir / source.name)
    return next((p for p in candidates if p.is_file()), None)


def _compare_reference(
    volume: CTVolume, mask: np.ndarray, reference: Path, warnings: list[str]
) -> dict[str, float | None]:
    import nibabel as nib

    image = nib.load(str(reference))
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    ref = np.ascontiguousarray(data.transpose(2, 1, 0)) > 0 if data.ndim == 3 else None
    if ref is None or ref.shape != mask.shape:
        warnings.append(f"reference {reference.name} shape {data.shape} differs from the volume")
        return {"dice": None, "hd95_mm": None}
    if np.abs(np.asarray(image.affine) - volume.affine).max() > AFFINE_TOLERANCE_MM:
        warnings.append(f"reference {reference.name} affine differs from the volume")
    return mask_metrics(mask, ref, volume.spacing)


def _write_table(rows: list[dict[str, Any]], out_dir: Path, fields: list[str]) -> tuple[Path, Path]:
    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})

    def write_json(tmp: Path) -> None:
        tmp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")

    return (
        _replace_atomic(out_dir / "summary.csv", write_csv),
        _replace_atomic(out_dir / "summary.json", write_json),
    )


def segment_folder(
    input_path: str | Path,
    out_dir: str | Path,
    method: Literal["classical", "unet"] = "classical",
    checkpoint: str | Path | None = None,
    reference_dir: str | Path | None = None,
    progress: bool = True,
    *,
    hemorrhage_checkpoint: str | Path | None = None,
    output_format: str = "nifti",
) -> SegmentResult:
    """Segment the intracranial space of every volume under ``input_path`` into ``out_dir``.

    Args:
        input_path: a DICOM folder tree, a NIfTI file, or a folder of NIfTI files.
        out_dir: output folder (created); must not be inside ``input_path``.
        method: ``"classical"`` (no training) or ``"unet"`` (needs ``checkpoint``).
        checkpoint: U-Net checkpoint from ``train_segmenter``.
        reference_dir: optional folder of reference masks for Dice / HD95 (see module doc).
        progress: show a progress bar over volumes.
        hemorrhage_checkpoint: hemorrhage U-Net: label maps and volumes (see module doc).
        output_format: ``"nifti"``, ``"dicom-seg"`` or ``"both"`` (see module doc).

    Returns:
        The rows written to ``summary.csv`` / ``summary.json`` and the paths.

    Raises:
        InputError: bad input or output path, or no volume could be segmented.
    """
    from tqdm.auto import tqdm

    from ichseg.segmentation.masking import MaskingConfig, make_masker

    input_path, out_dir = Path(input_path), Path(out_dir)
    if method not in ("classical", "unet"):
        raise InputError(None, f"method must be 'classical' or 'unet', got {method!r}")
    if method == "unet" and (checkpoint is None or not Path(checkpoint).is_file()):
        raise InputError(checkpoint, "the unet method needs an existing checkpoint file")
    look_up_option("output format", output_format, OUTPUT_FORMATS)
    reference = Path(reference_dir) if reference_dir is not None else None
    if reference is not None and not reference.is_dir():
        raise InputError(reference, "reference folder does not exist")
    _check_output(input_path, out_dir)
    index = index_input(input_path)
    masker = make_masker(MaskingConfig(enabled=True, method=method, checkpoint=checkpoint))
    from ichseg.segmentation.hemorrhage import (
        hemorrhage_volumes,
        load_hemorrhage_segmenter,
        write_series_seg,
    )

    hemorrhage = load_hemorrhage_segmenter(hemorrhage_checkpoint)
    want_seg = output_format in ("dicom-seg", "both")
    fields = summary_fields(hemorrhage is not None, want_seg)
    out_dir.mkdir(parents=True, exist_ok=True)

    # iter_volumes yields one item per series, DICOM series first, then NIfTI files.
    sources: list[tuple[str, str, Path | None]] = [
        (str(s.folder), s.series_uid, None) for s in index.dicom_series
    ] + [(str(p), "", p) for p in index.nifti_files]
    used: set[str] = set()
    rows: list[dict[str, Any]] = []
    items = tqdm(
        zip(sources, index.iter_volumes(), strict=True),
        total=len(sources),
        desc="segment",
        unit="volume",
        disable=not progress,
    )
    skipped = list(index.skipped)
    for (source, series_uid, nifti_path), item in items:
        row: dict[str, Any] = {k: None for k in fields}
        row.update(input=source, series_uid=series_uid, status="error", warnings="")
        if isinstance(item, InputError):
            row["error"] = item.reason if item.path is None else str(item)
            rows.append(row)
            skipped.extend(getattr(item, "dropped", []))
            continue
        volume = item
        skipped.extend(volume.dropped)
        warnings = list(volume.warnings)
        row.update(
            input=volume.source,
            series_uid=volume.series_uid,
            num_slices=volume.num_slices,
            quality_flags=";".join(volume.quality_flags),
        )
        try:
            name = output_name(volume, used)
            row["name"] = name
            mask = np.asarray(masker(volume), dtype=np.uint8)
            if mask.shape != volume.shape:
                raise ValueError(f"mask shape {mask.shape} differs from volume {volume.shape}")
            labels = None
            if hemorrhage is not None:
                labels = hemorrhage.predict_volume(volume, intracranial_mask=mask)
            dicom = bool(volume.slice_paths)
            if output_format != "dicom-seg" or not dicom:
                image_path = write_nifti_atomic(volume.to_nifti(), out_dir / f"{name}_image.nii.gz")
                mask_path = write_nifti_atomic(
                    volume.to_nifti(mask, dtype=np.uint8), out_dir / f"{name}_mask.nii.gz"
                )
                row.update(image=image_path.name, mask=mask_path.name)
                if labels is not None:
                    labels_path = write_nifti_atomic(
                        volume.to_nifti(labels, dtype=np.uint8),
                        out_dir / f"{name}_hemorrhage.nii.gz",
                    )
                    row["hemorrhage"] = labels_path.name
            if want_seg and dicom:
                row["seg"] = write_series_seg(
                    volume, mask, labels, out_dir / f"{name}_seg.dcm"
                ).name
            elif want_seg:
                warnings.append(SEG_NEEDS_DICOM)
                logger.warning("%s: %s", volume.source, SEG_NEEDS_DICOM)
            preview_path = write_preview(
                volume.hu, mask, out_dir / f"{name}_preview.png", title=name
            )
            voxel_ml = float(np.prod(volume.spacing)) / 1000.0
            row.update(
                preview=preview_path.name,
                intracranial_ml=round(float(mask.sum()) * voxel_ml, 3),
            )
            if labels is not None:
                row.update(hemorrhage_volumes(labels, volume))
            if not mask.any():
                warnings.append("empty intracranial mask")
            if reference is not None:
                ref_path = _find_reference(reference, name, nifti_path)
                if ref_path is None:
                    warnings.append("no reference mask found")
                else:
                    row.update(_compare_reference(volume, mask, ref_path, warnings))
            row["status"] = "ok"
        except Exception as error:  # one bad volume must not stop the others
            logger.debug("segmenting %s failed", source, exc_info=True)
            row["error"] = f"{type(error).__name__}: {error}"
        row["warnings"] = "; ".join(warnings)
        rows.append(row)

    for path, reason in skipped:
        row = {k: None for k in fields}
        row.update(input=path, status="skipped", error=reason, warnings="")
        rows.append(row)
    summary_csv, summary_json = _write_table(rows, out_dir, fields)
    result = SegmentResult(out_dir, rows, summary_csv, summary_json, skipped)
    if result.num_ok == 0:
        first = next((r["error"] for r in rows if r["status"] == "error"), None)
        first = first or (rows[0]["error"] if rows else "no volumes")
        raise InputError(input_path, f"no volume could be segmented ({first})")
    return result

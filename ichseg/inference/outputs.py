"""What ``predict`` writes for each series beside its tables: masks, DICOM SEG, DICOM SR.

Grad-CAM overlays are written by :mod:`ichseg.inference.gradcam`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ichseg.inference.models import Predictor, model_identity
from ichseg.options import MASK_FORMATS, look_up_option
from ichseg.volume import HEMORRHAGE_CODES, CTVolume

OUTPUT_FORMATS = MASK_FORMATS
GRADCAM_FORMATS = ("png", "dicom", "both")
NEEDS_DICOM = "{what} not written: DICOM outputs need DICOM sources (masks are in NIfTI)"


@dataclass
class OutputOptions:
    """What ``predict`` writes for each series beside the tables.

    Attributes:
        gradcam: Grad-CAM overlays for positive series.
        gradcam_slices: overlays per positive series.
        gradcam_format: ``"png"``, ``"dicom"`` (Secondary Capture) or ``"both"``.
        output_format: masks as ``"nifti"``, ``"dicom-seg"`` or ``"both"``.
        sr: a DICOM Structured Report per series.
    """

    gradcam: bool = True
    gradcam_slices: int = 3
    gradcam_format: str = "png"
    output_format: str = "nifti"
    sr: bool = False

    def __post_init__(self) -> None:
        look_up_option("output format", self.output_format, OUTPUT_FORMATS)
        look_up_option("Grad-CAM format", self.gradcam_format, GRADCAM_FORMATS)

    @property
    def nifti(self) -> bool:
        return self.output_format in ("nifti", "both")

    @property
    def seg(self) -> bool:
        return self.output_format in ("dicom-seg", "both")

    def dicom_outputs(self, gradcam_written: bool) -> list[str]:
        """Names of the DICOM objects asked for (Grad-CAM only when overlays are written)."""
        wanted = ["SEG"] if self.seg else []
        wanted += ["SR"] if self.sr else []
        if gradcam_written and self.gradcam_format in ("dicom", "both"):
            wanted.append("Secondary Capture")
        return wanted


def write_masks(
    volume: CTVolume,
    mask: np.ndarray,
    labels: np.ndarray | None,
    out_dir: Path,
    name: str,
    options: OutputOptions,
) -> dict[str, str]:
    """NIfTI masks and/or the DICOM SEG of one series; relative paths by column.

    Args:
        volume: the series (a DICOM SEG only for one read from DICOM).
        mask: uint8 intracranial mask on the volume's grid.
        labels: hemorrhage label map, or None without a hemorrhage segmenter.
        out_dir: the output folder (paths returned are relative to it).
        name: the series' output name.
        options: which formats to write.
    """
    from ichseg.io.nifti import write_nifti_atomic

    written = {"mask": ""}
    if labels is not None:
        written["hemorrhage_mask"] = ""
    if options.seg:
        written["seg"] = ""
    dicom = bool(volume.slice_paths)
    if options.nifti or not dicom:
        path = write_nifti_atomic(
            volume.to_nifti(mask, dtype=np.uint8), out_dir / "masks" / f"{name}_mask.nii.gz"
        )
        written["mask"] = str(path.relative_to(out_dir))
        if labels is not None:
            path = write_nifti_atomic(
                volume.to_nifti(labels, dtype=np.uint8),
                out_dir / "masks" / f"{name}_hemorrhage.nii.gz",
            )
            written["hemorrhage_mask"] = str(path.relative_to(out_dir))
    if options.seg and dicom:
        from ichseg.segmentation.hemorrhage import write_series_seg

        path = write_series_seg(volume, mask, labels, out_dir / "seg" / f"{name}_seg.dcm")
        written["seg"] = str(path.relative_to(out_dir))
    return written


def write_report(
    predictor: Predictor,
    volume: CTVolume,
    probabilities: np.ndarray,
    volumes: dict[str, float],
    path: Path,
    identity: tuple[str, str] | None = None,
) -> Path:
    """The series' Structured Report: probabilities, series thresholds, volumes, ABC/2.

    Args:
        predictor: the model (its class names, series thresholds, name and version).
        volume: the series, read from DICOM.
        probabilities: the series probability of each class.
        volumes: the hemorrhage volume columns (empty without a hemorrhage segmenter).
        path: the report file to write.
        identity: the model's ``model_identity`` (hashes the weights: computed once per run
            by the caller, else here).
    """
    from ichseg.io.dicom_sr import SeriesFindings, write_structured_report

    names = predictor.class_names
    volumes_ml = {}
    if volumes:
        volumes_ml = {n: volumes[f"volume_ml_{n}"] for n in HEMORRHAGE_CODES.values()}
        volumes_ml["total"] = volumes["volume_ml_total"]
    findings = SeriesFindings(
        probabilities={n: float(p) for n, p in zip(names, probabilities, strict=True)},
        thresholds={n: float(predictor.thresholds.series[n]) for n in names},
        volumes_ml=volumes_ml,
        abc2_ml=volumes.get("abc2_ml_intraparenchymal") if volumes else None,
    )
    model_name, model_version = identity or model_identity(predictor)
    return write_structured_report(
        volume,
        volume.slice_paths,
        findings,
        path,
        model_name=model_name,
        model_version=model_version,
    )

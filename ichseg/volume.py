"""The one CT type every reader returns and every writer consumes.

Array layout is ``(z, y, x)`` = (slice, row, column). The affine follows the NIfTI/nibabel
convention: it maps the voxel index ``(x, y, z)`` = (column, row, slice) to RAS+ millimetres,
so ``nibabel.Nifti1Image(volume.hu.transpose(2, 1, 0), volume.affine)`` is the volume on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUBTYPES: tuple[str, ...] = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
"""The six RSNA labels, in the order every table and model output of ichseg uses."""

RSNA_WEIGHTS: tuple[float, ...] = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)
"""RSNA 2019 class weights for ``SUBTYPES``: ``any`` counts twice (metric and default loss)."""

HEMORRHAGE_CODES: dict[int, str] = {
    1: "epidural",
    2: "intraparenchymal",
    3: "intraventricular",
    4: "subarachnoid",
    5: "subdural",
}
"""Values of a hemorrhage label map (0 = none)."""

AIR_HU = -1000.0

QUALITY_FLAGS: dict[str, str] = {
    "rescale_assumed": "RescaleSlope and/or RescaleIntercept missing: slope 1 / intercept 0 "
    "assumed (an intercept is only assumed when the stored values already look like HU)",
    "rescale_12bit_fix": "RSNA 12-bit intercept fix applied (12-bit unsigned pixels, intercept "
    "above -100, taken as HU wrapped into 12 bits)",
    "orientation_assumed": "ImageOrientationPatient (DICOM) or sform/qform (NIfTI) missing: "
    "axial, the series orientation, or the pixdim-only affine assumed",
    "pixel_spacing_assumed": "PixelSpacing missing: 1 mm or the series spacing assumed",
    "position_assumed": "ImagePositionPatient missing on every slice: slices ordered by "
    "InstanceNumber, origin at 0",
    "slice_spacing_assumed": "slice step not measurable (one slice, or no positions): "
    "SliceThickness, else 1 mm, used",
    "slice_gap": "slices missing along the normal: the affine assumes the regular step, "
    "slice_positions hold the true positions",
    "irregular_spacing": "slice gaps differ by more than 10 %: the affine assumes the median step",
    "slices_dropped": "slices of the series were left out; CTVolume.dropped says which and why",
    "patient_id_fallback": "PatientID missing: StudyInstanceUID, SeriesInstanceUID (DICOM) or "
    "the file stem (NIfTI) used, so patient-level splits may put one patient on both sides",
    "hu_range_suspect": "values look like raw stored values rather than HU (NIfTI)",
}
"""Machine-readable codes in ``CTVolume.quality_flags``: one per assumption made while reading.

Every command that reports a volume prints them, so a row computed on assumed geometry or an
assumed rescale can be filtered out of an analysis.
"""


def patient_id_of(metadata: dict[str, Any], series_uid: str) -> str:
    """PatientID, else StudyInstanceUID, else the series uid (readers flag the fallback)."""
    return str(metadata.get("PatientID") or metadata.get("StudyInstanceUID") or series_uid)


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with its geometry and provenance.

    Attributes:
        hu: float32 array ``(z, y, x)`` in HU.
        affine: 4x4 voxel ``(x, y, z)`` -> RAS+ mm (NIfTI convention).
        source: file or folder the volume was read from.
        series_uid: SeriesInstanceUID, or a stable id derived from the file name for NIfTI.
        slice_positions: position of each slice along the slice normal, in mm, ascending.
        sop_uids: SOPInstanceUID per slice ("" when unknown, e.g. NIfTI).
        instance_numbers: InstanceNumber per slice (None when unknown).
        metadata: PatientID, StudyInstanceUID, age, sex, KVP, manufacturer, kernel, ...
        warnings: quirks found while reading (tilt, missing slices, 12-bit fix, ...), one
            human-readable line each.
        quality_flags: codes from ``QUALITY_FLAGS``, one per assumption made while reading (in
            the order first made, no repeats). Empty when nothing was assumed.
        dropped: (file path, reason) of each slice that belonged to the series but was left
            out (undecodable pixels, inconsistent size/orientation/spacing, duplicate position,
            no usable rescale). The rest of the series is kept; the gap a dropped slice leaves
            is reported like a missing slice.
        slice_paths: the DICOM file of each slice, in slice order (what DICOM SEG, SR and
            Secondary Capture outputs reference); empty when not read from DICOM files.
    """

    hu: np.ndarray
    affine: np.ndarray
    source: str
    series_uid: str
    slice_positions: np.ndarray
    sop_uids: list[str] = field(default_factory=list)
    instance_numbers: list[int | None] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    quality_flags: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    slice_paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"hu must be 3D (z, y, x), got shape {self.hu.shape}")
        self.hu = np.ascontiguousarray(self.hu, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        n = self.hu.shape[0]
        self.slice_positions = np.asarray(self.slice_positions, dtype=np.float64)
        if self.slice_positions.shape != (n,):
            raise ValueError("slice_positions needs one entry per slice")
        if not self.sop_uids:
            self.sop_uids = [""] * n
        if not self.instance_numbers:
            self.instance_numbers = [None] * n
        if len(self.sop_uids) != n or len(self.instance_numbers) != n:
            raise ValueError("sop_uids and instance_numbers need one entry per slice")
        self.slice_paths = [str(path) for path in self.slice_paths]
        if self.slice_paths and len(self.slice_paths) != n:
            raise ValueError("slice_paths needs one entry per slice (or none)")
        unknown = sorted(set(self.quality_flags) - set(QUALITY_FLAGS))
        if unknown:
            raise ValueError(f"unknown quality flag(s) {unknown}; known: {sorted(QUALITY_FLAGS)}")
        self.quality_flags = list(dict.fromkeys(self.quality_flags))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def num_slices(self) -> int:
        return int(self.hu.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (z, y, x) in mm, from the affine's column norms."""
        sx, sy, sz = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(sz), float(sy), float(sx)

    @property
    def patient_id(self) -> str:
        """PatientID, else StudyInstanceUID, else the series uid (readers flag the fallback)."""
        return patient_id_of(self.metadata, self.series_uid)

    @property
    def study_uid(self) -> str:
        return str(self.metadata.get("StudyInstanceUID") or self.series_uid)

    def to_nifti(self, data: np.ndarray | None = None, dtype: Any = None):
        """A nibabel image of ``data`` (default: the HU) on this volume's grid."""
        import nibabel as nib

        array = self.hu if data is None else np.asarray(data)
        if array.shape != self.hu.shape:
            raise ValueError(f"data shape {array.shape} differs from volume {self.hu.shape}")
        if dtype is not None:
            array = array.astype(dtype)
        image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), self.affine)
        image.header.set_xyzt_units("mm")
        image.set_qform(self.affine, code=1)
        image.set_sform(self.affine, code=1)
        return image

    def summary(self) -> dict[str, Any]:
        """Plain-type description used by ``ichseg inspect``."""
        hu = self.hu
        return {
            "source": self.source,
            "series_uid": self.series_uid,
            "patient_id": self.patient_id,
            "num_slices": self.num_slices,
            "shape": list(self.shape),
            "spacing_mm": [round(s, 4) for s in self.spacing],
            "hu_min": float(hu.min()),
            "hu_median": float(np.median(hu)),
            "hu_max": float(hu.max()),
            "warnings": list(self.warnings),
            "quality_flags": list(self.quality_flags),
            "dropped": [{"path": p, "reason": r} for p, r in self.dropped],
        }

"""Synthetic head CT studies with ground truth, written as DICOM, NIfTI and RSNA tables."""

from ichseg.phantom.anatomy import (
    MIN_SLICE_VOXELS,
    PhantomConfig,
    PhantomStudy,
    generate_study,
)
from ichseg.phantom.writers import (
    Quirks,
    SeriesUIDs,
    series_geometry,
    study_seed,
    study_to_volume,
    study_uids,
    write_dataset,
    write_dicom_series,
    write_nifti_volumes,
)

__all__ = [
    "MIN_SLICE_VOXELS",
    "PhantomConfig",
    "PhantomStudy",
    "Quirks",
    "SeriesUIDs",
    "generate_study",
    "series_geometry",
    "study_seed",
    "study_to_volume",
    "study_uids",
    "write_dataset",
    "write_dicom_series",
    "write_nifti_volumes",
]

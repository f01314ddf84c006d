"""NIfTI volumes (.nii, .nii.gz) read with nibabel, values taken as HU."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ichseg.errors import InputError
from ichseg.volume import CTVolume

# A CT in HU has air near -1000; an image whose minimum is at or above zero while it reaches
# bone-like values most likely holds raw stored values without the rescale intercept.
_RAW_VALUE_HINT = (0.0, 2000.0)


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_nifti(path: str | Path) -> CTVolume:
    """Read a 3D NIfTI CT.

    The affine is kept as stored (``img.affine``: sform, else qform). A 4D image with a single
    volume is squeezed; any other 4D image, and images holding NaN or Inf, are refused.

    Raises:
        InputError: unreadable file, not 3D, or non-finite values.
    """
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.load(str(path))
    except Exception as error:
        raise InputError(path, f"not a readable NIfTI file ({type(error).__name__})") from None
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"expected a 3D volume, got shape {tuple(image.shape)}")
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as error:
        raise InputError(path, f"cannot read voxel data ({type(error).__name__})") from None
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(path, f"{bad} voxel(s) are NaN or Inf")
    _refuse_label_map(path, image, data)
    warnings: list[str] = []
    if data.min() >= _RAW_VALUE_HINT[0] and data.max() > _RAW_VALUE_HINT[1]:
        warnings.append(
            f"values range {data.min():.0f}..{data.max():.0f}: looks like raw stored values, not HU"
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    hu = np.ascontiguousarray(data.transpose(2, 1, 0))
    z_axis = affine[:3, 2]
    z_length = float(np.linalg.norm(z_axis)) or 1.0
    origins = affine[:3, 3][None, :] + np.arange(hu.shape[0])[:, None] * z_axis[None, :]
    positions = origins @ (z_axis / z_length)
    # A stable id per file so outputs and splits can refer to a NIfTI like to a DICOM series.
    series_uid = "nifti-" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    stem = nifti_stem(path)
    return CTVolume(
        hu=hu,
        affine=affine,
        source=str(path),
        series_uid=series_uid,
        slice_positions=positions,
        metadata={"PatientID": stem, "StudyInstanceUID": stem, "SeriesInstanceUID": series_uid},
        warnings=warnings,
    )


# A CT has thousands of distinct values; a mask or label map stored as integers has a handful.
_LABEL_MAP_MAX_VALUES = 16


def _refuse_label_map(path: Path, image, data: np.ndarray) -> None:
    if not np.issubdtype(image.get_data_dtype(), np.integer):
        return
    sample = data[:: max(1, data.shape[0] // 8)]
    values = np.unique(sample)
    if len(values) <= _LABEL_MAP_MAX_VALUES and values.min() >= 0 and values.max() < 256:
        raise InputError(
            path, f"looks like a mask or label map ({len(values)} distinct values), not a CT"
        )


def write_nifti_atomic(image, path: str | Path) -> Path:
    """Save a nibabel image through a temporary file and a rename."""
    import nibabel as nib

    from ichseg.fileio import atomic_path

    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, str(tmp))
    return path

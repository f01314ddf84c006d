"""DICOM patient geometry (LPS) <-> NIfTI affine (RAS), as pure functions.

DICOM: ImageOrientationPatient holds the row direction (the way the column index grows) and the
column direction (the way the row index grows); PixelSpacing is (row spacing, column spacing).
The affine returned here maps the voxel index (x=column, y=row, z=slice) to RAS+ mm.
"""

from __future__ import annotations

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def slice_normal(orientation: np.ndarray | list[float]) -> np.ndarray:
    """Unit normal of the image plane: row direction x column direction."""
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    return normal / np.linalg.norm(normal)


def dicom_affine(
    first_position: np.ndarray | list[float],
    orientation: np.ndarray | list[float],
    pixel_spacing: tuple[float, float] | list[float],
    slice_step: np.ndarray | list[float],
) -> np.ndarray:
    """RAS affine for a series.

    Args:
        first_position: ImagePositionPatient of the first slice (LPS, mm).
        orientation: ImageOrientationPatient (six direction cosines).
        pixel_spacing: PixelSpacing (row spacing, column spacing) in mm.
        slice_step: vector in LPS mm from one slice's origin to the next. It follows the
            actual positions, so a gantry tilt shows up as a sheared affine.
    """
    iop = np.asarray(orientation, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = np.asarray(slice_step, dtype=np.float64)
    lps[:3, 3] = np.asarray(first_position, dtype=np.float64)
    return LPS_TO_RAS @ lps


def tilt_degrees(orientation: np.ndarray | list[float], slice_step: np.ndarray) -> float:
    """Angle between the slice-to-slice step and the plane normal (gantry tilt)."""
    step = np.asarray(slice_step, dtype=np.float64)
    length = np.linalg.norm(step)
    if length == 0:
        return 0.0
    cosine = abs(float(np.dot(step / length, slice_normal(orientation))))
    return float(np.degrees(np.arccos(min(1.0, cosine))))

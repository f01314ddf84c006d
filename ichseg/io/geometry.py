"""DICOM patient geometry (LPS) <-> NIfTI affine (RAS), as pure functions.

DICOM: ImageOrientationPatient holds the row direction (the way the column index grows) and the
column direction (the way the row index grows); PixelSpacing is (row spacing, column spacing).
The affine returned here maps the voxel index (x=column, y=row, z=slice) to RAS+ mm.
"""

from __future__ import annotations

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

ORIENTATION_TOLERANCE = 0.01
"""Largest accepted deviation of an ImageOrientationPatient from two orthogonal unit vectors.

Scanners write the direction cosines rounded to a few decimals (errors of about 1e-5); 0.01
(about 0.6 degrees of skew) passes any such rounding and refuses made-up or damaged values.
"""


def orthonormal_orientation(
    orientation: tuple[float, ...] | list[float] | np.ndarray,
    tolerance: float = ORIENTATION_TOLERANCE,
) -> np.ndarray:
    """Validate ImageOrientationPatient and remove its rounding error.

    Args:
        orientation: the six direction cosines (row direction, then column direction).
        tolerance: accepted deviation of each vector's length from 1 and of their dot product
            from 0.

    Returns:
        Six floats: the row direction normalised, the column direction made exactly
        orthogonal to it (Gram-Schmidt) and normalised.

    Raises:
        ValueError: with a one-line reason when the values are not six finite numbers, a
            vector is not of unit length, or the two are not orthogonal.
    """
    iop = np.asarray(orientation, dtype=np.float64).ravel()
    if iop.shape != (6,) or not np.isfinite(iop).all():
        raise ValueError(f"ImageOrientationPatient {_fmt(iop)} is not six finite numbers")
    row, column = iop[:3], iop[3:]
    lengths = np.linalg.norm(row), np.linalg.norm(column)
    if max(abs(length - 1.0) for length in lengths) > tolerance:
        raise ValueError(
            f"ImageOrientationPatient {_fmt(iop)} is not two unit vectors "
            f"(lengths {lengths[0]:.3g}, {lengths[1]:.3g})"
        )
    dot = float(np.dot(row, column) / (lengths[0] * lengths[1]))
    if abs(dot) > tolerance:
        angle = float(np.degrees(np.arccos(np.clip(dot, -1.0, 1.0))))
        raise ValueError(
            f"ImageOrientationPatient {_fmt(iop)} is not orthogonal "
            f"(row and column directions {angle:.1f} degrees apart)"
        )
    row = row / lengths[0]
    column = column - np.dot(column, row) * row
    return np.concatenate([row, column / np.linalg.norm(column)])


def valid_pixel_spacing(spacing: tuple[float, ...] | list[float] | None) -> tuple[float, float]:
    """PixelSpacing as two positive finite floats (row spacing, column spacing).

    Raises:
        ValueError: with a one-line reason when it is not two positive finite numbers.
    """
    values = np.asarray(spacing if spacing is not None else [], dtype=np.float64).ravel()
    if values.shape != (2,) or not np.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"PixelSpacing {_fmt(values)} is not two positive finite numbers")
    return float(values[0]), float(values[1])


def _fmt(values: np.ndarray) -> str:
    return "\\".join(f"{v:g}" for v in np.asarray(values).ravel()) or "(empty)"


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

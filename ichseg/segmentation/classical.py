"""Intracranial space from thresholds and morphology, with no training.

The target is everything inside the skull's inner table (brain, CSF and any epidural or subdural
blood lying against the bone), not the brain parenchyma. Each slice is handled in two ways:

* closed ring: the bone is closed over small gaps (sutures, foramina, partial volume) and the
  holes it encloses are filled, with air cells inside the head (mastoid, skull-base sinuses)
  counted as walls; this follows the bone exactly and keeps blood at the inner table.
* open ring (craniectomy, large defects): rays are cast from the centre of the skull; where a
  ray leaves the head before meeting bone, the inner-table radius comes from an ellipse fitted
  to the rays that did meet bone (or, where the slice is not elliptical, from interpolation over
  angle), so the defect is bridged along the skull's own curve.

The open-ring estimate is used only on slices where the closed-ring fill finds clearly less
than it. The 3D largest component then drops anything outside the cranial cavity (headrests,
tables, orbits, bits of diploe), slices above the vertex come out empty, and a one-pixel rim of
tissue lifted by partial volume at the inner table is given back to the inside.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

# Cortical bone is far above this, soft tissue and blood (<= ~90 HU) far below; the margin
# leaves room for partial volume at thin bone and for contrast-enhanced vessels.
BONE_HU = 300.0
# Below this a voxel is air (outside the head, sinuses, mastoid cells), not intracranial tissue.
AIR_HU = -300.0
# Gaps in the bone ring narrower than about twice this radius are bridged before filling.
CLOSING_RADIUS_MM = 3.0
# Tissue touching the inner table is lifted by partial volume to at most about this value,
# while the bone side of that edge (cortex, and mostly diploe) stays above it.
PARTIAL_VOLUME_HU = 400.0
# Detaches thin leaks (e.g. through a foramen) before the largest-component step.
OPENING_RADIUS_MM = 1.5
# A slice whose filled interior is below this fraction of the ray-cast estimate has an open ring.
OPEN_RING_RATIO = 0.9
# A slice needs bone on at least this fraction of ray directions to be treated as a skull slice.
MIN_BONE_ANGLE_FRACTION = 0.5
# Interiors smaller than this are the vertex cap or noise, not cranial cavity.
MIN_SLICE_AREA_MM2 = 20.0
NUM_RAYS = 360
# An ellipse bridges a skull defect only if it fits the intact inner table this well (median
# relative radial error); otherwise the radius is interpolated linearly over angle.
ELLIPSE_MAX_MISFIT = 0.05

_INPLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_INPLANE_CROSS[1] = ndi.generate_binary_structure(2, 1)


def _inplane_dilate(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Per-slice dilation with a Euclidean disk of ``radius_mm``; empty slices stay empty."""
    out = mask.copy()
    if radius_mm <= 0:
        return out
    # 2D transforms slice by slice are several times faster than one 3D transform whose z
    # sampling is made huge, and skip the slices with nothing to do.
    for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        out[z] = ndi.distance_transform_edt(~mask[z], sampling=spacing[1:]) <= radius_mm
    return out


def _inplane_erode(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Per-slice erosion with a Euclidean disk of ``radius_mm``; full slices stay full."""
    out = mask.copy()
    if radius_mm <= 0:
        return out
    flat = mask.reshape(mask.shape[0], -1)
    for z in np.flatnonzero(flat.any(axis=1) & ~flat.all(axis=1)):
        out[z] = ndi.distance_transform_edt(mask[z], sampling=spacing[1:]) > radius_mm
    return out


def inplane_closing(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Per-slice morphological closing of a ``(z, y, x)`` mask with a disk in mm."""
    return _inplane_erode(_inplane_dilate(mask, radius_mm, spacing), radius_mm, spacing)


def inplane_opening(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Per-slice morphological opening of a ``(z, y, x)`` mask with a disk in mm."""
    return _inplane_dilate(_inplane_erode(mask, radius_mm, spacing), radius_mm, spacing)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill, slice by slice, the background regions not connected to the slice border.

    Labelling the background once (4-connected, in-plane only) is linear in the number of
    voxels, unlike iterated dilation from the border.
    """
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndi.label(~mask, structure=_INPLANE_CROSS)
    if count == 0:
        return mask.copy()
    border = np.zeros(count + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[edge] = True
    border[0] = True  # label 0 is the foreground itself
    return mask | ~border[labels]


def largest_component(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """The largest connected component of ``mask`` (6-connected in 3D by default)."""
    labels, count = ndi.label(mask, structure=structure)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def partial_volume_rim(mask: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """Voxels one pixel outside ``mask`` (in-plane, 4-connected) that are tissue, not bone.

    Partial volume lifts tissue touching the inner table (blood there included) above the
    bone threshold, and a mask edge may stop one pixel short of the table; such a voxel is
    nearer tissue than cortical bone in HU and belongs inside.
    """
    mask = np.asarray(mask, dtype=bool)
    ring = ndi.binary_dilation(mask, structure=_INPLANE_CROSS) & ~mask
    return ring & (hu < PARTIAL_VOLUME_HU) & (hu > AIR_HU)


def _fit_ellipse(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Conic coefficients ``(A, B, C, D, E, F)`` of the least-squares ellipse through points.

    Direct ellipse-specific fit (Fitzgibbon, Pilu and Fisher, in the numerically stable form of
    Halir and Flusser); None when no ellipse fits.
    """
    d1 = np.stack([x * x, x * y, y * y], axis=1)
    d2 = np.stack([x, y, np.ones_like(x)], axis=1)
    s1, s2, s3 = d1.T @ d1, d1.T @ d2, d2.T @ d2
    try:
        t = -np.linalg.solve(s3, s2.T)
        m = s1 + s2 @ t
        m = np.array([m[2] / 2.0, -m[1], m[0] / 2.0])
        values, vectors = np.linalg.eig(m)
    except np.linalg.LinAlgError:
        return None
    vectors = np.real(vectors)
    condition = 4.0 * vectors[0] * vectors[2] - vectors[1] ** 2
    if not (condition > 0).any():
        return None
    a1 = vectors[:, int(np.argmax(condition > 0))]
    coefficients = np.concatenate([a1, t @ a1])
    # Sign chosen so the conic is negative inside.
    return coefficients if coefficients[0] + coefficients[2] > 0 else -coefficients


def _ellipse_radius(coefficients: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Distance from the origin to the conic along each angle (NaN where no crossing ahead)."""
    a, b, c, d, e, f = coefficients
    ux, uy = np.cos(angles), np.sin(angles)
    qa = a * ux * ux + b * ux * uy + c * uy * uy
    qb = d * ux + e * uy
    disc = qb * qb - 4.0 * qa * f
    with np.errstate(invalid="ignore", divide="ignore"):
        root = (-qb + np.sqrt(disc)) / (2.0 * qa)
    return np.where((disc >= 0) & (qa > 0) & (f < 0) & (root > 0), root, np.nan)


def _bridge_gaps(angles: np.ndarray, stop: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Inner-table radius over angles without bone, from the angles with bone.

    An ellipse through the inner table follows the skull's curvature across a wide defect;
    linear interpolation over angle is the fallback where the slice is not elliptical.
    """
    out = stop.astype(np.float64)
    out[~hit] = np.interp(angles[~hit], angles[hit], out[hit], period=2.0 * np.pi)
    scale = float(np.mean(out[hit]))
    if scale <= 0:
        return out
    x, y = out[hit] * np.cos(angles[hit]) / scale, out[hit] * np.sin(angles[hit]) / scale
    coefficients = _fit_ellipse(x, y)
    if coefficients is None:
        return out
    fitted = _ellipse_radius(coefficients, angles) * scale
    misfit = np.abs(fitted[hit] - out[hit]) / np.maximum(out[hit], 1e-6)
    if np.isnan(fitted).any() or float(np.median(misfit)) > ELLIPSE_MAX_MISFIT:
        return out
    out[~hit] = fitted[~hit]
    return out


def _ray_cast_interior(
    hu: np.ndarray, bone: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Star-shaped inner-table estimate per slice, bridging gaps in the bone over angle.

    Returns:
        The ``(z, y, x)`` estimate and a boolean per slice telling where it is defined (enough
        rays met bone).
    """
    num_slices, height, width = hu.shape
    sy, sx = float(spacing[1]), float(spacing[2])
    result = np.zeros(hu.shape, dtype=bool)
    slices = np.flatnonzero(bone.reshape(num_slices, -1).any(axis=1))
    valid = np.zeros(num_slices, dtype=bool)
    if slices.size == 0:
        return result, valid

    # The centre of the bone's bounding box moves less than its centroid when a sector of the
    # skull is missing.
    ys = bone[slices].any(axis=2)
    xs = bone[slices].any(axis=1)
    cy = (ys.argmax(axis=1) + height - 1 - ys[:, ::-1].argmax(axis=1)) / 2.0
    cx = (xs.argmax(axis=1) + width - 1 - xs[:, ::-1].argmax(axis=1)) / 2.0

    step = min(sy, sx)
    # Far enough to leave the image from any of the centres.
    max_radius = float(
        np.hypot(np.maximum(cy, height - 1 - cy) * sy, np.maximum(cx, width - 1 - cx) * sx).max()
    )
    radii = np.arange(0.0, max_radius + step, step, dtype=np.float64)
    angles = np.linspace(0.0, 2.0 * np.pi, NUM_RAYS, endpoint=False)
    # Coordinates of every sample: (slice, angle, radius).
    ray_y = cy[:, None, None] + (np.sin(angles)[None, :, None] * radii[None, None, :]) / sy
    ray_x = cx[:, None, None] + (np.cos(angles)[None, :, None] * radii[None, None, :]) / sx
    ray_z = np.broadcast_to(slices[:, None, None].astype(np.float64), ray_y.shape)
    coords = np.stack([ray_z, ray_y, ray_x]).astype(np.float32)
    bone_ray = ndi.map_coordinates(bone.view(np.uint8), coords, order=0, cval=0) > 0
    air_ray = ndi.map_coordinates(hu, coords, order=0, cval=-1000.0) < AIR_HU
    del coords, ray_x, ray_y

    n_radii = radii.size
    first_bone = np.where(bone_ray.any(axis=2), bone_ray.argmax(axis=2), n_radii) * step
    first_air = np.where(air_ray.any(axis=2), air_ray.argmax(axis=2), n_radii) * step
    hits = first_bone < first_air  # the ray met the skull before leaving the head

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    for row, z in enumerate(slices):
        hit = hits[row]
        if hit.mean() < MIN_BONE_ANGLE_FRACTION:
            continue
        valid[z] = True
        stop = first_bone[row].astype(np.float64)
        if not hit.all():
            # The inner table lies about half a sample before the first bone sample; where no
            # bone pixel is there to be excluded, the bridged radius must stop at the table.
            stop = _bridge_gaps(angles, stop, hit)
            stop[~hit] -= 0.5 * step
            # Across a defect the brain must still end where the head ends.
            stop[~hit] = np.minimum(stop[~hit], first_air[row][~hit])
        dy = (yy - cy[row]) * sy
        dx = (xx - cx[row]) * sx
        theta = np.mod(np.arctan2(dy, dx), 2.0 * np.pi)
        limit = np.interp(theta, angles, stop, period=2.0 * np.pi)
        result[z] = np.hypot(dy, dx) < limit
    return result, valid


def classical_intracranial_mask(
    hu: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> np.ndarray:
    """Intracranial space of a head CT from bone thresholds and morphology.

    Args:
        hu: ``(z, y, x)`` volume in HU.
        spacing: voxel size ``(z, y, x)`` in mm; the morphology radii are in mm.

    Returns:
        uint8 ``(z, y, x)`` mask, 1 inside the skull's inner table.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3D (z, y, x), got shape {hu.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x), got {spacing}")

    bone = hu >= BONE_HU
    if not bone.any():
        return np.zeros(hu.shape, dtype=np.uint8)
    tissue = (hu > AIR_HU) & ~bone

    closed_bone = inplane_closing(bone, CLOSING_RADIUS_MM, spacing)
    # Air cells inside the head (mastoid, sinuses in the skull base) can span the whole
    # thickness of the bone; as walls they keep the ring closed instead of opening it.
    internal_air = fill_holes_per_slice(hu > AIR_HU) & ~tissue & ~bone
    walls = closed_bone | internal_air
    enclosed = fill_holes_per_slice(walls) & ~walls

    # Rays start from the skull alone: a headrest or table of bone density would pull the
    # centre off the head.
    skull = largest_component(closed_bone, structure=np.ones((3, 3, 3), dtype=bool))
    rays, ray_valid = _ray_cast_interior(hu, skull, spacing)
    rays &= ~walls
    enclosed_area = enclosed.reshape(hu.shape[0], -1).sum(axis=1)
    ray_area = rays.reshape(hu.shape[0], -1).sum(axis=1)
    open_ring = ray_valid & (enclosed_area < OPEN_RING_RATIO * ray_area)
    mask = enclosed.copy()
    mask[open_ring] |= rays[open_ring]

    mask = inplane_opening(mask, OPENING_RADIUS_MM, spacing)
    if not mask.any():
        return np.zeros(hu.shape, dtype=np.uint8)
    mask = largest_component(mask)
    # Calcifications inside the brain are intracranial too.
    mask = fill_holes_per_slice(mask)
    mask |= partial_volume_rim(mask, hu)
    pixel_area = spacing[1] * spacing[2]
    too_small = mask.reshape(hu.shape[0], -1).sum(axis=1) * pixel_area < MIN_SLICE_AREA_MM2
    mask[too_small] = False
    return mask.astype(np.uint8)

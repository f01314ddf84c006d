"""Volumes in ml and ABC/2 against analytic cases and the phantom's DICOM series."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ichseg.io.dicom import read_dicom
from ichseg.io.geometry import LPS_TO_RAS
from ichseg.phantom import PhantomConfig, Quirks, generate_study, study_to_volume, write_dataset
from ichseg.volume import CTVolume
from ichseg.volumetry import (
    abc2,
    abc2_measurement,
    kothari_weights,
    largest_component_abc2,
    mask_volume_ml,
    slab_thicknesses_mm,
    volumes_by_label,
)


def grid(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    positions: np.ndarray | None = None,
    shear_mm: float = 0.0,
    in_plane_deg: float = 0.0,
) -> CTVolume:
    """A CT grid with spacing (z, y, x) in mm; ``shear_mm`` moves each slice along y (tilt)."""
    sz, sy, sx = spacing
    angle = math.radians(in_plane_deg)
    row_dir = np.array([math.cos(angle), math.sin(angle), 0.0])
    col_dir = np.array([-math.sin(angle), math.cos(angle), 0.0])
    lps = np.eye(4)
    lps[:3, 0] = row_dir * sx
    lps[:3, 1] = col_dir * sy
    lps[:3, 2] = [0.0, shear_mm, sz]
    if positions is None:
        positions = np.arange(shape[0]) * sz
    return CTVolume(
        hu=np.zeros(shape, np.float32),
        affine=LPS_TO_RAS @ lps,
        source="grid",
        series_uid="grid",
        slice_positions=positions,
    )


def box(shape: tuple[int, int, int], z: slice, y: slice, x: slice) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[z, y, x] = 1
    return mask


def ellipsoid(
    volume: CTVolume, center_mm: tuple[float, float, float], radii_mm: tuple[float, float, float]
) -> np.ndarray:
    """Voxels whose centre lies inside an axis-aligned ellipsoid (x, y, z order, mm)."""
    sz, sy, sx = volume.spacing
    nz, ny, nx = volume.shape
    z, y, x = np.meshgrid(np.arange(nz) * sz, np.arange(ny) * sy, np.arange(nx) * sx, indexing="ij")
    (cx, cy, cz), (a, b, c) = center_mm, radii_mm
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2 < 1.0


SHAPE = (10, 40, 40)
SPACING = (5.0, 0.5, 0.8)
BOX = (slice(2, 7), slice(10, 30), slice(5, 20))
BOX_ML = 5 * 20 * 15 * 5.0 * 0.5 * 0.8 / 1000.0


def test_box_on_a_regular_grid_is_voxel_count_times_voxel_size():
    volume = grid(SHAPE, SPACING)
    assert mask_volume_ml(box(SHAPE, *BOX), volume) == pytest.approx(BOX_ML, rel=1e-12)
    np.testing.assert_allclose(slab_thicknesses_mm(volume), 5.0)
    # touching the first and last slice: the half-step caps keep the count exact
    whole = box(SHAPE, slice(None), *BOX[1:])
    assert mask_volume_ml(whole, volume) == pytest.approx(BOX_ML * 10 / 5, rel=1e-12)


def test_tilted_series_gives_the_same_physical_volume():
    # A 20 degree tilt shears the affine: each slice moves 5 * tan(20) mm along y.
    tilted = grid(SHAPE, SPACING, shear_mm=5.0 * math.tan(math.radians(20.0)))
    assert abs(np.linalg.det(tilted.affine)) == pytest.approx(5.0 * 0.5 * 0.8)
    assert mask_volume_ml(box(SHAPE, *BOX), tilted) == pytest.approx(BOX_ML, rel=1e-12)


def test_rotated_in_plane_axes_keep_the_pixel_area():
    rotated = grid(SHAPE, SPACING, in_plane_deg=33.0)
    assert mask_volume_ml(box(SHAPE, *BOX), rotated) == pytest.approx(BOX_ML, rel=1e-12)


def test_missing_slice_bridges_the_gap_by_linear_interpolation():
    # Slices at 0, 5, 10, 20, 25, 30 mm: the one at 15 mm is missing.
    positions = np.array([0.0, 5.0, 10.0, 20.0, 25.0, 30.0])
    volume = grid((6, 40, 40), SPACING, positions=positions)
    np.testing.assert_allclose(slab_thicknesses_mm(volume), [5, 5, 7.5, 7.5, 5, 5])
    area_mm2 = 20 * 15 * 0.5 * 0.8
    spanning = box(volume.shape, slice(None), *BOX[1:])
    # 0..30 mm plus half-step caps: 35 mm, the missing slice counted in full
    assert mask_volume_ml(spanning, volume) == pytest.approx(area_mm2 * 35 / 1000, rel=1e-12)
    ending_at_gap = box(volume.shape, slice(0, 3), *BOX[1:])
    assert mask_volume_ml(ending_at_gap, volume) == pytest.approx(
        area_mm2 * (5 + 5 + 7.5) / 1000, rel=1e-12
    )


def test_unsorted_positions_are_refused():
    volume = grid((3, 4, 4), SPACING, positions=np.array([0.0, 10.0, 5.0]))
    with pytest.raises(ValueError, match="not strictly increasing"):
        mask_volume_ml(np.ones(volume.shape), volume)


def test_volumes_by_label_per_code_and_total():
    volume = grid(SHAPE, SPACING)
    labels = np.zeros(SHAPE, np.uint8)
    labels[BOX] = 2
    labels[8, :4, :5] = 5
    result = volumes_by_label(labels, volume)
    voxel_ml = 5.0 * 0.5 * 0.8 / 1000
    assert result["intraparenchymal"] == pytest.approx(BOX_ML)
    assert result["subdural"] == pytest.approx(20 * voxel_ml)
    assert result["epidural"] == result["intraventricular"] == result["subarachnoid"] == 0.0
    assert result["total"] == pytest.approx(BOX_ML + 20 * voxel_ml)
    assert set(result) == {
        "epidural",
        "intraparenchymal",
        "intraventricular",
        "subarachnoid",
        "subdural",
        "total",
    }


@pytest.fixture(scope="module")
def tilted_and_straight(tmp_path_factory) -> tuple[CTVolume, CTVolume, np.ndarray]:
    config = PhantomConfig(size=48, num_slices=8, negative_fraction=0.0, max_bleeds=3)
    root = tmp_path_factory.mktemp("volumetry")
    volumes = []
    for name, quirks in (("straight", Quirks()), ("tilted", Quirks(gantry_tilt_deg=18.0))):
        write_dataset(root / name, studies=1, seed=5, config=config, quirks=quirks)
        (volume,), _ = read_dicom(root / name / "dicom")
        volumes.append(volume)
    study = generate_study(5_000_000, config)
    return volumes[0], volumes[1], study.hemorrhage


def test_reader_volumes_of_a_tilted_series_equal_the_straight_one(tilted_and_straight):
    straight, tilted, labels = tilted_and_straight
    assert any("gantry tilt 18.0" in w for w in tilted.warnings)
    assert labels.any()
    a, b = volumes_by_label(labels, straight), volumes_by_label(labels, tilted)
    assert a["total"] > 0
    for name in a:
        assert b[name] == pytest.approx(a[name], rel=1e-9)
    # and equal to the voxel count times the nominal voxel size
    sz, sy, sx = straight.spacing
    assert a["total"] == pytest.approx((labels > 0).sum() * sz * sy * sx / 1000, rel=1e-9)


def test_kothari_weights():
    areas = np.array([0.0, 10.0, 24.9, 25.0, 74.9, 75.0, 100.0, 80.0])
    np.testing.assert_array_equal(kothari_weights(areas), [0, 0, 0, 0.5, 0.5, 1, 1, 1])
    np.testing.assert_array_equal(kothari_weights(areas, "none"), [0, 1, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="unknown weighting"):
        kothari_weights(areas, "simpson")  # type: ignore[arg-type]


ELLIPSOID_RADII = (20.0, 12.0, 15.0)  # x, y, z semi-axes in mm
ELLIPSOID_ML = 4.0 / 3.0 * math.pi * 20.0 * 12.0 * 15.0 / 1000.0


@pytest.mark.parametrize("center", [(30.0, 30.0, 20.0), (30.3, 29.8, 20.2), (29.9, 30.2, 19.7)])
def test_abc2_of_an_ellipsoid(center):
    volume = grid((80, 120, 120), (0.5, 0.5, 0.5))
    mask = ellipsoid(volume, center, ELLIPSOID_RADII)
    assert mask_volume_ml(mask, volume) == pytest.approx(ELLIPSOID_ML, rel=0.01)
    plain = abc2_measurement(mask, volume, weighting="none")
    assert plain is not None
    # Diameters are within about one pixel diagonal of the true ones.
    assert plain.a_mm == pytest.approx(40.0, abs=0.75)
    assert plain.b_mm == pytest.approx(24.0, abs=0.75)
    assert plain.c_mm == pytest.approx(30.0, abs=0.5)
    # ABC/2 = (pi/6) ABC with pi = 3: 3/pi of the ellipsoid; measured within 4 %.
    assert plain.ml == pytest.approx(ELLIPSOID_ML * 3 / math.pi, rel=0.04)
    # Kothari weighting: C = (1 + (sqrt(3) - 1) / 2) c in the continuum limit.
    kothari = abc2(mask, volume)
    continuum = 2 * 20 * 2 * 12 * (1 + (math.sqrt(3) - 1) / 2) * 15 / 2 / 1000
    assert kothari == pytest.approx(continuum, rel=0.05)
    assert kothari / ELLIPSOID_ML == pytest.approx(0.652, abs=0.035)


def test_abc2_diameters_follow_a_rotated_bleed_and_anisotropic_pixels():
    # The ellipse's long axis runs along the grid diagonal; pixels are 0.4 x 0.8 mm.
    volume = grid((20, 200, 100), (2.0, 0.4, 0.8))
    sz, sy, sx = volume.spacing
    z, y, x = np.meshgrid(
        np.arange(20) * sz, np.arange(200) * sy, np.arange(100) * sx, indexing="ij"
    )
    u, v = (x - 40 + y - 40) / math.sqrt(2), (x - 40 - (y - 40)) / math.sqrt(2)
    mask = (u / 25.0) ** 2 + (v / 10.0) ** 2 + ((z - 19.0) / 12.0) ** 2 < 1.0
    measurement = abc2_measurement(mask, volume)
    assert measurement is not None
    assert measurement.a_mm == pytest.approx(50.0, abs=1.2)
    assert measurement.b_mm == pytest.approx(20.0, abs=1.2)
    assert measurement.largest_slice in (9, 10)


def test_empty_and_largest_component():
    volume = grid((12, 60, 60), (2.0, 1.0, 1.0))
    labels = np.zeros(volume.shape, np.uint8)
    assert abc2(labels, volume) == 0.0
    assert largest_component_abc2(labels, volume) == 0.0
    small = ellipsoid(volume, (15.0, 15.0, 10.0), (5.0, 5.0, 6.0))
    large = ellipsoid(volume, (40.0, 40.0, 12.0), (10.0, 8.0, 8.0))
    labels[small] = 2
    labels[large] = 2
    labels[ellipsoid(volume, (15.0, 45.0, 12.0), (12.0, 12.0, 10.0))] = 4  # other code
    expected = abc2(large, volume)
    assert expected > 0
    assert largest_component_abc2(labels, volume) == pytest.approx(expected)
    assert largest_component_abc2(labels, volume, code=1) == 0.0


def test_phantom_study_volumes_match_study_to_volume(tmp_path: Path):
    config = PhantomConfig(size=48, num_slices=8, negative_fraction=0.0)
    study = generate_study(3, config)
    volume = study_to_volume(study)
    result = volumes_by_label(study.hemorrhage, volume)
    assert result["total"] == pytest.approx(mask_volume_ml(study.hemorrhage > 0, volume))

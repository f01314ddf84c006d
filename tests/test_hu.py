"""HU conversion and geometry: pure functions against hand-computed values."""

import numpy as np

from ichseg.io.dicom import hu_from_stored
from ichseg.io.geometry import dicom_affine, slice_normal, tilt_degrees


def test_rescale_slope_intercept():
    stored = np.array([[0, 1024, 1064]], dtype=np.int16)
    hu, fixed = hu_from_stored(stored, slope=1.0, intercept=-1024.0, bits_stored=16)
    np.testing.assert_allclose(hu, [[-1024.0, 0.0, 40.0]])
    assert not fixed
    hu2, _ = hu_from_stored(np.array([[100]]), slope=0.5, intercept=-20.0)
    assert hu2[0, 0] == 30.0


def test_rsna_12bit_fix_restores_hu():
    true_hu = np.array([-1000, -50, 0, 40, 75, 1500, 3000], dtype=np.int32)
    buggy_stored = (true_hu % 4096).astype(np.uint16)  # how the affected RSNA files hold HU
    hu, fixed = hu_from_stored(
        buggy_stored, slope=1.0, intercept=0.0, bits_stored=12, pixel_representation=0
    )
    assert fixed
    np.testing.assert_allclose(hu, true_hu)


def test_12bit_fix_not_applied_to_normal_files():
    stored = np.array([24, 1064], dtype=np.uint16)
    hu, fixed = hu_from_stored(
        stored, slope=1.0, intercept=-1024.0, bits_stored=12, pixel_representation=0
    )
    assert not fixed
    np.testing.assert_allclose(hu, [-1000.0, 40.0])


def test_padding_and_out_of_field_become_air():
    stored = np.array([-2000, -3024, 0, 40], dtype=np.int16)
    hu, _ = hu_from_stored(stored, slope=1.0, intercept=0.0, padding_value=40)
    np.testing.assert_allclose(hu, [-1000.0, -1000.0, 0.0, -1000.0])


def test_dicom_affine_axial_lps_to_ras():
    affine = dicom_affine([-100.0, -120.0, 30.0], [1, 0, 0, 0, 1, 0], [0.5, 0.8], [0, 0, 5.0])
    # voxel (x=2, y=3, z=1): LPS = (-100 + 2*0.8, -120 + 3*0.5, 30 + 5) -> RAS flips x and y
    point = affine @ np.array([2, 3, 1, 1.0])
    np.testing.assert_allclose(point[:3], [100 - 1.6, 120 - 1.5, 35.0])


def test_tilt_angle():
    iop = [1, 0, 0, 0, 1, 0]
    np.testing.assert_allclose(slice_normal(iop), [0, 0, 1])
    step = np.array([0.0, 5.0 * np.tan(np.radians(12.0)), 5.0])
    assert abs(tilt_degrees(iop, step) - 12.0) < 1e-6
    assert tilt_degrees(iop, np.array([0, 0, 5.0])) == 0.0


def test_orientation_validation_accepts_rounding_and_refuses_damage():
    import pytest

    from ichseg.io.geometry import orthonormal_orientation

    rounded = orthonormal_orientation([0.999848, 0.017452, 0, -0.017452, 0.999848, 0.00001])
    row, column = rounded[:3], rounded[3:]
    np.testing.assert_allclose([np.linalg.norm(row), np.linalg.norm(column)], [1.0, 1.0])
    assert abs(np.dot(row, column)) < 1e-15
    np.testing.assert_allclose(rounded, [0.999848, 0.017452, 0, -0.017452, 0.999848, 0], atol=2e-5)
    for bad, reason in [
        ([1, 0, 0, 0.6, 0.8, 0.3], "not two unit vectors"),
        ([0, 0, 0, 0, 0, 0], "not two unit vectors"),
        ([1, 0, 0, 0.05, 1, 0], "not orthogonal"),
        ([1, 0, 0, 0, 1], "not six finite numbers"),
        ([1, 0, 0, 0, 1, float("nan")], "not six finite numbers"),
    ]:
        with pytest.raises(ValueError, match=reason):
            orthonormal_orientation(bad)


def test_pixel_spacing_validation():
    import pytest

    from ichseg.io.geometry import valid_pixel_spacing

    assert valid_pixel_spacing([0.5, "0.7"]) == (0.5, 0.7)
    for bad in ([0, 0], [-1, 1], [1], None, [float("inf"), 1]):
        with pytest.raises(ValueError, match="not two positive finite numbers"):
            valid_pixel_spacing(bad)


def test_nominal_step_survives_a_gap_in_a_short_series():
    from ichseg.io.dicom import nominal_step

    assert nominal_step(np.array([10.0, 5.0])) == 5.0  # median would say 7.5
    assert nominal_step(np.array([5.0, 5.0, 10.0, 5.0])) == 5.0
    assert nominal_step(np.array([5.0, 5.0, 5.0, 2.5])) == 5.0  # one short gap stays irregular
    assert abs(nominal_step(np.array([5.01, 4.99, 5.0])) - 5.0) < 1e-9

import numpy as np
import pytest

from ichseg.preprocess.windowing import (
    HALVING_UNITS_PER_LEVEL,
    STANDARD_WINDOWS,
    Window,
    halve_slices,
    halve_units,
    neighbour_index,
    nonblank_slices,
    resize_slices,
    resolve_window,
    stack_windows,
    window,
    window_units,
)


def test_window_hand_computed_brain():
    # brain 40/80 spans 0..80 HU
    hu = np.array([-1000.0, 0.0, 20.0, 40.0, 60.0, 80.0, 1000.0])
    expected = np.array([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(window(hu, 40, 80), expected, atol=1e-7)


def test_window_hand_computed_subdural_and_bone():
    # subdural 80/200 spans -20..180; bone 600/2800 spans -800..2000
    np.testing.assert_allclose(window(np.array([-20.0, 30.0, 180.0]), 80, 200), [0, 0.25, 1])
    np.testing.assert_allclose(window(np.array([-800.0, 600.0, 1300.0]), 600, 2800), [0, 0.5, 0.75])


def test_window_rejects_nonpositive_width():
    with pytest.raises(ValueError, match="width"):
        window(np.zeros(3), 40, 0)
    with pytest.raises(ValueError):
        Window(40, -1)


def test_named_windows_and_resolution():
    assert STANDARD_WINDOWS["brain"] == Window(40, 80)
    assert STANDARD_WINDOWS["subdural"] == Window(80, 200)
    assert resolve_window((30, 60)) == Window(30, 60)
    assert resolve_window({"center": 1, "width": 2}) == Window(1, 2)
    with pytest.raises(ValueError, match="valid: bone, brain"):
        resolve_window("brian")


def test_stack_windows_shape_and_values():
    hu = np.full((2, 4, 5), 40.0, dtype=np.float32)
    out = stack_windows(hu, ["brain", "subdural", "bone"])
    assert out.shape == (2, 3, 4, 5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], 0.5)
    np.testing.assert_allclose(out[:, 1], 0.3)
    np.testing.assert_allclose(out[:, 2], (40 + 800) / 2800, rtol=1e-6)


def test_neighbour_index_repeats_edges():
    assert neighbour_index(5, 2)[0].tolist() == [0, 0, 0, 1, 2]
    assert neighbour_index(5, 1)[4].tolist() == [3, 4, 4]
    assert neighbour_index(1, 1).tolist() == [[0, 0, 0]]
    assert neighbour_index(3, 0).tolist() == [[0], [1], [2]]


def test_two_and_a_half_d_channels_are_slice_major():
    from ichseg.preprocess.pipeline import gather_context

    volume = np.stack([np.full((3, 3), v, dtype=np.float32) for v in (0.0, 40.0, 80.0)])
    base = stack_windows(volume, ["brain", "subdural"])  # (3, 2, 3, 3)
    out = gather_context(base, neighbour_index(3, 1))
    assert out.shape == (3, 6, 3, 3)
    # slice 0: z-1 repeats slice 0, then slice 0, then slice 1 (each: brain, subdural)
    np.testing.assert_allclose(out[0, :, 0, 0], [0.0, 0.1, 0.0, 0.1, 0.5, 0.3])
    np.testing.assert_allclose(out[1, :, 1, 1], [0.0, 0.1, 0.5, 0.3, 1.0, 0.5])


def test_nonblank_slices_threshold():
    volume = np.full((3, 10, 10), -1000.0, dtype=np.float32)
    volume[1, :3] = 30.0  # 30 % brain-range pixels
    volume[2, :1] = 30.0  # 10 %
    assert nonblank_slices(volume, 0.2).tolist() == [False, True, False]


def test_resize_and_crop():
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert resize_slices(image[None], (8, 8)).shape == (1, 8, 8)
    labels = resize_slices(np.eye(4, dtype=np.uint8), (8, 8), order=0)
    assert set(np.unique(labels)) <= {0, 1}


@pytest.mark.parametrize(("source", "target"), [(512, 224), (128, 48), (512, 128)])
def test_shrinking_past_twofold_keeps_every_thin_line(source: int, target: int):
    # One image per column, each with a 1-pixel vertical line in that column: plain bilinear
    # sampling at this scale skips whole columns, so some lines would vanish.
    lines = np.zeros((source, 4, source), dtype=np.float32)
    lines[np.arange(source), :, np.arange(source)] = 1.0
    out = resize_slices(lines, (4, target))
    peaks = out.max(axis=(1, 2))
    assert peaks.min() > 0.5 * target / source
    # Away from the borders, where the filter is cut off, each line keeps its whole weight.
    margin = 2 * source // target
    interior = out.sum(axis=(1, 2))[margin:-margin]
    np.testing.assert_allclose(interior, 4 * target / source, rtol=0.05)


def test_twofold_shrink_is_the_two_by_two_mean():
    image = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    expected = image.reshape(3, 4, 2, 4, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(resize_slices(image, (4, 4)), expected, rtol=1e-6)


def test_twofold_shrink_equals_torch_bilinear_at_pixel_centres():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    for shape in [(3, 64, 64), (2, 8, 6), (1, 3, 40, 32)]:
        image = (rng.random(shape) * 3000 - 1000).astype(np.float32)
        height, width = shape[-2:]
        flat = torch.from_numpy(image).reshape(-1, 1, height, width)
        expected = F.interpolate(
            flat, size=(height // 2, width // 2), mode="bilinear", align_corners=False
        ).reshape(*shape[:-2], height // 2, width // 2)
        halved = resize_slices(image, (height // 2, width // 2))
        assert halved.shape == tuple(expected.shape)
        # The same weights; torch may sum the four pixels in another order (last bit).
        np.testing.assert_allclose(halved, expected.numpy(), rtol=1e-6, atol=1e-4)


def test_twofold_shrink_keeps_the_dtype_and_needs_even_sizes():
    image = np.full((2, 4, 6), 200, dtype=np.uint8)
    image[:, 0, 0] = 0
    halved = resize_slices(image, (2, 3))
    assert halved.dtype == np.uint8
    assert halved[0, 0, 0] == 150 and halved[0, 1, 2] == 200
    with pytest.raises(ValueError, match="even"):
        halve_slices(np.zeros((5, 4), dtype=np.float32))


def test_twofold_shrink_in_units_equals_block_sums_of_every_pixel():
    """halve_units against the plain 2 x 2 block sums, at the largest units too."""
    rng = np.random.default_rng(5)
    top = 255 * HALVING_UNITS_PER_LEVEL
    units = rng.integers(0, top + 1, size=(3, 2, 10, 14)).astype(np.uint16)
    units[0, 0] = top
    blocks = units.reshape(3, 2, 5, 2, 7, 2).astype(np.int64).sum(axis=(3, 5))
    expected = ((blocks + 128) >> 8).astype(np.uint8)
    assert np.array_equal(halve_units(units), expected)
    assert np.array_equal(halve_units(units[1, 1]), expected[1, 1])  # one slice, no stack axis
    assert (halve_units(units)[0, 0] == 255).all()
    # Any memory layout: Fortran order, windows moved in from the last axis, a crop.
    assert np.array_equal(halve_units(np.asfortranarray(units)), expected)
    last = np.ascontiguousarray(np.moveaxis(units, 1, -1))
    assert np.array_equal(halve_units(np.moveaxis(last, -1, 1)), expected)
    assert np.array_equal(halve_units(units[:, :, 2:8, 4:10]), expected[:, :, 1:4, 2:5])
    with pytest.raises(ValueError, match="uint16"):
        halve_units(units.astype(np.int32))


def test_twofold_shrink_in_units_is_the_rounded_block_mean():
    rng = np.random.default_rng(11)
    hu = (rng.random((2, 64, 48)) * 300 - 100).astype(np.float32)
    hu[:, :4, :4] = 3000.0  # every window saturated: the largest sum must fit in 16 bits
    hu[:, 4:8, :4] = -1000.0
    units = window_units(hu)
    assert units.dtype == np.uint16 and units.shape == (2, 3, 64, 48)
    assert units.max() == 255 * HALVING_UNITS_PER_LEVEL
    shrunk = halve_units(units)
    exact = np.rint(halve_slices(stack_windows(hu)) * 255)
    assert shrunk.dtype == np.uint8 and shrunk.shape == (2, 3, 32, 24)
    assert (shrunk[:, :, 0, 0] == 255).all() and (shrunk[:, :, 2, 0] == 0).all()
    difference = np.abs(shrunk.astype(np.float32) - exact)
    # Sums in 1/64 of a level move a mean across a rounding boundary only when it lies within
    # 1/128 of a level from it.
    assert difference.max() <= 1 and (difference > 0).mean() < 0.02
    # A block of one value keeps that value's level.
    levels = rng.integers(0, 256, size=(2, 5, 7)) / 255 * 80  # brain window: 0-80 HU
    blocks = np.repeat(np.repeat(levels, 2, axis=-2), 2, axis=-1)
    expected = np.rint(stack_windows(levels, ["brain"]) * 255).astype(np.uint8)
    assert np.array_equal(halve_units(window_units(blocks, ["brain"])), expected)
    with pytest.raises(ValueError, match="even"):
        halve_units(np.zeros((5, 4), dtype=np.uint16))

"""The slice cache's lookup tables give exactly what the preprocessor computes from HU."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ichseg.config import DataConfig, MaskingConfig
from ichseg.io.dicom_pixels import Rescale, parse_file
from ichseg.preprocess.pipeline import Preprocessor
from ichseg.volume import CTVolume

RESCALES = {
    "ct_signed": (np.int16, Rescale(1.0, -1024.0, 12, 1)),
    "rsna_12bit_fix": (np.uint16, Rescale(1.0, 0.0, 12, 0)),  # wrapped HU, intercept fixed
    "fractional_slope_padding": (np.uint16, Rescale(0.5, -1000.0, 16, 0, 0.0)),
    "already_hu_int16": (np.int16, Rescale(1.0, 0.0, 16, 1, -2000.0)),
    "eight_bit": (np.uint8, Rescale(8.0, -1024.0, 8, 0)),
}


def _stored(dtype, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    # Mostly brain-to-bone values with a few of every extreme (padding, wrap-around, limits).
    values = rng.normal(1060 if info.min == 0 else 40, 300, size=shape)
    values = np.clip(values, info.min, info.max).astype(dtype)
    values.flat[:: max(1, values.size // 7)] = info.min
    values.flat[1 :: max(1, values.size // 5)] = info.max
    return values


@pytest.mark.parametrize("name", sorted(RESCALES))
@pytest.mark.parametrize(
    ("shape", "image_size", "min_fraction"),
    [
        ((48, 48), 48, 0.0),
        ((48, 48), 48, 0.3),
        ((64, 64), 32, 0.0),
        ((64, 64), 32, 0.3),
        ((100, 90), 24, 0.1),
    ],
)
def test_stored_slice_equals_the_hu_path(name, shape, image_size, min_fraction):
    dtype, rescale = RESCALES[name]
    data = DataConfig(image_size=image_size, min_brain_fraction=min_fraction)
    preprocessor = Preprocessor(data, MaskingConfig())
    for seed in range(3):
        stored = _stored(dtype, shape, seed)
        hu = rescale.hu(stored)
        volume = CTVolume(hu[None], np.eye(4), "", "", np.zeros(1))
        expected = preprocessor(volume)
        looked_up = preprocessor.stored_slice(stored, rescale)
        assert looked_up is not None
        images, keep = looked_up
        assert images.dtype == np.uint8 and images.shape == (3, image_size, image_size)
        assert np.array_equal(images, expected.base[0])
        assert keep == bool(expected.keep[0])


@pytest.mark.parametrize(
    "windows",
    [
        ["brain"],
        ["brain", "subdural", "bone"],
        ["brain", "subdural", "bone", "stroke", {"center": 50, "width": 130}],
    ],
    ids=["one_window", "three_windows", "five_windows"],
)
def test_twofold_shrink_looks_up_every_window_count(windows):
    # Up to four windows share one 64-bit lookup; more are looked up one by one. Both must
    # give the whole-volume path's numbers.
    dtype, rescale = RESCALES["ct_signed"]
    preprocessor = Preprocessor(DataConfig(image_size=32, windows=windows), MaskingConfig())
    stored = _stored(dtype, (64, 64), seed=5)
    volume = CTVolume(rescale.hu(stored)[None], np.eye(4), "", "", np.zeros(1))
    looked_up = preprocessor.stored_slice(stored, rescale)
    assert looked_up is not None
    assert np.array_equal(looked_up[0], preprocessor(volume).base[0])


def test_tables_do_not_apply_to_wide_or_masked_input():
    preprocessor = Preprocessor(DataConfig(image_size=16), MaskingConfig())
    rescale = Rescale(1.0, -1024.0)
    assert preprocessor.stored_slice(np.zeros((16, 16), np.int32), rescale) is None
    assert preprocessor.stored_slice(np.zeros((16, 16), np.float32), rescale) is None
    assert preprocessor.stored_slice(np.zeros((16, 16), ">i2"), rescale) is None
    masked = Preprocessor(
        DataConfig(image_size=16), MaskingConfig(enabled=True), masker=lambda v: np.ones(v.shape)
    )
    assert masked.stored_slice(np.zeros((16, 16), np.int16), rescale) is None


def test_parse_keeps_stored_values_that_give_the_same_hu(phantom_dir):
    files = sorted((phantom_dir / "dicom").glob("*/*.dcm"))[:6]
    assert files
    for path in files:
        as_hu = parse_file(path).decoded
        as_stored = parse_file(path, keep_stored=True).decoded
        assert as_stored.hu is None and as_hu.stored is None
        assert np.array_equal(as_stored.rescale.hu(as_stored.stored), as_hu.hu)
        assert as_stored.shape == as_hu.shape and as_stored.fixed_12bit == as_hu.fixed_12bit


def test_twofold_shrink_of_stored_values_needs_no_torch():
    # Cache workers build 512 -> 256 slices from stored values: importing torch there costs
    # seconds per worker, more than the slices of a small folder take.
    code = """
import sys
import numpy as np
from ichseg.config import DataConfig, MaskingConfig
from ichseg.io.dicom_pixels import Rescale
from ichseg.preprocess.pipeline import Preprocessor
stored = np.arange(64 * 64, dtype=np.int16).reshape(64, 64) - 1024
images, _ = Preprocessor(DataConfig(image_size=32), MaskingConfig()).stored_slice(
    stored, Rescale(1.0, -1024.0, 12, 1))
assert images.shape == (3, 32, 32)
print("torch" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"

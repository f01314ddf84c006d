"""Real scanner files that pydicom ships (found on disk; its downloader is never called): the
readers give pydicom's HU, geometry and series order, keep scouts out, and build the
file-by-file slice cache from them.

Files: ``CT_small.dcm`` (a GE head-size CT slice with 256 header elements), ``693_J2KI.dcm``
(lossy JPEG 2000, PixelPaddingValue -2000), ``J2K_pixelrep_mismatch.dcm`` (JPEG 2000 whose
codestream signedness differs from PixelRepresentation) and the CT series of the
``dicomdirtests`` set (5-slice and 4-slice series, two localizers).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from ichseg.io.dicom import decode_slice, parse_file, read_dicom, read_header
from ichseg.io.dicom_pixels import OUT_OF_FIELD_HU
from ichseg.volume import AIR_HU

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
FIVE_SLICES = TEST_FILES / "dicomdirtests" / "98892001" / "CT5N"
GAPPED = TEST_FILES / "dicomdirtests" / "77654033" / "CT2"
SCOUTS = TEST_FILES / "dicomdirtests" / "98892001" / "CT2N"

pytestmark = pytest.mark.skipif(
    not (TEST_FILES / "CT_small.dcm").exists() or not FIVE_SLICES.is_dir(),
    reason="pydicom's CT test files are not installed",
)

SLICES = ["CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"] + [
    f"dicomdirtests/98892001/CT5N/{name}" for name in ("2062", "2392", "2693", "3023", "3353")
]


def _expected_hu(path: Path) -> np.ndarray:
    """pydicom's modality LUT, with padding and values outside the reconstruction circle as air
    (the readers' documented rule)."""
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array
    hu = apply_modality_lut(stored, ds).astype(np.float32)
    outside = hu <= OUT_OF_FIELD_HU
    if "PixelPaddingValue" in ds:
        outside |= stored == ds.PixelPaddingValue
    hu[outside] = AIR_HU
    return hu


@pytest.mark.parametrize("name", SLICES)
def test_real_slices_give_pydicoms_hu_and_geometry(name: str) -> None:
    path = TEST_FILES / name
    ds = pydicom.dcmread(path, stop_before_pixels=True)

    one = parse_file(path)
    stored = parse_file(path, keep_stored=True)

    assert (one.skipped, one.ignored, one.decode_error) == (None, None, None)
    assert one.header == read_header(path) == stored.header
    expected = _expected_hu(path)
    np.testing.assert_array_equal(one.decoded.hu, expected)
    np.testing.assert_array_equal(decode_slice(path).hu, expected)
    if stored.decoded.stored is not None:
        np.testing.assert_array_equal(stored.decoded.rescale.hu(stored.decoded.stored), expected)
    header = one.header
    assert header.sop_uid == ds.SOPInstanceUID and header.series_uid == ds.SeriesInstanceUID
    assert (header.rows, header.columns) == (ds.Rows, ds.Columns)
    np.testing.assert_allclose(header.position, [float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(header.orientation, [float(v) for v in ds.ImageOrientationPatient])
    np.testing.assert_allclose(header.pixel_spacing, [float(v) for v in ds.PixelSpacing])


def _copy(folders: list[Path], into: Path) -> Path:
    for folder in folders:
        for path in folder.iterdir():
            shutil.copy(path, into / f"{folder.name}_{path.name}")
    return into


def test_real_series_are_ordered_by_position_and_scouts_left_out(tmp_path: Path) -> None:
    folder = _copy([FIVE_SLICES, GAPPED, SCOUTS], tmp_path)

    volumes, skipped = read_dicom(folder)

    by_size = {len(volume.sop_uids): volume for volume in volumes}
    assert sorted(by_size) == [4, 5]
    five = by_size[5]
    datasets = [pydicom.dcmread(p) for p in FIVE_SLICES.iterdir()]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert five.sop_uids == [ds.SOPInstanceUID for ds in datasets]
    np.testing.assert_allclose(np.diff(five.slice_positions), 2.5, atol=1e-4)
    for k, ds in enumerate(datasets):
        np.testing.assert_array_equal(five.hu[k], _expected_hu(Path(ds.filename)))
    # The 4-slice series has a 200 mm gap after its first slice: kept, and said so.
    assert any("missing slice" in warning for warning in by_size[4].warnings)
    reasons = [reason for _, reason in skipped]
    assert len(reasons) == 2 and all("localizer" in reason for reason in reasons)


def test_file_by_file_cache_of_real_files_equals_the_series_cache(tmp_path: Path) -> None:
    """The RSNA layout built from real files (three single-slice files of three sizes and two
    syntaxes, a 5-slice and a 4-slice series, two scouts): both builds give the same arrays."""
    import json

    from conftest import dicom_cache_config

    from ichseg.engine.cache import build_slices

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in SLICES[:3]:
        shutil.copy(TEST_FILES / name, flat / name)
    _copy([FIVE_SLICES, GAPPED, SCOUTS], flat)
    subtypes = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
    lines = ["ID,Label"]
    for k, path in enumerate(sorted(flat.iterdir())):
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        bleed = k % 3 == 0
        lines.append(f"ID_{sop}_any,{int(bleed)}")
        lines += [f"ID_{sop}_{name},{int(bleed and name == 'subdural')}" for name in subtypes]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    config = dicom_cache_config(flat, labels, tmp_path / "cache")

    one = build_slices(config, progress=False, per_slice=True, shard_slices=3, workers=1)
    two = build_slices(config, progress=False, per_slice=False, workers=1)

    assert json.loads((one.folder / "done.json").read_text())["layout"] == "per-slice"
    usable_one, usable_two = one.usable(), two.usable()
    assert sorted(one.sop_uids[usable_one]) == sorted(two.sop_uids[usable_two])
    assert len(usable_two) == 3 + 5 + 4  # every axial slice; the scouts are skipped
    rows_two = {str(two.sop_uids[r]): r for r in usable_two}
    for a in usable_one:
        b = rows_two[str(one.sop_uids[a])]
        assert np.array_equal(one.images[a], two.images[b])
        assert np.array_equal(one.stack(a), two.stack(b))
        assert np.array_equal(one.labels[a], two.labels[b], equal_nan=True)
        assert one.images[a].std() > 0  # a scan, not a blank

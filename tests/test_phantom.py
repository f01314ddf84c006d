"""Tests of the synthetic head CT generator and its DICOM / NIfTI / table writers."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ichseg.errors import ConfigError
from ichseg.io.geometry import dicom_affine, tilt_degrees
from ichseg.phantom import (
    MIN_SLICE_VOXELS,
    PhantomConfig,
    PhantomStudy,
    Quirks,
    generate_study,
    study_seed,
    study_to_volume,
    study_uids,
    write_dataset,
    write_dicom_series,
    write_nifti_volumes,
)
from ichseg.phantom.writers import _stored_pixels
from ichseg.volume import HEMORRHAGE_CODES, SUBTYPES

SMALL = PhantomConfig(size=80, num_slices=10)


def forced(subtype: str, **kwargs) -> PhantomConfig:
    """A config in which every study has exactly one bleed of ``subtype``."""
    return PhantomConfig(
        size=96, num_slices=12, negative_fraction=0.0, max_bleeds=1, subtypes=(subtype,), **kwargs
    )


@pytest.fixture(scope="module")
def studies() -> list[PhantomStudy]:
    return [generate_study(seed, SMALL) for seed in range(12)]


def read_series(files: list[Path]) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(f) for f in files]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


def series_affine(datasets: list[pydicom.Dataset]) -> np.ndarray:
    first = np.array(datasets[0].ImagePositionPatient, dtype=float)
    step = np.array(datasets[1].ImagePositionPatient, dtype=float) - first
    return dicom_affine(first, datasets[0].ImageOrientationPatient, datasets[0].PixelSpacing, step)


def test_same_seed_same_study_and_different_seeds_differ() -> None:
    a, b, c = generate_study(7, SMALL), generate_study(7, SMALL), generate_study(8, SMALL)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.intracranial_mask, b.intracranial_mask)
    np.testing.assert_array_equal(a.hemorrhage, b.hemorrhage)
    assert a.bleeds == b.bleeds and a.study_id == "PH000007" and a.patient_id == b.patient_id
    assert not np.array_equal(a.hu, c.hu)
    assert not np.array_equal(a.intracranial_mask, c.intracranial_mask)


def test_arrays_have_the_documented_types(studies: list[PhantomStudy]) -> None:
    study = studies[0]
    shape = (SMALL.num_slices, SMALL.size, SMALL.size)
    assert study.hu.shape == study.intracranial_mask.shape == study.hemorrhage.shape == shape
    assert study.hu.dtype == np.float32
    assert study.intracranial_mask.dtype == np.uint8 and study.hemorrhage.dtype == np.uint8
    assert set(np.unique(study.intracranial_mask)) <= {0, 1}
    assert study.pixel_spacing == (SMALL.spacing, SMALL.spacing)
    assert study.slice_thickness == 5.0
    assert study.slice_labels().shape == (SMALL.num_slices, 6)


def test_tissue_hu_ranges(studies: list[PhantomStudy]) -> None:
    for study in studies[:4]:
        mask = study.intracranial_mask.astype(bool)
        hu = study.hu
        corner = hu[:, :6, :6]
        assert abs(float(corner.mean()) + 1000.0) < 2.0
        assert 0.7 * SMALL.noise_hu < float(corner.std()) < 1.3 * SMALL.noise_hu
        assert 0.0 <= float(np.median(hu[mask])) <= 50.0
        # The band just outside the brain on slices with a large intracranial section is bone.
        areas = mask.sum(axis=(1, 2))
        big = areas > 0.6 * areas.max()
        shell = ndimage.binary_dilation(mask, structure=np.ones((1, 5, 5), bool)) & ~mask
        skull = hu[shell & big[:, None, None]]
        assert np.mean((skull >= 400) & (skull <= 1600)) > 0.7
        # Away from the blurred edge the brain holds no bone.
        brain = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), bool))
        assert np.mean(hu[brain] > 200) < 0.002
    blood = np.concatenate([s.hu[s.hemorrhage > 0] for s in studies])
    assert blood.size > 0 and 50.0 <= float(np.median(blood)) <= 90.0


def test_hemorrhage_inside_intracranial_mask_and_negatives_exist(
    studies: list[PhantomStudy],
) -> None:
    for study in studies:
        assert not np.any((study.hemorrhage > 0) & (study.intracranial_mask == 0))
        assert set(np.unique(study.hemorrhage)) <= {0, *HEMORRHAGE_CODES}
    positive = [s.positive for s in studies]
    assert any(positive) and not all(positive)
    assert all(len(s.bleeds) <= SMALL.max_bleeds for s in studies)


@pytest.mark.parametrize("subtype", list(HEMORRHAGE_CODES.values()))
def test_every_subtype_can_be_drawn(subtype: str) -> None:
    column = SUBTYPES.index(subtype)
    hits = 0
    for seed in range(3):
        study = generate_study(seed, forced(subtype))
        labels = study.slice_labels()
        assert not np.any((study.hemorrhage > 0) & (study.intracranial_mask == 0))
        hits += bool(labels[:, column].any())
        np.testing.assert_array_equal(labels[:, 0], labels[:, 1:].max(axis=1))
        assert study.subtypes_present() in ([], [subtype])
    assert hits >= 2


@pytest.mark.parametrize("subtype", ["epidural", "subdural"])
def test_convexity_bleeds_touch_the_inner_table(subtype: str) -> None:
    code = {v: k for k, v in HEMORRHAGE_CODES.items()}[subtype]
    checked = 0
    for seed in range(4):
        study = generate_study(seed, forced(subtype))
        skull = (study.hu > 300) & (study.intracranial_mask == 0)
        components, count = ndimage.label(study.hemorrhage == code)
        for label in range(1, count + 1):
            near = ndimage.binary_dilation(components == label, iterations=2)
            assert (near & skull).any(), f"seed {seed}: {subtype} component away from skull"
            checked += 1
    assert checked >= 3


def test_intraparenchymal_has_edema_and_ventricular_blood_is_dependent() -> None:
    for seed in range(3):
        study = generate_study(seed, forced("intraparenchymal"))
        blob = study.hemorrhage == 2
        if not blob.any():
            continue
        shell = ndimage.binary_dilation(blob, structure=np.ones((1, 3, 3), bool), iterations=2)
        shell &= ~blob & (study.intracranial_mask > 0)
        assert 5.0 < float(np.median(study.hu[shell])) < 32.0
    for seed in range(3):
        study = generate_study(seed, forced("intraventricular"))
        rows = np.nonzero(study.hemorrhage == 3)[1]
        brain_rows = np.nonzero(study.intracranial_mask)[1]
        if rows.size:
            # Supine patient: blood settles posteriorly, i.e. at larger row indices.
            assert rows.mean() > brain_rows.mean()


def test_slice_labels_use_the_voxel_threshold() -> None:
    hem = np.zeros((3, 20, 20), np.uint8)
    hem[0, :3, :3] = 1  # 9 voxels: below the threshold
    hem[1, :5, :2] = 4  # 10 voxels
    hem[2, :5, :2] = 5
    hem[2, 10:15, :2] = 2
    study = PhantomStudy(
        study_id="X",
        patient_id="Y",
        seed=0,
        hu=np.zeros(hem.shape, np.float32),
        intracranial_mask=np.ones_like(hem),
        hemorrhage=hem,
        pixel_spacing=(1.0, 1.0),
        slice_thickness=5.0,
    )
    assert MIN_SLICE_VOXELS == 10
    expected = np.array([[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 1, 0], [1, 0, 1, 0, 0, 1]], np.uint8)
    np.testing.assert_array_equal(study.slice_labels(), expected)
    assert study.subtypes_present() == ["intraparenchymal", "subarachnoid", "subdural"]


def test_thin_slices_and_config_validation() -> None:
    thin = generate_study(1, PhantomConfig(size=64, num_slices=48, slice_thickness_mm=1.25))
    assert thin.hu.shape == (48, 64, 64) and thin.slice_thickness == 1.25
    assert thin.intracranial_mask.sum() > 1000
    with pytest.raises(ConfigError):
        PhantomConfig(subtypes=("chronic",))
    with pytest.raises(ConfigError):
        PhantomConfig(negative_fraction=1.5)
    with pytest.raises(ConfigError):
        Quirks(transfer_syntax="jpeg-xl")
    assert study_seed(0, 5) == 5 and study_seed(1, 0) != study_seed(0, 1)


def test_study_to_volume_geometry() -> None:
    study = generate_study(2, SMALL)
    volume = study_to_volume(study)
    assert volume.spacing == pytest.approx((5.0, SMALL.spacing, SMALL.spacing))
    np.testing.assert_allclose(np.diff(volume.slice_positions), 5.0)
    assert volume.sop_uids == list(study_uids(study).sops)
    assert volume.metadata["PatientID"] == study.patient_id
    # Column index grows to the patient's left (RAS x negative), slices grow superior.
    assert volume.affine[0, 0] < 0 and volume.affine[2, 2] > 0


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_write_dataset_layout_and_consistency(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest_path = write_dataset(out, studies=3, seed=4, config=SMALL)
    assert manifest_path == out / "manifest.csv"
    manifest = read_csv(manifest_path)
    slices = read_csv(out / "slices.csv")
    rsna = read_csv(out / "labels_rsna.csv")
    assert len(manifest) == 3
    assert list(slices[0]) == [
        "study_id",
        "patient_id",
        "series_uid",
        "sop_uid",
        "slice_index",
        "z_mm",
        *SUBTYPES,
    ]
    assert len(slices) == 3 * SMALL.num_slices and len(rsna) == 6 * len(slices)
    rsna_labels = {row["ID"]: int(row["Label"]) for row in rsna}
    for row in slices:
        for name in SUBTYPES:
            assert rsna_labels[f"ID_{row['sop_uid']}_{name}"] == int(row[name])
    assert not list(out.rglob(".tmp-*"))

    for entry in manifest:
        study = generate_study(int(entry["seed"]), SMALL)
        assert entry["study_id"] == study.study_id and entry["num_slices"] == "10"
        rows = [r for r in slices if r["study_id"] == entry["study_id"]]
        labels = np.array([[int(r[name]) for name in SUBTYPES] for r in rows], np.uint8)
        np.testing.assert_array_equal(labels, study.slice_labels())
        assert entry["positive"] == str(int(labels[:, 0].any()))
        assert entry["subtypes"] == ";".join(study.subtypes_present())

        files = sorted((out / entry["dicom_dir"]).glob("*.dcm"))
        assert len(files) == SMALL.num_slices
        datasets = read_series(files)
        first = datasets[0]
        assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert first.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert first.Modality == "CT" and first.SeriesInstanceUID == entry["series_uid"]
        assert first.PixelRepresentation == 1 and first.BitsStored == 16
        assert [ds.SOPInstanceUID for ds in datasets] == [r["sop_uid"] for r in rows]
        hu_dicom = np.stack(
            [
                ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                for ds in datasets
            ]
        )

        ct = nib.load(out / entry["ct_nifti"])
        hu_nifti = np.asarray(ct.dataobj).transpose(2, 1, 0)
        assert np.abs(hu_dicom - hu_nifti).max() <= 1.0
        assert np.abs(hu_nifti - study.hu).max() <= 0.5 + 1e-3
        np.testing.assert_allclose(ct.affine, series_affine(datasets), atol=1e-6)
        mask = np.asarray(nib.load(out / entry["mask_nifti"]).dataobj).transpose(2, 1, 0)
        hem = np.asarray(nib.load(out / entry["hemorrhage_nifti"]).dataobj).transpose(2, 1, 0)
        np.testing.assert_array_equal(mask, study.intracranial_mask)
        np.testing.assert_array_equal(hem, study.hemorrhage)
        assert mask.dtype == np.uint8 and hem.dtype == np.uint8


def test_write_dataset_is_reproducible_and_replaces_stale_files(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", studies=1, seed=9, config=SMALL, write_nifti=False)
    b = write_dataset(tmp_path / "b", studies=1, seed=9, config=SMALL, write_nifti=False)
    assert a.read_text() == b.read_text()
    assert (tmp_path / "a/slices.csv").read_bytes() == (tmp_path / "b/slices.csv").read_bytes()
    one = "dicom/PH9000000/CT0003.dcm"
    assert (tmp_path / "a" / one).read_bytes() == (tmp_path / "b" / one).read_bytes()
    assert read_csv(a)[0]["ct_nifti"] == ""

    write_dataset(tmp_path / "a", 1, 9, config=SMALL, quirks=Quirks(shuffle_names=True))
    names = {p.name for p in (tmp_path / "a/dicom/PH9000000").iterdir()}
    assert len(names) == SMALL.num_slices and not any(n.startswith("CT") for n in names)


@pytest.fixture(scope="module")
def small_study() -> PhantomStudy:
    return generate_study(11, PhantomConfig(size=64, num_slices=8))


def test_quirk_rsna_12bit(tmp_path: Path, small_study: PhantomStudy) -> None:
    files = write_dicom_series(small_study, tmp_path, Quirks(rsna_12bit=True))
    datasets = read_series(files)
    ds = datasets[0]
    assert (ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (12, 11, 0)
    assert float(ds.RescaleIntercept) == 0.0
    stored = np.stack([d.pixel_array for d in datasets]).astype(np.int32)
    assert stored.dtype == np.int32 and stored.min() >= 0 and stored.max() < 4096
    fixed = stored + 1000
    fixed[fixed >= 4096] -= 4096
    expected = np.clip(np.rint(small_study.hu), -1000, 3095)
    np.testing.assert_array_equal(fixed - 1000, expected)


def test_quirk_gantry_tilt(tmp_path: Path, small_study: PhantomStudy) -> None:
    quirks = Quirks(gantry_tilt_deg=12.0)
    datasets = read_series(write_dicom_series(small_study, tmp_path / "dcm", quirks))
    ipp = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    shift = 5.0 * np.tan(np.deg2rad(12.0))
    np.testing.assert_allclose(ipp[:, 1] - ipp[0, 1], np.arange(len(ipp)) * shift, atol=1e-3)
    np.testing.assert_allclose(np.diff(ipp[:, 2]), 5.0, atol=1e-4)
    step = ipp[1] - ipp[0]
    assert tilt_degrees(datasets[0].ImageOrientationPatient, step) == pytest.approx(12.0, 1e-3)
    paths = write_nifti_volumes(small_study, tmp_path / "nii", quirks)
    affine = nib.load(paths["ct"]).affine
    np.testing.assert_allclose(affine, series_affine(datasets), atol=1e-6)
    np.testing.assert_allclose(study_to_volume(small_study, quirks).affine, affine, atol=1e-6)


def test_quirk_shuffled_names_and_missing_slice(tmp_path: Path, small_study: PhantomStudy) -> None:
    files = write_dicom_series(small_study, tmp_path / "s", Quirks(shuffle_names=True))
    assert not any(f.name.startswith("CT") for f in files)
    datasets = read_series(files)
    numbers = [int(ds.InstanceNumber) for ds in datasets]
    assert numbers == sorted(numbers, reverse=True)

    files = write_dicom_series(small_study, tmp_path / "m", Quirks(missing_slice=True))
    assert len(files) == len(list((tmp_path / "m").iterdir())) == small_study.num_slices - 1
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in read_series(files)])
    gaps = np.diff(z)
    assert np.isclose(gaps, 10.0).sum() == 1 and np.isclose(gaps, 5.0).sum() == len(gaps) - 1


@pytest.mark.parametrize(
    ("syntax", "uid"),
    [("jpeg2000", "1.2.840.10008.1.2.4.90"), ("rle", "1.2.840.10008.1.2.5")],
)
@pytest.mark.parametrize("rsna_12bit", [False, True])
def test_quirk_transfer_syntax_round_trips(
    tmp_path: Path, small_study: PhantomStudy, syntax: str, uid: str, rsna_12bit: bool
) -> None:
    quirks = Quirks(transfer_syntax=syntax, rsna_12bit=rsna_12bit)
    files = write_dicom_series(small_study, tmp_path, quirks)
    uids = study_uids(small_study)
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == uid
        assert ds.SOPInstanceUID == uids.sops[k]
        expected = _stored_pixels(small_study.hu[k], quirks)
        np.testing.assert_array_equal(ds.pixel_array, expected)

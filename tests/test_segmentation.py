"""Intracranial segmentation: classical method, U-Net, masking step, metrics and segment_folder."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from ichseg.errors import ConfigError, InputError
from ichseg.metrics.overlap import mask_metrics
from ichseg.phantom import PhantomConfig, generate_study, study_to_volume, write_dataset
from ichseg.segmentation import (
    MaskingConfig,
    Segmenter,
    SegmenterConfig,
    apply_mask,
    build_unet,
    classical_intracranial_mask,
    crop_to_mask,
    dilate_mask,
    load_segmenter,
    make_masker,
    mask_bbox,
    segment_folder,
    train_segmenter,
)

torch.set_num_threads(2)

EXTRA_AXIAL = (1, 5)  # epidural, subdural


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def spacing_of(study) -> tuple[float, float, float]:
    return (float(study.slice_thickness), *map(float, study.pixel_spacing))


@pytest.fixture(scope="module")
def studies():
    config = PhantomConfig(size=80, num_slices=10, negative_fraction=0.0, max_bleeds=4)
    return [generate_study(seed, config) for seed in (11, 12, 13)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    config = PhantomConfig(size=64, num_slices=8)
    train = [generate_study(seed, config) for seed in (21, 22, 23)]
    run_dir = tmp_path_factory.mktemp("segmenter_run")
    seg_config = SegmenterConfig(
        image_size=32,
        channels=(8, 16, 32),
        strides=(2, 2),
        num_res_units=1,
        epochs=2,
        batch_size=8,
        val_fraction=0.34,
    )
    best = train_segmenter(train, seg_config, run_dir, progress=False)
    return best, seg_config


# --- classical -------------------------------------------------------------------------------


def test_classical_matches_phantom_and_keeps_extra_axial_blood(studies):
    inside = total = 0
    for study in studies:
        mask = classical_intracranial_mask(study.hu, spacing_of(study))
        assert mask.dtype == np.uint8 and mask.shape == study.hu.shape
        assert dice(mask, study.intracranial_mask) >= 0.95
        blood = np.isin(study.hemorrhage, EXTRA_AXIAL)
        inside += int((mask.astype(bool) & blood).sum())
        total += int(blood.sum())
    assert total > 0
    assert inside / total >= 0.99


def test_classical_excludes_headrest_and_table():
    study = generate_study(5, PhantomConfig(size=80, num_slices=8, field_of_view_mm=320.0))
    hu = study.hu.copy()
    head_rows = np.flatnonzero((hu > -300).any(axis=(0, 2)))
    bottom = int(head_rows.max())
    # A bone-dense table below the head and a bone-dense cradle around its back, both separated
    # from the scalp by air.
    table = np.zeros(hu.shape, dtype=bool)
    table[:, bottom + 3 : bottom + 6, 5:75] = True
    rows, cols = np.mgrid[0:80, 0:80]
    centre_y, centre_x = np.argwhere(study.intracranial_mask.any(axis=0)).mean(axis=0)
    radius = np.hypot(rows - centre_y, cols - centre_x)
    outer = float(radius[(hu > -300).any(axis=0)].max())
    cradle = (radius > outer + 2) & (radius < outer + 4) & (rows > centre_y)
    table |= cradle[None]
    assert bottom + 6 < hu.shape[1] and cradle.sum() > 20
    hu[table] = 900.0
    mask = classical_intracranial_mask(hu, spacing_of(study)).astype(bool)
    assert not (mask & table).any()
    assert not mask[:, bottom + 1 :, :].any()
    assert dice(mask, study.intracranial_mask) >= 0.95


def test_classical_slices_above_vertex_are_empty(studies):
    study = studies[0]
    hu = study.hu
    air = np.full((1, *hu.shape[1:]), -1000.0, dtype=np.float32)
    # A scalp-only cap (soft tissue, no bone) and a solid bone cap: neither encloses anything.
    rows, cols = np.mgrid[0 : hu.shape[1], 0 : hu.shape[2]]
    disk = np.hypot(rows - hu.shape[1] / 2, cols - hu.shape[2] / 2) < hu.shape[1] / 5
    scalp_cap = np.where(disk, 40.0, -1000.0).astype(np.float32)[None]
    bone_cap = np.where(disk, 1200.0, -1000.0).astype(np.float32)[None]
    volume = np.concatenate([hu, bone_cap, scalp_cap, air, air])
    mask = classical_intracranial_mask(volume, spacing_of(study))
    assert not mask[-4:].any()
    truth = study.intracranial_mask
    assert dice(mask[: hu.shape[0]], truth) >= 0.95
    empty_truth = ~truth.reshape(truth.shape[0], -1).any(axis=1)
    assert not mask[: hu.shape[0]][empty_truth].any()


def test_classical_bridges_a_craniectomy(studies):
    for study in studies[:2]:
        hu = study.hu.copy()
        size = hu.shape[1]
        centre_y, centre_x = np.argwhere(study.intracranial_mask.any(axis=0)).mean(axis=0)
        rows, cols = np.mgrid[0:size, 0:size]
        angle = np.degrees(np.arctan2(rows - centre_y, cols - centre_x))
        sector = (angle > -150) & (angle < -60)
        slab = np.arange(hu.shape[0])[:, None, None] >= hu.shape[0] // 2
        hu[(hu > 300) & sector[None] & slab] = 0.0
        mask = classical_intracranial_mask(hu, spacing_of(study))
        assert dice(mask, study.intracranial_mask) >= 0.9


def test_classical_edge_cases():
    assert not classical_intracranial_mask(np.full((3, 32, 32), -1000.0)).any()
    assert not classical_intracranial_mask(np.full((3, 32, 32), 40.0)).any()
    with pytest.raises(ValueError):
        classical_intracranial_mask(np.zeros((32, 32)))
    with pytest.raises(ValueError):
        classical_intracranial_mask(np.zeros((2, 32, 32)), spacing=(1.0, 0.0, 1.0))


@pytest.mark.slow
def test_classical_speed_full_size():
    study = generate_study(3, PhantomConfig(size=256, num_slices=32))
    start = time.perf_counter()
    classical_intracranial_mask(study.hu, spacing_of(study))
    assert time.perf_counter() - start < 2.0


# --- U-Net -----------------------------------------------------------------------------------


def test_train_segmenter_writes_run_and_round_trips(tiny_checkpoint):
    best, seg_config = tiny_checkpoint
    run_dir = best.parent
    # The same run files as a classifier run.
    for name in (
        "best.pt",
        "last.pt",
        "config.yaml",
        "splits.json",
        "metrics.jsonl",
        "metrics.csv",
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").stat().st_size > 0
    assert not list(run_dir.glob(".*.tmp"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0.0 <= r["val_dice"] <= 1.0 for r in records)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert SegmenterConfig.model_validate(saved["model"]) == seg_config
    assert "data" in saved
    splits = json.loads((run_dir / "splits.json").read_text())
    assert splits["val"] and not set(splits["val"]) & set(splits["train"])
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["kind"] == "segmenter"
    assert {"state_dict", "config", "epoch", "monitor"} <= set(checkpoint)

    segmenter = load_segmenter(best)
    assert segmenter.config == seg_config
    hu = generate_study(30, PhantomConfig(size=48, num_slices=5)).hu[:, :, :40]
    mask = segmenter.predict(hu)
    assert mask.shape == hu.shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    prob = segmenter.predict_proba(hu, amp=False)
    assert prob.shape == (2, *hu.shape) and prob.dtype == np.float32


def test_train_accepts_pairs_without_validation(tmp_path):
    study = generate_study(40, PhantomConfig(size=48, num_slices=4))
    volume = study_to_volume(study)
    pseudo = classical_intracranial_mask(volume.hu, volume.spacing)
    assert dice(pseudo, study.intracranial_mask) >= 0.9
    config = SegmenterConfig(
        image_size=32, channels=(8, 16), strides=(2,), epochs=2, batch_size=4, val_fraction=0.0
    )
    pairs = [(volume.hu, pseudo), (study.hu, study.intracranial_mask)]
    best = train_segmenter(pairs, config, tmp_path, progress=False)
    # Nothing held out: the last epoch is kept.
    assert torch.load(best, weights_only=True)["epoch"] == 1


def test_segmenter_resumes_like_a_classifier(tmp_path):
    studies = [generate_study(seed, PhantomConfig(size=48, num_slices=4)) for seed in (1, 2, 3)]
    config = SegmenterConfig(
        image_size=32, channels=(8, 16), strides=(2,), epochs=3, batch_size=4, amp=False
    )
    from ichseg.engine.checkpoint import load_checkpoint
    from ichseg.engine.loop import state_digest
    from ichseg.segmentation import training

    full = train_segmenter(studies, config, tmp_path / "full", progress=False)
    validate = training.SegmenterTask.validate
    calls = []

    def interrupted(self, model, device):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second epoch
        return validate(self, model, device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.SegmenterTask, "validate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_segmenter(studies, config, tmp_path / "cut", progress=False)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 0
    train_segmenter(studies, config, tmp_path / "cut", resume=True, progress=False)
    a = load_checkpoint(full.parent / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert state_digest(a["state_dict"]) == state_digest(b["state_dict"])
    # A changed config is refused on resume rather than mixed into the run.
    longer = config.model_copy(update={"epochs": 4})
    with pytest.raises(ConfigError, match="cannot resume.*epochs"):
        train_segmenter(studies, longer, tmp_path / "cut", resume=True, progress=False)


def test_hemorrhage_target_trains_a_label_map_model(tmp_path):
    config = PhantomConfig(size=48, num_slices=6, negative_fraction=0.0)
    studies = [generate_study(seed, config) for seed in (5, 6, 7)]
    seg = SegmenterConfig(
        target="hemorrhage", image_size=32, channels=(8, 16), strides=(2,), epochs=1, batch_size=8
    )
    best = train_segmenter(studies, seg, tmp_path, progress=False)
    segmenter = load_segmenter(best)
    assert segmenter.config.num_classes == 6
    labels = segmenter.predict(studies[0].hu)
    assert labels.shape == studies[0].hu.shape and labels.max() <= 5


def test_context_channels_predict_shape():
    config = SegmenterConfig(image_size=32, channels=(8, 16), strides=(2,), context=1)
    assert config.in_channels == 9
    segmenter = Segmenter(build_unet(config), config)
    hu = np.full((3, 40, 36), 30.0, dtype=np.float32)
    assert segmenter.predict(hu).shape == hu.shape


def test_segmenter_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="epochz"):
        SegmenterConfig(epochz=3)
    with pytest.raises(ValidationError, match="unknown window"):
        SegmenterConfig(windows=["brian"])
    with pytest.raises(ValidationError, match="strides"):
        SegmenterConfig(channels=(8, 16, 32), strides=(2,))
    config = SegmenterConfig(windows=["brain", {"center": 50, "width": 100}])
    assert config.in_channels == 2


# --- masking ---------------------------------------------------------------------------------


def test_apply_mask_air_and_min():
    hu = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    mask = np.zeros((2, 4, 5), dtype=np.uint8)
    mask[0, 1:3, 1:4] = 1
    out = apply_mask(hu, mask, mode="air")
    assert out.shape == hu.shape and out.dtype == hu.dtype
    assert np.array_equal(out[mask > 0], hu[mask > 0])
    assert (out[mask == 0] == -1000.0).all()
    assert hu[0, 0, 0] == 0.0  # input untouched

    channels = np.ones((2, 3, 4, 5), dtype=np.float32)
    out = apply_mask(channels, mask, mode="min")
    assert (out[:, :, mask[0] == 0][0] == 0.0).all()
    assert (out[0][:, mask[0] > 0] == 1.0).all()
    assert (out[1] == 0.0).all()  # empty mask slice
    with pytest.raises(ValueError):
        apply_mask(hu, mask, mode="black")


def test_apply_mask_dilation_in_mm():
    image = np.ones((9, 9), dtype=np.float32)
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    # 1 mm with 0.5 mm pixels: a disk of radius 2 pixels (13 pixels).
    out = apply_mask(image, mask, "min", dilation_mm=1.0, spacing=(0.5, 0.5))
    assert int(out.sum()) == 13
    # Anisotropic pixels: 1 pixel along y (1 mm), 2 pixels along x (0.5 mm).
    grown = dilate_mask(mask, 1.0, (1.0, 0.5))
    assert grown[3, 4] and grown[5, 4] and not grown[2, 4]
    assert grown[4, 2] and grown[4, 6] and not grown[4, 1]
    assert not dilate_mask(np.zeros((2, 5, 5)), 3.0, (1.0, 1.0)).any()


def test_crop_to_mask_bbox_with_margin():
    images = np.arange(3 * 40 * 50, dtype=np.float32).reshape(3, 40, 50)
    mask = np.zeros((3, 40, 50), dtype=bool)
    mask[0, 10:20, 20:25] = True
    mask[2, 12:15, 25:30] = True  # one box over all slices
    cropped, bbox = crop_to_mask(images, mask, margin_mm=2.0, spacing=(1.0, 0.5))
    assert bbox == (8, 22, 16, 34)
    assert cropped.shape == (3, 14, 18)
    assert np.array_equal(cropped, images[:, 8:22, 16:34])
    # Clipped at the image border, and the whole image for an empty mask.
    assert mask_bbox(mask, margin_mm=100.0) == (0, 40, 0, 50)
    assert crop_to_mask(images, np.zeros((40, 50)), 5.0)[1] == (0, 40, 0, 50)
    channels = np.zeros((3, 2, 40, 50), dtype=np.float32)
    assert crop_to_mask(channels, mask, 0.0)[0].shape == (3, 2, 10, 10)


def test_head_bbox_leaves_out_the_table_and_spans_every_slice():
    from ichseg.segmentation.masking import head_bbox

    hu = np.full((3, 60, 80), -1000.0, dtype=np.float32)
    hu[0, 10:30, 20:50] = 40.0  # the head, wider on the middle slice
    hu[1, 8:40, 15:55] = 40.0
    hu[1, 50:53, 0:80] = 100.0  # the table: more tissue in a slice, separated by air
    hu[2, 12:20, 30:35] = 1000.0
    hu[2, 54:56, :] = -400.0  # a foam head rest stays below the tissue threshold
    assert head_bbox(hu, margin_mm=2.0, spacing=(1.0, 0.5)) == (6, 42, 11, 59)
    assert head_bbox(hu, margin_mm=0.0) == (8, 40, 15, 55)
    # A strap touching the table in one slice is a thin bridge: opened, it joins nothing.
    hu[2, 40:50, 30] = 50.0
    assert head_bbox(hu, margin_mm=0.0) == (8, 41, 15, 55)  # the bridge's root stays
    # A head smaller than the opening keeps its box.
    small = np.full((1, 30, 30), -1000.0, dtype=np.float32)
    small[0, 10:14, 12:15] = 40.0
    assert head_bbox(small, margin_mm=0.0) == (10, 14, 12, 15)
    # A single slice, and a volume with no tissue at all (the whole image).
    assert head_bbox(hu[0], margin_mm=0.0) == (10, 30, 20, 50)
    assert head_bbox(np.full((2, 20, 30), -1000.0), margin_mm=5.0) == (0, 20, 0, 30)


def test_head_crop_cuts_every_slice_to_the_head_before_resizing():
    from types import SimpleNamespace

    from ichseg.config import DataConfig, MaskingConfig
    from ichseg.inference.gradcam import input_crop_box
    from ichseg.preprocess.pipeline import Preprocessor
    from ichseg.segmentation.masking import head_bbox

    volume = study_to_volume(generate_study(11, PhantomConfig(size=64, num_slices=6)))
    spacing = volume.spacing[1:]
    cropping = Preprocessor(DataConfig(image_size=32, head_crop=True), MaskingConfig())
    box = head_bbox(volume.hu, 5.0, spacing)
    assert box != (0, 64, 0, 64)  # the phantom has air around the head to cut away
    assert cropping.crop_box(volume) == box
    assert input_crop_box(SimpleNamespace(preprocessor=cropping), volume, None) == box
    # The same arrays as an uncropped preprocessor given the cropped slices.
    y0, y1, x0, x1 = box
    cut = replace(volume, hu=np.ascontiguousarray(volume.hu[:, y0:y1, x0:x1]))
    plain = Preprocessor(DataConfig(image_size=32), MaskingConfig())
    np.testing.assert_array_equal(cropping(volume).base, plain(cut).base)
    assert plain.crop_box(volume) is None
    # A whole-series step: no slice-by-slice lookup, its own cache key.
    assert cropping.whole_volume and not plain.whole_volume
    assert cropping.stored_slice(np.zeros((32, 32), np.int16), None) is None
    assert cropping.describe() != plain.describe() and "head_crop" not in plain.describe()
    # A mask crop is the tighter box and wins over the head crop.
    masking = MaskingConfig(enabled=True, crop=True, dilation_mm=0.0, margin_mm=0.0)
    mask = volume.hu > 20
    both = Preprocessor(DataConfig(image_size=32, head_crop=True), masking, lambda v: mask)
    assert both.crop_box(volume, mask.astype(np.uint8)) == mask_bbox(mask)
    assert "head_crop" not in both.describe()  # the head crop does not apply: not in the key


def test_head_crop_is_refused_for_picture_folders():
    from ichseg.config import DataConfig

    with pytest.raises(ValidationError, match="head_crop needs CT volumes"):
        DataConfig(source="images", head_crop=True)


def test_masking_config_rejects_unknown_keys():
    with pytest.raises(ValidationError, match="dilaton_mm"):
        MaskingConfig(dilaton_mm=1.0)


def test_make_masker(studies, tiny_checkpoint):
    volume = study_to_volume(studies[0])
    masker = make_masker(MaskingConfig(enabled=True, method="classical"))
    assert dice(masker(volume), studies[0].intracranial_mask) >= 0.95
    unet = make_masker(MaskingConfig(method="unet", checkpoint=tiny_checkpoint[0]))
    assert unet(volume).shape == volume.shape
    with pytest.raises(ConfigError):
        make_masker(MaskingConfig(method="unet"))


# --- metrics ---------------------------------------------------------------------------------


def test_mask_metrics():
    a = np.zeros((12, 12, 16), dtype=bool)
    a[1:11, 1:11, 1:11] = True
    b = np.roll(a, 2, axis=2)
    assert mask_metrics(a, a) == {"dice": 1.0, "hd95_mm": 0.0}
    shifted = mask_metrics(a, b, spacing=(1.0, 1.0, 0.5))
    assert shifted["dice"] == pytest.approx(0.8)
    assert 0.0 < shifted["hd95_mm"] <= 1.0 + 1e-6
    empty = np.zeros_like(a)
    assert mask_metrics(empty, empty) == {"dice": 1.0, "hd95_mm": 0.0}
    assert mask_metrics(a, empty) == {"dice": 0.0, "hd95_mm": None}
    with pytest.raises(ValueError):
        mask_metrics(a, a[:-1])


# --- segment_folder --------------------------------------------------------------------------


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom_data")
    write_dataset(root, studies=2, seed=5, config=PhantomConfig(size=64, num_slices=8))
    return root


def read_summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_segment_dicom_folder(dataset, tmp_path):
    before = tree_hashes(dataset)
    out = tmp_path / "out"
    result = segment_folder(dataset / "dicom", out, progress=False)
    assert tree_hashes(dataset) == before
    assert result.num_ok == 2 and result.num_error == 0
    rows = read_summary(out)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    assert json.loads((out / "summary.json").read_text())[0]["name"] == rows[0]["name"]
    for row in rows:
        image = nib.load(out / row["image"])
        mask = nib.load(out / row["mask"])
        assert (out / row["preview"]).stat().st_size > 0
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        assert np.asarray(mask.dataobj).dtype == np.uint8
        # The phantom's own NIfTI mask lies on the same grid: compare voxel for voxel.
        study_id = Path(row["input"]).name
        truth = nib.load(dataset / "nifti" / f"{study_id}_mask.nii.gz")
        assert np.allclose(truth.affine, mask.affine, atol=1e-3)
        assert dice(np.asarray(mask.dataobj), np.asarray(truth.dataobj)) >= 0.9
        voxel_ml = float(np.prod(mask.header.get_zooms()[:3])) / 1000.0
        expected_ml = np.asarray(mask.dataobj).sum() * voxel_ml
        assert float(row["intracranial_ml"]) == pytest.approx(expected_ml, rel=1e-3)
        assert int(row["num_slices"]) == 8
    assert len({r["name"] for r in rows}) == 2
    assert not list(out.glob(".*"))


def test_segment_nifti_file_with_reference(dataset, tmp_path):
    ct = sorted((dataset / "nifti").glob("*_ct.nii.gz"))[0]
    truth_path = ct.with_name(ct.name.replace("_ct", "_mask"))
    reference = tmp_path / "ref"
    reference.mkdir()
    shutil.copy(truth_path, reference / ct.name)  # matched by the input's file name
    out = tmp_path / "out"
    result = segment_folder(ct, out, reference_dir=reference, progress=False)
    row = result.rows[0]
    assert row["status"] == "ok" and row["name"] == ct.name[: -len(".nii.gz")]
    source, mask = nib.load(ct), nib.load(out / row["mask"])
    assert mask.shape == source.shape
    assert np.allclose(mask.affine, source.affine)
    truth = np.asarray(nib.load(truth_path).dataobj)
    assert dice(np.asarray(mask.dataobj), truth) >= 0.9
    assert row["dice"] == pytest.approx(dice(np.asarray(mask.dataobj), truth), abs=1e-4)
    assert row["hd95_mm"] is not None


def test_segment_folder_error_rows_and_refusals(dataset, tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    for ct in sorted((dataset / "nifti").glob("*_ct.nii.gz")):
        shutil.copy(ct, folder / ct.name)
    (folder / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    before = tree_hashes(folder)
    out = tmp_path / "out"
    result = segment_folder(folder, out, method="unet", checkpoint=tiny_checkpoint[0])
    assert tree_hashes(folder) == before
    statuses = {Path(r["input"]).name: r["status"] for r in result.rows}
    assert statuses.pop("broken.nii.gz") == "error"
    assert set(statuses.values()) == {"ok"}
    error_row = next(r for r in read_summary(out) if r["status"] == "error")
    assert error_row["error"]

    with pytest.raises(InputError, match="inside the input"):
        segment_folder(folder, folder / "masks", progress=False)
    with pytest.raises(InputError, match="inside the input"):
        segment_folder(folder, folder, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError):
        segment_folder(empty, tmp_path / "out_empty", progress=False)
    junk_only = tmp_path / "junk"
    junk_only.mkdir()
    (junk_only / "scan.nii").write_bytes(b"garbage")
    with pytest.raises(InputError, match="no volume could be segmented"):
        segment_folder(junk_only, tmp_path / "out_junk", progress=False)
    with pytest.raises(InputError):
        segment_folder(folder, tmp_path / "out_unet", method="unet", checkpoint=None)

"""Hemorrhage segmenter: training machinery, post-processing, evaluation and volumes in ml.

The fast tests use a tiny U-Net fitted to one phantom study (a few seconds), which segments
that study well enough to give non-empty label maps; the slow test trains the packaged recipe
and checks the accuracy targets on phantom studies from seeds it never saw.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import HEMORRHAGE_SEED, HEMORRHAGE_STUDY
from conftest import tiny_hemorrhage_config as tiny_config
from pydantic import ValidationError
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.errors import InputError
from ichseg.io.geometry import LPS_TO_RAS
from ichseg.phantom import PhantomConfig, generate_study, study_to_volume, write_dataset
from ichseg.segmentation.evaluation import (
    EvaluationCase,
    bland_altman,
    case_measurements,
    evaluate_hemorrhage_segmenter,
    summarize,
)
from ichseg.segmentation.hemorrhage import VOLUME_COLUMNS, hemorrhage_volumes
from ichseg.segmentation.training import SegmentationCase, SegmenterTask, train_segmenter
from ichseg.segmentation.unet import SegmenterConfig, load_segmenter, postprocess_label_map
from ichseg.volume import CTVolume
from ichseg.volumetry import largest_component_abc2, volumes_by_label

runner = CliRunner()

STUDY_CONFIG = PhantomConfig(**HEMORRHAGE_STUDY)
STUDY_SEED = HEMORRHAGE_SEED


def grid_volume(shape=(6, 20, 20), spacing=(5.0, 1.0, 1.0)) -> CTVolume:
    sz, sy, sx = spacing
    return CTVolume(
        hu=np.zeros(shape, np.float32),
        affine=LPS_TO_RAS @ np.diag([sx, sy, sz, 1.0]),
        source="grid",
        series_uid="grid",
        slice_positions=np.arange(shape[0]) * sz,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- training machinery ----------------------------------------------------------------------


def test_foreground_oversampling_draws_the_configured_share():
    target = np.zeros((10, 16, 16), np.uint8)
    target[7, 4:8, 4:8] = 2  # one slice of ten holds blood
    case = SegmentationCase(np.zeros((10, 16, 16), np.float32), target, "p0")
    config = SegmenterConfig(
        target="hemorrhage",
        image_size=16,
        channels=(4, 8),
        strides=(2,),
        samples_per_epoch=200,
        foreground_fraction=0.6,
        batch_size=32,
    )
    splits = {"train": np.array([0]), "val": np.array([], int)}
    task = SegmenterTask([case], config, splits, {})
    assert list(task.foreground_rows) == [7]
    task.start_epoch(3)
    order = task.epoch_order()
    assert order.shape == (200,)
    # 120 drawn from the blood slice, and about a tenth of the other 80.
    assert 120 <= int((order == 7).sum()) <= 140
    task.start_epoch(3)
    np.testing.assert_array_equal(task.epoch_order(), order)  # reproducible per epoch
    assert task.num_batches() == math.ceil(200 / 32)
    plain = SegmenterTask(
        [case], config.model_copy(update={"foreground_fraction": None}), splits, {}
    )
    plain.start_epoch(3)
    assert (plain.epoch_order() == 7).sum() < 60


def test_oversampling_balances_the_subtypes():
    target = np.zeros((12, 16, 16), np.uint8)
    target[0:6, 2:6, 2:6] = 5  # six slices of subdural blood
    target[9, 8:10, 8:10] = 1  # one slice of epidural blood
    case = SegmentationCase(np.zeros((12, 16, 16), np.float32), target, "p0")
    config = SegmenterConfig(
        target="hemorrhage",
        image_size=16,
        channels=(4, 8),
        strides=(2,),
        samples_per_epoch=1000,
        foreground_fraction=1.0,
    )
    task = SegmenterTask([case], config, {"train": np.array([0]), "val": np.array([], int)}, {})
    task.start_epoch(0)
    order = task.epoch_order()
    # Each subtype gets about half of the draws, however few slices hold it.
    assert 420 <= int((order == 9).sum()) <= 580
    assert set(order) <= {0, 1, 2, 3, 4, 5, 9}


def test_patches_centre_on_the_drawn_subtype():
    target = np.zeros((4, 64, 64), np.uint8)
    target[1, 50:54, 6:10] = 3  # a small bleed near a corner
    hu = np.zeros((4, 64, 64), np.float32)
    case = SegmentationCase(hu, target, "p0")
    config = SegmenterConfig(
        target="hemorrhage",
        image_size=64,
        patch_size=32,
        channels=(4, 8),
        strides=(2,),
        samples_per_epoch=24,
        foreground_fraction=0.5,
        batch_size=24,
        augment=False,
    )
    task = SegmenterTask([case], config, {"train": np.array([0]), "val": np.array([], int)}, {})
    task.start_epoch(0)
    rows, focus = task.epoch_plan()
    assert int((focus == 3).sum()) == 12 and set(rows[focus == 3]) == {1}
    task.start_epoch(0)  # the batches follow the same plan
    ((images, targets),) = list(task.train_batches())
    assert images.shape == (24, 3, 32, 32) and targets.shape == (24, 1, 32, 32)
    # Every patch drawn for the bleed holds all of it (jitter is at most a quarter patch).
    drawn = targets[torch_from(focus == 3)]
    assert all(int((t == 3).sum()) == 16 for t in drawn)
    with pytest.raises(ValidationError, match="patch_size"):
        SegmenterConfig(image_size=64, patch_size=96)


def torch_from(array: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(array))


def test_validation_every_nth_epoch_and_the_last(tmp_path):
    studies = [generate_study(seed, PhantomConfig(size=48, num_slices=4)) for seed in (5, 6, 7)]
    config = tiny_config(
        image_size=32, channels=(8, 16), strides=(2,), epochs=3, val_every=2, val_fraction=0.3
    )
    train_segmenter(studies, config, tmp_path, progress=False)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validated = [not math.isnan(r["val_dice"]) for r in history]
    assert validated == [False, True, True]


def test_class_weights_must_fit_the_classes():
    SegmenterConfig(target="hemorrhage", class_weights=[0.5, 1, 1, 1, 1, 1])
    with pytest.raises(ValidationError, match="6 entries"):
        SegmenterConfig(target="hemorrhage", class_weights=[1.0, 2.0])
    with pytest.raises(ValidationError, match="positive"):
        SegmenterConfig(target="intracranial", class_weights=[1.0, 0.0])


def test_weighted_batch_dice_trains(tmp_path):
    studies = [generate_study(seed, PhantomConfig(size=48, num_slices=4)) for seed in (5, 6)]
    config = tiny_config(
        image_size=32,
        channels=(8, 16),
        strides=(2,),
        epochs=1,
        class_weights=[0.2, 1, 1, 1, 1, 1],
        val_fraction=0.5,
    )
    best = train_segmenter(studies, config, tmp_path, progress=False)
    assert load_segmenter(best).config.class_weights == [0.2, 1, 1, 1, 1, 1]
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(history[0]["train_loss"])


# --- post-processing ---------------------------------------------------------------------------


def test_postprocess_label_map_keeps_blood_inside_and_drops_small_bleeds():
    volume = grid_volume()
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:4, 2:8, 2:8] = 2  # 108 voxels of 5 mm3: 0.54 ml
    labels[2, 15, 15] = 1  # one voxel: 0.005 ml
    labels[1:3, 2:8, 8:10] = 3  # touches the first: one component with it
    mask = np.ones(volume.shape, np.uint8)
    mask[:, :, 9:] = 0

    kept = postprocess_label_map(labels, volume, mask, min_component_ml=0.01)
    assert kept[2, 15, 15] == 0  # outside the mask and tiny
    assert (kept[1:3, 2:8, 8] == 3).all() and not kept[:, :, 9].any()
    assert (kept[1:4, 2:8, 2:8] == 2).all()
    assert labels[2, 15, 15] == 1  # the input is not modified

    inside = postprocess_label_map(labels, volume, None, min_component_ml=0.006)
    assert inside[2, 15, 15] == 0 and inside[1, 2, 9] == 3
    assert postprocess_label_map(labels, volume, None, 0.004)[2, 15, 15] == 1
    # Sizes are in ml on the true geometry: thicker slabs, larger bleeds.
    thick = grid_volume(spacing=(10.0, 1.0, 1.0))
    assert postprocess_label_map(labels, thick, None, 0.008)[2, 15, 15] == 1
    with pytest.raises(ValueError, match="shape"):
        postprocess_label_map(labels[1:], volume)


def test_component_vote_gives_each_bleed_one_subtype():
    volume = grid_volume()
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:4, 2:8, 2:8] = 2
    labels[2, 2:4, 2:8] = 1  # a minority of another subtype inside the same bleed
    labels[1:3, 12:14, 12:16] = 3  # a separate bleed keeps its own subtype
    voted = postprocess_label_map(labels, volume, component_vote=True)
    assert (voted[1:4, 2:8, 2:8] == 2).all() and (voted[1:3, 12:14, 12:16] == 3).all()
    assert (voted > 0).sum() == (labels > 0).sum()
    np.testing.assert_array_equal(postprocess_label_map(labels, volume), labels)


def test_extra_axial_bleeds_are_labelled_by_their_flatness():
    volume = grid_volume(shape=(24, 80, 80), spacing=(2.0, 1.0, 1.0))
    z, y, x = np.meshgrid(np.arange(24) * 2.0, np.arange(80.0), np.arange(80.0), indexing="ij")
    labels = np.zeros(volume.shape, np.uint8)
    # A thick lens labelled subdural: 14 mm thick, 30 mm across (V / T^3 ~ 2).
    lens = ((z - 24) / 7) ** 2 + ((y - 20) / 15) ** 2 + ((x - 20) / 15) ** 2 < 1
    labels[lens] = 5
    # A thin sheet labelled epidural: 4 mm thick, 70 mm x 40 mm (V / T^3 ~ 35).
    sheet = (np.abs(z - 10) <= 2) & (np.abs(y - 60) < 20) & (np.abs(x - 40) < 35)
    labels[sheet] = 1
    labels[2:6, 30:40, 50:60] = 2  # intraparenchymal: never touched
    relabelled = postprocess_label_map(labels, volume, extra_axial_shape=9.0)
    assert (relabelled[lens] == 1).all() and (relabelled[sheet] == 5).all()
    np.testing.assert_array_equal(relabelled == 2, labels == 2)
    assert labels[lens].max() == 5  # the input is not modified
    # Off (0), or a threshold no bleed reaches: the U-Net's labels stay.
    np.testing.assert_array_equal(postprocess_label_map(labels, volume), labels)
    none_flat = postprocess_label_map(labels, volume, extra_axial_shape=1e6)
    assert (none_flat[lens] == 1).all() and (none_flat[sheet] == 1).all()
    # One label per connected bleed, whatever mix the U-Net gave it.
    mixed = labels.copy()
    mixed[sheet & (x < 40)] = 5
    both = postprocess_label_map(mixed, volume, extra_axial_shape=9.0)
    assert (both[sheet] == 5).all()


def test_predict_volume_applies_the_configured_post_processing(hemorrhage_checkpoint):
    segmenter = load_segmenter(hemorrhage_checkpoint)
    volume = study_to_volume(generate_study(STUDY_SEED, STUDY_CONFIG))
    raw = segmenter.predict(volume.hu)
    assert raw.any()
    np.testing.assert_array_equal(segmenter.predict_volume(volume), raw)  # defaults: none
    nothing = np.zeros(volume.shape, np.uint8)
    restricted = segmenter.predict_volume(
        volume, intracranial_mask=nothing, restrict_to_intracranial=True
    )
    assert not restricted.any()
    everything = segmenter.predict_volume(volume, min_component_ml=1e6)
    assert not everything.any()


# --- evaluation ----------------------------------------------------------------------------------


def test_bland_altman_of_known_differences():
    result = bland_altman([2.0, 4.0, 6.0, 9.0], [1.0, 4.0, 5.0, 7.0])
    assert result["n"] == 4
    assert result["mean_difference"] == pytest.approx(1.0)
    sd = float(np.std([1.0, 0.0, 1.0, 2.0], ddof=1))
    assert result["sd_difference"] == pytest.approx(sd)
    assert result["limits_of_agreement"] == pytest.approx([1.0 - 1.96 * sd, 1.0 + 1.96 * sd])
    single = bland_altman([3.0], [1.0])
    assert single["mean_difference"] == 2.0 and single["limits_of_agreement"] is None
    assert bland_altman([], [])["n"] == 0


def test_case_measurements_and_summary():
    study = generate_study(STUDY_SEED, STUDY_CONFIG)
    volume = study_to_volume(study)
    truth = study.hemorrhage
    perfect = case_measurements(truth, truth, volume)
    assert perfect["dice_epidural"] == 1.0 and perfect["dice_subdural"] is None
    assert perfect["error_ml_total"] == 0.0
    expected = volumes_by_label(truth, volume)
    assert perfect["ref_ml_intraparenchymal"] == round(expected["intraparenchymal"], 3)
    assert perfect["abc2_ref_ml"] == round(largest_component_abc2(truth, volume), 3)

    missed = truth.copy()
    missed[missed == 3] = 0
    missed[0, 0, 0] = 5  # a false-positive subdural voxel
    row = case_measurements(missed, truth, volume)
    assert row["dice_intraventricular"] == 0.0
    assert row["error_ml_intraventricular"] == -row["ref_ml_intraventricular"]
    assert row["dice_subdural"] == 0.0 and row["ref_ml_subdural"] == 0.0

    summary = summarize([{"case": "a", **perfect}, {"case": "b", **row}])
    ivh = summary["intraventricular"]
    assert ivh["n_reference"] == 2 and ivh["dice_mean"] == 0.5
    assert ivh["abs_error_ml_median"] == pytest.approx(row["ref_ml_intraventricular"] / 2)
    assert summary["subdural"]["false_positive_cases"] == 1
    assert summary["subdural"]["n_reference"] == 0 and summary["subdural"]["dice_mean"] is None
    abc = summary["abc2_intraparenchymal"]
    assert abc["n_reference"] == 2
    assert abc["segmenter_volume"]["abs_error_ml_median"] == 0.0
    error = perfect["abc2_ref_ml"] - perfect["ref_ml_intraparenchymal"]
    assert abc["abc2_on_reference"]["error_ml_mean"] == pytest.approx(error, abs=1e-9)


def test_evaluate_writes_metrics_report_and_plot(hemorrhage_checkpoint, tmp_path):
    study = generate_study(STUDY_SEED, STUDY_CONFIG)
    other = generate_study(STUDY_SEED + 1, STUDY_CONFIG)
    cases = [EvaluationCase(s.study_id, study_to_volume(s), s.hemorrhage) for s in (study, other)]
    result = evaluate_hemorrhage_segmenter(hemorrhage_checkpoint, cases, tmp_path / "eval")
    out = tmp_path / "eval"
    for name in ("metrics.json", "per_case.csv", "report.md", "bland_altman.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_cases"] == 2 and saved["summary"] == json.loads(json.dumps(result["summary"]))
    rows = read_csv(out / "per_case.csv")
    assert [r["case"] for r in rows] == [study.study_id, other.study_id]
    # The fitted study is segmented well; its numbers are those of its own label map.
    first = result["cases_table"][0]
    assert first["dice_intraparenchymal"] > 0.6 and first["dice_epidural"] > 0.6
    predicted = load_segmenter(hemorrhage_checkpoint).predict_volume(cases[0].volume)
    volumes = volumes_by_label(predicted, cases[0].volume)
    assert first["pred_ml_total"] == round(volumes["total"], 3)
    report = (out / "report.md").read_text()
    assert "| intraparenchymal |" in report and "ABC/2 on the reference mask" in report


def test_evaluate_refuses_an_intracranial_checkpoint(segmenter_checkpoint, tmp_path):
    with pytest.raises(InputError, match="not a hemorrhage segmenter"):
        evaluate_hemorrhage_segmenter(segmenter_checkpoint, [], tmp_path)


def test_evaluate_segmenter_command_on_nifti(hemorrhage_checkpoint, tmp_path):
    data = tmp_path / "data"
    write_dataset(data, studies=2, seed=STUDY_SEED, config=STUDY_CONFIG)
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "evaluate-segmenter",
            str(hemorrhage_checkpoint),
            str(out),
            "--images",
            str(data / "nifti"),
            "--labels",
            str(data / "nifti"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "intraparenchymal" in result.output and (out / "bland_altman.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_cases"] == 2
    assert "nifti" in metrics["cases"].lower()

    bad = runner.invoke(
        app,
        [
            "evaluate-segmenter",
            str(hemorrhage_checkpoint),
            str(tmp_path / "x"),
            "--images",
            str(data / "nifti"),
            "--labels",
            str(tmp_path / "missing"),
        ],
    )
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_evaluate_segmenter_command_on_phantom_studies(hemorrhage_checkpoint, tmp_path):
    out = tmp_path / "eval"
    args = ["--phantom-studies", "2", "--seed", "900", "--size", "64", "--slices", "8"]
    result = runner.invoke(
        app, ["evaluate-segmenter", str(hemorrhage_checkpoint), str(out), *args, "--quiet"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["case"] for r in metrics["cases_table"]] == ["PH000900", "PH000901"]
    assert metrics["postprocessing"] == {
        "restrict_to_intracranial": False,
        "min_component_ml": 0.0,
        "component_vote": False,
        "extra_axial_shape": 0.0,
    }
    shaped = runner.invoke(
        app,
        ["evaluate-segmenter", str(hemorrhage_checkpoint), str(tmp_path / "shape"), *args]
        + ["--extra-axial-shape", "9", "--quiet"],
    )
    assert shaped.exit_code == 0, shaped.output
    record = json.loads((tmp_path / "shape" / "metrics.json").read_text())["postprocessing"]
    assert record["extra_axial_shape"] == 9.0


# --- volumes -------------------------------------------------------------------------------------


def test_hemorrhage_volumes_columns():
    study = generate_study(STUDY_SEED, STUDY_CONFIG)
    volume = study_to_volume(study)
    columns = hemorrhage_volumes(study.hemorrhage, volume)
    assert tuple(columns) == VOLUME_COLUMNS
    expected = volumes_by_label(study.hemorrhage, volume)
    assert columns["volume_ml_epidural"] == round(expected["epidural"], 3) > 0
    assert columns["volume_ml_subdural"] == 0.0
    assert columns["volume_ml_total"] == round(expected["total"], 3)
    assert columns["abc2_ml_intraparenchymal"] == round(
        largest_component_abc2(study.hemorrhage, volume), 3
    )


def test_train_segmenter_target_hemorrhage_uses_the_packaged_recipe(tmp_path):
    out = tmp_path / "run"
    small = [
        "data.phantom.studies=2",
        "data.phantom.size=48",
        "data.phantom.slices=3",
        "model.image_size=32",
        "model.patch_size=16",
        "model.channels=[8,16]",
        "model.strides=[2]",
        "model.epochs=1",
        "model.samples_per_epoch=8",
    ]
    args = ["train-segmenter", str(out), "--target", "hemorrhage", "--quiet"]
    for item in small:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "hemorrhage.yaml" in result.output
    saved = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    model = saved["model"]
    assert model["target"] == "hemorrhage" and model["foreground_fraction"] is not None
    assert model["batch_dice"] is True and saved["data"]["phantom"]["negative_fraction"] is not None


# --- slow: the packaged recipe reaches the targets --------------------------------------------


@pytest.mark.slow
def test_packaged_recipe_meets_the_targets_on_unseen_phantom_studies(tmp_path):
    from ichseg.segmentation.evaluation import phantom_cases
    from ichseg.segmentation.recipes import HEMORRHAGE_RECIPE, load_segmenter_run, training_cases
    from ichseg.volume import HEMORRHAGE_CODES

    run = load_segmenter_run(HEMORRHAGE_RECIPE)
    model = run.segmenter_config()
    best = train_segmenter(
        training_cases(run.data, model.target), model, tmp_path / "run", progress=False
    )
    targets = ("intraparenchymal", "epidural", "intraventricular")
    # Unseen studies from seed 70000 on, as many as it takes for every target subtype to have
    # at least 5 reference bleeds (40 studies held only 4 intraventricular ones): decided by
    # the reference label maps alone, before the model sees any of them.
    cases, found = [], dict.fromkeys(targets, 0)
    for case in phantom_cases(80, 70000):
        cases.append(case)
        for code, name in HEMORRHAGE_CODES.items():
            if name in found and (case.reference == code).any():
                found[name] += 1
        if len(cases) >= 40 and min(found.values()) >= 5:
            break
    assert min(found.values()) >= 5, found
    result = evaluate_hemorrhage_segmenter(best, cases, tmp_path / "eval", progress=False)
    summary = result["summary"]
    # The recipe's targets (benchmarks/README.md): Dice >= 0.8 and median volume error <= 1 ml
    # for these three subtypes; subarachnoid and subdural blood are reported, not targeted.
    for name in targets:
        assert summary[name]["n_reference"] >= 5, name
        assert summary[name]["dice_mean"] >= 0.8, (name, summary[name])
        assert summary[name]["abs_error_ml_median"] <= 1.0, (name, summary[name])

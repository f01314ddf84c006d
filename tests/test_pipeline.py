"""One preprocessing path: training cache, evaluation and prediction see the same tensors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.config import load_config

runner = CliRunner()


def _run_config(run: Path):
    return load_config(run / "config.yaml")


def test_cache_and_predict_give_identical_tensors_and_probabilities(trained_run: Path):
    from ichseg.engine.cache import build_slices
    from ichseg.engine.evaluate import predict_rows, run_preprocessor
    from ichseg.engine.sources import make_source
    from ichseg.inference import load_predictor, predict_volume

    config = _run_config(trained_run)
    preprocessor = run_preprocessor(trained_run, config)
    slices = build_slices(config, preprocessor, config.data.cache_dir, progress=False)
    source = make_source(config.data, Path(config.data.cache_dir))
    unit = source.units()[0]
    volume = source.read(unit).volume
    rows = np.flatnonzero(slices.series == volume.series_uid)
    rows = rows[np.argsort(slices.slice_index[rows])]
    assert len(rows) == volume.num_slices

    predictor = load_predictor(trained_run, device="cpu")
    prediction = predict_volume(predictor, volume)
    cached = np.stack([slices.stack(int(r)) for r in rows])
    np.testing.assert_array_equal(prediction.images[slices.slice_index[rows]], cached)

    model = predictor.model
    from_cache = predict_rows(model, slices, rows, config)
    np.testing.assert_allclose(
        prediction.probabilities[slices.slice_index[rows]], from_cache, atol=1e-5
    )


def test_cached_slices_are_aligned_with_their_labels(trained_run: Path):
    """A slice labelled as bleeding shows blood in the cache at the labelled position."""
    from ichseg.engine.cache import build_slices
    from ichseg.engine.evaluate import run_preprocessor
    from ichseg.phantom import PhantomConfig, generate_study
    from ichseg.preprocess.windowing import resize_slices

    config = _run_config(trained_run)
    slices = build_slices(
        config, run_preprocessor(trained_run, config), config.data.cache_dir, False
    )
    spec = config.data.phantom
    from ichseg.phantom.writers import study_seed

    checked = 0
    for index in range(spec.studies):
        study = generate_study(
            study_seed(spec.seed, index), PhantomConfig(size=spec.size, num_slices=spec.slices)
        )
        rows = np.flatnonzero(slices.groups == study.patient_id)
        for row in rows:
            z = int(slices.slice_index[row])
            truth = study.slice_labels()[z]
            np.testing.assert_array_equal(slices.labels[row], truth)
            if not truth[0]:
                continue
            size = (config.data.image_size, config.data.image_size)
            blood = resize_slices((study.hemorrhage[z] > 0).astype(np.float32)[None], size)[0] > 0.9
            brain = resize_slices((study.intracranial_mask[z] > 0).astype(np.float32)[None], size)[
                0
            ]
            brain = (brain > 0.9) & ~blood
            if blood.sum() < 3 or brain.sum() < 3:
                continue
            channel = slices.stack(int(row))[0].astype(float)  # brain window, 0..255
            # Blood (50-90 HU) is brighter than brain (25-45 HU) in the 40/80 window.
            assert channel[blood].mean() > channel[brain].mean() + 10
            checked += 1
    assert checked >= 2


def _phantom_pictures(root: Path, layout: str) -> Path:
    """Brain-window PNGs of phantom slices, labelled hemorrhage/normal, with patients."""
    from ichseg.phantom import PhantomConfig, generate_study
    from ichseg.preprocess.windowing import window

    rows = []
    for patient in range(8):
        study = generate_study(300 + patient, PhantomConfig(size=48, num_slices=6))
        for z in range(study.num_slices):
            label = "hemorrhage" if study.slice_labels()[z][0] else "normal"
            pixels = (window(study.hu[z], 40, 80) * 255).astype(np.uint8)
            if layout == "folders":
                path = root / label / f"p{patient}" / f"s{z}.png"
            else:
                path = root / f"p{patient}_s{z}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            rows.append((path.relative_to(root).as_posix(), label, f"p{patient}"))
    if layout == "csv":
        with open(root / "labels.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "label", "patient_id"])
            writer.writerows(rows)
    return root


@pytest.mark.parametrize("layout", ["csv", "folders"])
def test_binary_picture_folders_train_and_predict_like_evaluation(tmp_path: Path, layout: str):
    from ichseg.engine.train import train
    from ichseg.inference import predict

    data = _phantom_pictures(tmp_path / "pictures", layout)
    config = load_config(
        extra={
            "name": "pictures",
            "data": {
                "source": "images",
                "root": str(data),
                "image_size": 48,
                "cache_dir": str(tmp_path / "cache"),
                "split": {"val_fraction": 0.25, "test_fraction": 0.25},
            },
            "model": {"name": "resnet18"},
            "train": {"epochs": 1, "batch_size": 8},
            "eval": {"n_boot": 10},
        }
    )
    run = tmp_path / "run"
    result = train(config, run, progress=False)
    assert result.test_metrics is not None
    evaluated = {}
    with open(run / "eval" / "test" / "predictions.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            evaluated[row["sop_uid"]] = float(row["any"])
    out = tmp_path / "out"
    predicted = predict(run, data, out, progress=False)
    by_image = {
        Path(r["source"]).relative_to(data).as_posix(): float(r["any"])
        for r in predicted.slice_rows
    }
    assert evaluated and set(evaluated) <= set(by_image)
    for image, probability in evaluated.items():
        assert by_image[image] == pytest.approx(probability, abs=1e-5)
    # A picture-trained model refuses CT volumes rather than guessing their windowing.
    from ichseg.phantom import PhantomConfig, write_dataset

    write_dataset(tmp_path / "ct", studies=1, seed=1, config=PhantomConfig(size=48, num_slices=4))
    refused = runner.invoke(
        app, ["predict", str(run), str(tmp_path / "ct" / "nifti"), str(tmp_path / "o2"), "--quiet"]
    )
    assert refused.exit_code == 2 and "trained on pictures" in refused.output


def test_masking_method_is_the_runs_own(trained_run: Path, segmenter_checkpoint: Path, tmp_path):
    """A classical-mask run is served with classical masks even when a U-Net is at hand."""
    from ichseg.engine.checkpoint import load_checkpoint, save_checkpoint
    from ichseg.inference import load_predictor
    from ichseg.segmentation.unet import Segmenter

    run = tmp_path / "classical_run"
    run.mkdir()
    state = load_checkpoint(trained_run / "best.pt")
    state["config"]["masking"] = {"enabled": True, "method": "classical"}
    save_checkpoint(state, run / "best.pt")
    (run / "thresholds.json").write_bytes((trained_run / "thresholds.json").read_bytes())
    predictor = load_predictor(run, segmenter=segmenter_checkpoint, device="cpu")
    assert not isinstance(predictor.preprocessor.masker, Segmenter)
    assert predictor.preprocessor.masking.method == "classical"


def test_slice_filter_applies_at_inference(trained_run: Path, tmp_path: Path, phantom_dir):
    """Slices outside the run's min_brain_fraction are not scored by predict either."""
    from ichseg.engine.checkpoint import load_checkpoint, save_checkpoint
    from ichseg.inference import load_predictor, predict

    run = tmp_path / "filtered"
    run.mkdir()
    state = load_checkpoint(trained_run / "best.pt")
    state["config"]["data"]["min_brain_fraction"] = 0.27
    save_checkpoint(state, run / "best.pt")
    (run / "thresholds.json").write_bytes((trained_run / "thresholds.json").read_bytes())
    predictor = load_predictor(run, device="cpu")
    result = predict(
        run, phantom_dir / "nifti", tmp_path / "out", progress=False, predictor=predictor
    )
    scored = [r for r in result.slice_rows if r["scored"] == 1]
    unscored = [r for r in result.slice_rows if r["scored"] == 0]
    assert scored and unscored
    assert all(r["any"] == "" for r in unscored)


@pytest.mark.parametrize(
    ("shape", "image_size", "masked"),
    [((64, 64), 32, False), ((64, 64), 32, True), ((40, 36), 24, True), ((24, 24), 24, False)],
)
def test_a_volume_prepared_slice_by_slice_equals_it_prepared_whole(
    monkeypatch, shape, image_size, masked
):
    """The preprocessor windows a volume a few slices at a time; the chunk boundaries (here
    every slice, or every third) change nothing, masked or not, shrunk twofold or resized."""
    from ichseg.config import DataConfig, MaskingConfig
    from ichseg.preprocess import pipeline
    from ichseg.volume import CTVolume

    rng = np.random.default_rng(3)
    hu = rng.normal(40, 400, size=(7, *shape)).astype(np.float32)
    mask = (rng.random((7, *shape)) > 0.3).astype(np.uint8)
    volume = CTVolume(hu, np.eye(4), "", "", np.arange(7, dtype=np.float64))
    masking = MaskingConfig(enabled=True, background="min") if masked else MaskingConfig()
    masker = (lambda _: mask) if masked else None
    preprocessor = pipeline.Preprocessor(DataConfig(image_size=image_size), masking, masker)

    def prepared(chunk_bytes: int) -> np.ndarray:
        monkeypatch.setattr(pipeline, "_CHUNK_BYTES", chunk_bytes)
        return preprocessor(volume).base

    whole = prepared(10**12)
    slice_bytes = 4 * 3 * shape[0] * shape[1]
    for chunk_bytes in (1, 3 * slice_bytes):
        assert np.array_equal(prepared(chunk_bytes), whole)
    assert whole.shape == (7, 3, image_size, image_size) and whole.dtype == np.uint8
    if masked:
        assert (whole == 0).any() and (whole > 0).any()

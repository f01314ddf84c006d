"""The sequence head: padding-safe model, series order, cached embeddings, training on a backbone
run, evaluation, prediction on DICOM and NIfTI, and the bundle."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.config import load_config
from ichseg.engine.predict import precision_used
from ichseg.errors import ConfigError, InputError

runner = CliRunner()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("kind", ["gru", "conv"])
def test_padding_never_changes_a_series_output(kind: str) -> None:
    from ichseg.models.sequence import SequenceHead

    torch.manual_seed(0)
    head = SequenceHead(12, 6, kind=kind, hidden=8, layers=2, dropout=0.0).eval()
    short, long = torch.randn(1, 4, 12), torch.randn(1, 9, 12)
    alone = head(short, torch.tensor([4]))
    padded = torch.zeros(2, 9, 12)
    padded[0, :4], padded[1] = short[0], long[0]
    padded[0, 4:] = 100.0  # junk beyond the end must not leak into a bidirectional model
    together = head(padded, torch.tensor([4, 9]))
    torch.testing.assert_close(together[0, :4], alone[0], atol=1e-5, rtol=1e-5)
    assert together.dtype == torch.float32 and together.shape == (2, 9, 6)
    # The head does use its neighbours: changing one slice changes another slice's output.
    changed = short.clone()
    changed[0, 0] = torch.randn(12)
    assert not torch.allclose(head(changed, torch.tensor([4]))[0, 1], alone[0, 1])


def test_sequence_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="sequence.kernel_size"):
        load_config(extra={"sequence": {"kernel_size": 4}})
    with pytest.raises(ConfigError, match="sequence.knid"):
        load_config(extra={"sequence": {"knid": "gru"}})
    with pytest.raises(ConfigError, match="sequence head needs CT series"):
        load_config(extra={"data": {"source": "images"}, "sequence": {"enabled": True}})
    assert load_config().eval.calibration == "temperature"


def test_series_are_grouped_and_ordered_by_position() -> None:
    from types import SimpleNamespace

    from ichseg.engine.sequence import series_sequences

    slices = SimpleNamespace(
        series=np.array(["b", "a", "b", "a", "b"]), slice_index=np.array([2, 1, 0, 0, 1])
    )
    groups = series_sequences(slices, np.array([0, 1, 2, 3, 4]))
    assert [g.tolist() for g in groups] == [[3, 1], [2, 4, 0]]
    assert series_sequences(slices, np.array([], dtype=np.int64)) == []


def test_sequence_run_layout_and_metrics(sequence_run: Path, trained_run: Path) -> None:
    from ichseg.engine.checkpoint import load_checkpoint

    assert (sequence_run / "backbone" / "best.pt").read_bytes() == (
        trained_run / "best.pt"
    ).read_bytes()
    # The head trained and was tested on the backbone's patients.
    assert json.loads((sequence_run / "splits.json").read_text()) == json.loads(
        (trained_run / "splits.json").read_text()
    )
    state = load_checkpoint(sequence_run / "best.pt")
    assert state["kind"] == "sequence"
    assert state["config"]["num_features"] == 512  # resnet18 pooled features
    record = json.loads((sequence_run / "backbone.json").read_text())
    assert record["trained_here"] is False and record["sha1"] == state["config"]["backbone_sha1"]
    # The head trains in fp32 on embeddings the backbone computed as the machine's rule says.
    backbone_precision = precision_used(torch.device("cpu"), True)
    assert record["embeddings_precision"] == backbone_precision
    history = [json.loads(x) for x in (sequence_run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(np.isfinite(h["val_loss"]) for h in history)
    assert {h["compute_precision"] for h in history} == {"fp32"}
    metrics = json.loads((sequence_run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["compute_precision"] == backbone_precision
    assert {"auroc_any", "weighted_log_loss", "series_auroc_any"} <= set(metrics)
    assert metrics["calibration"]["method"] == "temperature"
    assert (sequence_run / "eval" / "test" / "reliability.png").stat().st_size > 0
    thresholds = json.loads((sequence_run / "thresholds.json").read_text())
    assert thresholds["calibration"] == "temperature" and thresholds["calibrator"]


def test_embeddings_are_computed_once_per_backbone(sequence_run: Path, trained_run: Path) -> None:
    from ichseg.engine.cache import build_slices
    from ichseg.engine.embeddings import embed_slices
    from ichseg.engine.evaluate import run_preprocessor
    from ichseg.engine.sequence import load_sequence_run

    scorer = load_sequence_run(sequence_run)
    config = scorer.config
    slices = build_slices(config, run_preprocessor(sequence_run, config), progress=False)
    rows = slices.usable()
    cached = embed_slices(scorer.backbone, slices, rows, backbone_sha1=scorer.backbone_sha1)
    assert not cached.computed  # training computed them
    assert cached.folder == Path(
        json.loads((sequence_run / "backbone.json").read_text())["embeddings"]
    )
    # Another backbone (another SHA-1) never reads them: its own entry is computed.
    other = embed_slices(scorer.backbone, slices, rows[:5], backbone_sha1="0" * 40)
    assert other.computed and other.folder != cached.folder
    np.testing.assert_allclose(other.lookup(rows[:5]), cached.lookup(rows[:5]), atol=1e-6)
    with pytest.raises(KeyError):
        other.lookup(rows[5:6])


def test_embeddings_in_bf16_are_not_served_to_fp32(
    sequence_run: Path, trained_run: Path, monkeypatch
) -> None:
    from ichseg.engine import predict
    from ichseg.engine.cache import build_slices
    from ichseg.engine.embeddings import embed_slices
    from ichseg.engine.evaluate import run_preprocessor
    from ichseg.engine.sequence import load_sequence_run

    scorer = load_sequence_run(sequence_run)
    config = scorer.config
    slices = build_slices(config, run_preprocessor(sequence_run, config), progress=False)
    rows = slices.usable()[:3]
    sha1 = "1" * 40
    monkeypatch.setattr(predict, "_bf16_autocast_pays", lambda device_type: True)
    in_bf16 = embed_slices(scorer.backbone, slices, rows, backbone_sha1=sha1, device="cpu")
    monkeypatch.setattr(predict, "_bf16_autocast_pays", lambda device_type: False)
    in_fp32 = embed_slices(scorer.backbone, slices, rows, backbone_sha1=sha1, device="cpu")
    assert in_bf16.computed and in_fp32.computed and in_fp32.folder != in_bf16.folder
    again = embed_slices(scorer.backbone, slices, rows, backbone_sha1=sha1, device="cpu")
    assert not again.computed and again.folder == in_fp32.folder


def test_sequence_predict_matches_evaluation_path(sequence_run: Path) -> None:
    """predict (volume -> backbone -> head) and evaluate (cache -> embeddings -> head) agree."""
    from ichseg.engine.cache import build_slices
    from ichseg.engine.evaluate import run_preprocessor
    from ichseg.engine.sequence import load_sequence_run
    from ichseg.engine.sources import make_source
    from ichseg.inference import load_predictor, predict_volume

    scorer = load_sequence_run(sequence_run)
    config = scorer.config
    slices = build_slices(config, run_preprocessor(sequence_run, config), progress=False)
    source = make_source(config.data, Path(config.data.cache_dir))
    volume = source.read(source.units()[0]).volume
    rows = np.flatnonzero(slices.series == volume.series_uid)
    rows = rows[np.argsort(slices.slice_index[rows])]

    predictor = load_predictor(sequence_run, device="cpu")
    assert predictor.head is not None
    live = predict_volume(predictor, volume).probabilities[slices.slice_index[rows]]
    cached = scorer.probabilities(slices, rows)
    np.testing.assert_allclose(live, cached, atol=1e-5)
    # Scrambling the order of the slices changes the head's output: it reads the sequence.
    scrambled = predictor.sequence_probabilities(predict_volume_images(predictor, volume)[::-1])
    assert not np.allclose(scrambled[::-1], live, atol=1e-4)


def predict_volume_images(predictor, volume) -> np.ndarray:
    prepared = predictor.preprocessor(volume)
    return prepared.images[prepared.keep]


def test_predict_sequence_run_on_dicom_and_nifti(
    sequence_run: Path, phantom_dir: Path, nifti_ct_dir: Path, tmp_path: Path
) -> None:
    for source, out in ((phantom_dir / "dicom", tmp_path / "d"), (nifti_ct_dir, tmp_path / "n")):
        result = runner.invoke(
            app, ["predict", str(sequence_run), str(source), str(out), "--quiet", "--no-gradcam"]
        )
        assert result.exit_code == 0, result.output
        slices, series = _read_csv(out / "predictions.csv"), _read_csv(out / "series.csv")
        assert len(series) == 2 and len(slices) == 16
        for row in series:
            own = [float(r["any"]) for r in slices if r["series_uid"] == row["series_uid"]]
            assert float(row["any"]) == pytest.approx(max(own), abs=1e-6)
        info = json.loads((out / "predict_info.json").read_text())
        assert info["models"][0]["kind"] == "sequence"
        assert info["models"][0]["calibration"]["method"] == "temperature"


def test_backbone_of_another_config_is_refused(trained_run: Path, tmp_path: Path) -> None:
    from ichseg.engine.train import train

    config = load_config(
        trained_run / "config.yaml",
        ["model.dropout=0.5"],
        extra={"sequence": {"enabled": True, "epochs": 1, "backbone_run": str(trained_run)}},
    )
    with pytest.raises(ConfigError, match="another config.*model.dropout"):
        train(config, tmp_path / "run", progress=False)
    sequence = load_config(
        trained_run / "config.yaml",
        extra={"sequence": {"enabled": True, "backbone_run": str(tmp_path / "missing")}},
    )
    with pytest.raises(InputError, match="not a finished run"):
        train(sequence, tmp_path / "run2", progress=False)


def test_head_refuses_another_backbone(sequence_run: Path, trained_run: Path, tmp_path: Path):
    from ichseg.engine.checkpoint import load_checkpoint, save_checkpoint
    from ichseg.inference import load_predictor

    copy = tmp_path / "copy"
    shutil.copytree(sequence_run, copy)
    state = load_checkpoint(copy / "backbone" / "best.pt")
    state["state_dict"] = {k: v + 0.01 for k, v in state["state_dict"].items()}
    save_checkpoint(state, copy / "backbone" / "best.pt")
    with pytest.raises(InputError, match="not the backbone the sequence head"):
        load_predictor(copy, device="cpu")


@pytest.mark.slow
def test_sequence_run_trains_its_own_backbone_and_resumes(tmp_path: Path) -> None:
    from ichseg.engine.checkpoint import load_checkpoint
    from ichseg.engine.loop import state_digest
    from ichseg.engine.train import train

    config = load_config(
        extra={
            "name": "own",
            "data": {
                "phantom": {"studies": 8, "size": 64, "slices": 6},
                "image_size": 64,
                "split": {"val_fraction": 0.25, "test_fraction": 0.25},
                "cache_dir": str(tmp_path / "cache"),
            },
            "model": {"name": "resnet18"},
            "train": {"epochs": 1, "batch_size": 16},
            "eval": {"n_boot": 10},
            "sequence": {"enabled": True, "kind": "conv", "epochs": 3, "hidden": 16},
        }
    )
    run = tmp_path / "run"
    train(config, run, progress=False)
    assert (run / "backbone" / "eval" / "test" / "metrics.json").is_file()
    assert json.loads((run / "backbone.json").read_text())["trained_here"] is True
    finished = load_checkpoint(run / "last.pt")
    # A run trained again with --resume is complete already: same weights, no new epochs.
    train(config, run, resume=True, progress=False)
    again = load_checkpoint(run / "last.pt")
    assert again["epoch"] == finished["epoch"] == 2
    assert state_digest(again["state_dict"]) == state_digest(finished["state_dict"])
    with pytest.raises(ConfigError, match="pass --resume"):
        train(config, run, progress=False)


def test_evaluate_sequence_run_with_tta(sequence_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(sequence_run, run)
    result = runner.invoke(app, ["evaluate", str(run), "--split", "test", "--tta"])
    assert result.exit_code == 0, result.output
    assert "TTA flip: 2 views" in result.output
    metrics = json.loads((run / "eval" / "test_flip" / "metrics.json").read_text())
    assert metrics["tta"]["name"] == "flip" and metrics["tta"]["views"] == 2
    assert metrics["tta"]["forward_tta_added_s"] > 0
    assert (run / "tta-flip" / "thresholds.json").is_file()
    assert (run / "tta-flip" / "calibration.json").is_file()
    # The plain run's serving files and test report are untouched.
    for name in ("thresholds.json", "calibration.json", "eval/test/metrics.json"):
        assert (run / name).read_bytes() == (sequence_run / name).read_bytes()


def test_bundle_of_sequence_run_matches_predict(
    sequence_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    from ichseg.bundle import export_bundle

    bundle = export_bundle(sequence_run, tmp_path / "bundle")
    for name in ("classifier.pt", "sequence.pt", "thresholds.json", "calibration.json"):
        assert (bundle / "models" / name).is_file(), name
    assert (bundle / "models" / "sequence.pt").read_bytes() == (
        sequence_run / "best.pt"
    ).read_bytes()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert "sequence head" in meta["description"]
    source = (phantom_dir / "dicom").resolve()
    out_monai, out_run = tmp_path / "monai", tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run"]
        + ["--config_file", str(bundle / "configs" / "inference.json")]
        + ["--meta_file", str(bundle / "configs" / "metadata.json")]
        + ["--bundle_root", str(bundle), "--dataset_dir", str(source)]
        + ["--output_dir", str(out_monai), "--gradcam", "False"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cli = runner.invoke(
        app, ["predict", str(sequence_run), str(source), str(out_run), "--quiet", "--no-gradcam"]
    )
    assert cli.exit_code == 0, cli.output
    names = ["any", "epidural", "subdural"]
    for table in ("predictions.csv", "series.csv"):
        a, b = _read_csv(out_monai / table), _read_csv(out_run / table)
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(
            [[float(r[n]) for n in names] for r in a],
            [[float(r[n]) for n in names] for r in b],
            atol=1e-5,
        )

"""Test-time augmentation: the views, their average, the time they add, and ``predict --tta``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.engine.predict import (
    ForwardTimer,
    TestTimeAugmentation,
    make_tta,
    predict_features,
    predict_probabilities,
    shift_images,
)

runner = CliRunner()


def test_views_and_names() -> None:
    assert make_tta(False, 0) is None
    flip = TestTimeAugmentation()
    assert flip.name == "flip" and flip.views() == [(False, 0, 0), (True, 0, 0)]
    both = make_tta(True, 2)
    assert both.name == "flip-shift2" and len(both.views()) == 6
    assert make_tta(False, 3).name == "shift3"
    with pytest.raises(ValueError, match="shift"):
        TestTimeAugmentation(shift=-1)


def test_shift_fills_with_zeros_without_wrapping() -> None:
    image = torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 4, 4)
    down_right = shift_images(image, 1, 2)[0, 0]
    assert down_right[0].tolist() == [0, 0, 0, 0]
    assert down_right[:, :2].abs().sum() == 0
    assert down_right[1:, 2:].tolist() == image[0, 0, :3, :2].tolist()
    assert shift_images(image, -1, 0)[0, 0, -1].tolist() == [0, 0, 0, 0]
    assert shift_images(image, 5, 0).abs().sum() == 0


class _LeftHeavy(torch.nn.Module):
    """A 'classifier' that looks at the left half only, so the flip changes its answer."""

    num_features = 2

    def forward_features(self, x):
        return torch.stack([x[..., : x.shape[-1] // 2].mean((1, 2, 3)), x.mean((1, 2, 3))], 1)

    def forward(self, x):
        return 4 * self.forward_features(x)[:, :1].repeat(1, 2) - 1


def test_tta_averages_probabilities_and_features_over_views() -> None:
    model = _LeftHeavy()
    images = torch.rand(5, 3, 8, 8)
    images[..., :4] *= 0.2  # dark left half: the flip sees a bright one
    device = torch.device("cpu")
    plain = predict_probabilities(model, [images], device, False, "multilabel")
    timer = ForwardTimer()
    averaged = predict_probabilities(
        model, [images], device, False, "multilabel", TestTimeAugmentation(), timer
    )
    flipped = predict_probabilities(model, [images.flip(-1)], device, False, "multilabel")
    np.testing.assert_allclose(averaged, (plain + flipped) / 2, atol=1e-6)
    assert not np.allclose(averaged, plain, atol=1e-3)
    assert timer.views == 2 and timer.plain_s > 0 and timer.extra_s > 0
    features = predict_features(model, [images], device, False, TestTimeAugmentation())
    expected = (model.forward_features(images) + model.forward_features(images.flip(-1))) / 2
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-6)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_with_tta_on_dicom_and_nifti(
    trained_run: Path, phantom_dir: Path, nifti_ct_dir: Path, tmp_path: Path
) -> None:
    for source, name in ((phantom_dir / "dicom", "dicom"), (nifti_ct_dir, "nifti")):
        plain, tta = tmp_path / f"{name}_plain", tmp_path / f"{name}_tta"
        common = ["--quiet", "--no-gradcam"]
        result = runner.invoke(app, ["predict", str(trained_run), str(source), str(plain), *common])
        assert result.exit_code == 0, result.output
        result = runner.invoke(
            app, ["predict", str(trained_run), str(source), str(tta), *common, "--tta"]
        )
        assert result.exit_code == 0, result.output
        assert "TTA flip: 2 views" in result.output and "added by TTA" in result.output
        # No thresholds were fitted with TTA for this run: the plain ones serve, with a note.
        assert "no thresholds/calibration fitted with TTA flip" in result.output
        info = json.loads((tta / "predict_info.json").read_text())
        assert info["tta"]["views"] == 2 and info["timing"]["forward_tta_added_s"] > 0
        plain_info = json.loads((plain / "predict_info.json").read_text())
        assert plain_info["tta"]["name"] == "none"
        # What served the probabilities is on record, as for the run's own evaluation.
        evaluated = json.loads((trained_run / "eval" / "test" / "metrics.json").read_text())
        served = {m["compute_precision"] for m in plain_info["models"] + info["models"]}
        assert served == {evaluated["compute_precision"]}
        rows_plain = _read_csv(plain / "predictions.csv")
        rows_tta = _read_csv(tta / "predictions.csv")
        assert len(rows_plain) == len(rows_tta) == 16
        p = np.array([float(r["any"]) for r in rows_plain])
        q = np.array([float(r["any"]) for r in rows_tta])
        assert np.all((q >= 0) & (q <= 1)) and not np.allclose(p, q, atol=1e-7)


def test_predict_uses_thresholds_fitted_with_the_same_tta(
    trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    result = runner.invoke(app, ["evaluate", str(run), "--split", "val", "--tta"])
    assert result.exit_code == 0, result.output
    assert (run / "eval" / "val_flip" / "report.md").read_text().count("Test-time augmentation")
    from ichseg.inference import load_predictor

    predictor = load_predictor(run, device="cpu", tta=TestTimeAugmentation())
    assert predictor.notes == []
    fitted = json.loads((run / "tta-flip" / "thresholds.json").read_text())
    assert predictor.thresholds.slice["any"] == pytest.approx(fitted["slice"]["any"])
    assert predictor.calibration.tta == "flip"

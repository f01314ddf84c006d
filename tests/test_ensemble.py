"""``ichseg predict RUN1 RUN2 RUN3 INPUT OUT``: averaged calibrated probabilities, the spread
per series, refusals of members that do not match and of a forgotten OUT."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.errors import InputError
from ichseg.inference import load_models

runner = CliRunner()
COMMON = ["--quiet", "--no-gradcam"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def members(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The tiny run and two copies whose head biases differ: three different members, with
    their own series thresholds (one of them "never positive" for one class)."""
    from ichseg.engine.checkpoint import load_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("members")
    runs = [trained_run]
    for shift in (-1.0, 0.7):
        run = root / f"shift{shift}"
        shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "last.pt"))
        state = load_checkpoint(run / "best.pt")
        key = next(k for k in state["state_dict"] if k.startswith("head.") and k.endswith("bias"))
        state["state_dict"][key] = state["state_dict"][key] + shift
        save_checkpoint(state, run / "best.pt")
        thresholds = json.loads((run / "thresholds.json").read_text())
        for name, value in thresholds["series"].items():
            if value is not None:
                thresholds["series"][name] = min(1.0, max(0.0, value + shift / 10))
        if shift > 0:
            thresholds["series"]["epidural"] = None  # no threshold could be chosen
        (run / "thresholds.json").write_text(json.dumps(thresholds))
        runs.append(run)
    return runs


def test_ensemble_of_three_on_dicom_and_nifti(
    members: list[Path], phantom_dir: Path, nifti_ct_dir: Path, tmp_path: Path
) -> None:
    from ichseg.inference import load_predictor
    from ichseg.metrics import aggregate_probabilities

    names = load_predictor(members[0], device="cpu").class_names
    for source, label in ((phantom_dir / "dicom", "dicom"), (nifti_ct_dir, "nifti")):
        singles = []
        for i, run in enumerate(members):
            out = tmp_path / f"{label}_single{i}"
            result = runner.invoke(app, ["predict", str(run), str(source), str(out), *COMMON])
            assert result.exit_code == 0, result.output
            singles.append(out)
        out = tmp_path / f"{label}_ensemble"
        result = runner.invoke(app, ["predict", *map(str, members), str(source), str(out), *COMMON])
        assert result.exit_code == 0, result.output
        assert "(ensemble of 3)" in result.output

        slices = _read_csv(out / "predictions.csv")
        member_slices = [_read_csv(s / "predictions.csv") for s in singles]
        assert len(slices) == 16
        probs = np.array([[float(r[n]) for n in names] for r in slices])
        member_probs = np.array(
            [[[float(r[n]) for n in names] for r in rows] for rows in member_slices]
        )
        assert not np.allclose(member_probs[0], member_probs[1], atol=1e-3)
        # Each member's output is calibrated already; the ensemble is their mean.
        np.testing.assert_allclose(probs, member_probs.mean(axis=0), atol=2e-6)

        series = _read_csv(out / "series.csv")
        assert len(series) == 2
        for row in series:
            own = [i for i, r in enumerate(slices) if r["series_uid"] == row["series_uid"]]
            per_member = np.array(
                [aggregate_probabilities(member_probs[m][own], "max") for m in range(3)]
            )
            assert float(row["any"]) == pytest.approx(per_member[:, 0].mean(), abs=2e-6)
            assert float(row["sd_any"]) == pytest.approx(per_member[:, 0].std(ddof=1), abs=2e-6)
            assert float(row["sd_any"]) > 0 and row["members"] == "3"
            assert {f"sd_{n}" for n in names} <= set(row)
        # The averaged thresholds behind the label columns are recorded with the run: the mean
        # of the members' own, a member without one left out of that class's mean.
        info = json.loads((out / "predict_info.json").read_text())
        applied = info["ensemble"]["applied_thresholds"]["series"]
        own = [json.loads((run / "thresholds.json").read_text())["series"] for run in members]
        for n in names:
            finite = [t[n] for t in own if t[n] is not None]
            assert applied[n] == pytest.approx(np.mean(finite)) if finite else applied[n] is None
        assert own[2]["epidural"] is None and len({t["any"] for t in own}) == 3
        for row in series:
            for n in names:
                positive = applied[n] is not None and float(row[n]) >= applied[n]
                assert row[f"label_{n}"] == str(int(positive))


def test_members_must_predict_the_same_classes(
    trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    from ichseg.config import validate_config
    from ichseg.engine.checkpoint import build_model, load_checkpoint, save_checkpoint

    state = load_checkpoint(trained_run / "best.pt")
    config = dict(state["config"], task={"mode": "multiclass", "classes": None})
    other = tmp_path / "binary"
    other.mkdir()
    model = build_model(validate_config(config), pretrained=False)
    save_checkpoint({"state_dict": model.state_dict(), "config": config}, other / "best.pt")
    (other / "thresholds.json").write_text(
        '{"slice": {"normal": 0.5, "hemorrhage": 0.5}, "series": {}, "aggregation": "max"}'
    )
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["predict", str(trained_run), str(other), str(phantom_dir / "dicom"), str(out)]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot join the ensemble" in lines[0]
    assert "class names" in lines[0] and str(other) in lines[0]
    assert not out.exists()


def test_members_must_score_the_same_slices(members: list[Path], tmp_path: Path) -> None:
    """A member with another slice filter would leave slices half-scored: refused."""
    import yaml

    from ichseg.engine.checkpoint import load_checkpoint, save_checkpoint

    other = tmp_path / "filtered"
    shutil.copytree(members[1], other)
    state = load_checkpoint(other / "best.pt")
    state["config"]["data"]["min_brain_fraction"] = 0.2
    save_checkpoint(state, other / "best.pt")
    saved = yaml.safe_load((other / "config.yaml").read_text())
    saved["data"]["min_brain_fraction"] = 0.2
    (other / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(InputError, match="slice filter"):
        load_models([members[0], other], device="cpu")


def test_forgotten_out_is_refused_and_input_untouched(
    members: list[Path], phantom_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "in"
    shutil.copytree(phantom_dir / "dicom", source)

    def digest() -> dict[str, str]:
        return {
            str(p.relative_to(source)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(source.rglob("*"))
            if p.is_file()
        }

    before = digest()
    # RUN1 RUN2 IN: the last two are read as INPUT and OUT, so RUN2 would be the input.
    result = runner.invoke(app, ["predict", str(members[0]), str(members[1]), str(source)])
    assert result.exit_code == 2
    assert "is a model folder, not the INPUT" in result.output
    assert digest() == before
    result = runner.invoke(app, ["predict", str(members[0]), str(source), str(members[1])])
    assert result.exit_code == 2 and "not the OUT" in result.output


def test_ensemble_spread_is_zero_for_identical_members(
    trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    from ichseg.inference import load_models, predict

    ensemble = load_models([trained_run, trained_run], device="cpu")
    result = predict(
        [trained_run, trained_run],
        phantom_dir / "dicom",
        tmp_path / "o",
        progress=False,
        predictor=ensemble,
        gradcam=False,
    )
    assert all(row["sd_any"] == 0.0 for row in result.series_rows)
    assert result.info["ensemble"]["members"] == 2

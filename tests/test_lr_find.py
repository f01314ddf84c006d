"""Learning-rate range test and the one-cycle schedule."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.engine.lr_find import FALLBACK_RULE, RULE, lr_schedule, range_test, suggest_lr
from ichseg.errors import ConfigError, InputError


def _bowl(lr: float) -> float:
    """A loss that falls fastest at 1e-3, is lowest at 1e-2 and explodes beyond 1e-1."""
    x = math.log10(lr)
    return 2.0 - math.tanh(2.0 * (x + 3.0)) + (0.0 if x < -1 else 30.0 * (x + 1.0) ** 2)


def test_range_test_stops_on_divergence_and_suggests_the_steepest_descent() -> None:
    lrs = lr_schedule(1e-6, 10.0, 141)
    curve = range_test(_bowl, lrs, smoothing=0.0, divergence=4.0)
    assert curve.stopped == "diverged"
    assert len(curve.lrs) < len(lrs) and curve.lrs == list(lrs[: len(curve.lrs)])
    assert curve.smoothed[-1] > 4.0 * min(curve.smoothed)
    suggestion = suggest_lr(curve.lrs, curve.smoothed)
    assert suggestion.rule == RULE
    assert suggestion.lr == pytest.approx(1e-3, rel=0.1)
    assert 1e-2 < suggestion.minimum <= 1.01e-1
    assert suggestion.minimum_over_10 == pytest.approx(suggestion.minimum / 10)


def test_smoothing_is_a_debiased_moving_average() -> None:
    losses = iter([1.0, 3.0, 2.0])
    curve = range_test(lambda lr: next(losses), lr_schedule(1e-3, 1e-1, 3), smoothing=0.5)
    # (0.5 * 1) / (1 - 0.5); (0.25 * 1 + 0.5 * 3) / (1 - 0.25); ...
    assert curve.smoothed == pytest.approx([1.0, 1.75 / 0.75, (0.875 + 1.0) / 0.875])
    assert curve.stopped == "completed"


def test_non_finite_loss_stops_the_test() -> None:
    losses = iter([1.0, 0.9, float("nan"), 0.5])
    curve = range_test(lambda lr: next(losses), lr_schedule(1e-4, 1e-1, 4))
    assert curve.stopped == "non-finite loss" and len(curve.lrs) == 2


def test_rising_loss_falls_back_to_its_minimum() -> None:
    lrs = lr_schedule(1e-5, 1e-1, 5)
    suggestion = suggest_lr(lrs, [1.0, 1.1, 1.2, 1.3, 1.4])
    assert suggestion.rule == FALLBACK_RULE and suggestion.lr == lrs[0]
    assert suggestion.steepest is None
    with pytest.raises(InputError):
        suggest_lr([1e-3], [1.0])


@pytest.mark.parametrize(
    ("start", "end", "steps"), [(0.0, 1.0, 10), (1.0, 0.1, 10), (1e-5, 1.0, 1)]
)
def test_bad_ranges_are_config_errors(start: float, end: float, steps: int) -> None:
    with pytest.raises(ConfigError):
        lr_schedule(start, end, steps)


TINY = {
    "name": "tiny",
    "data": {"phantom": {"studies": 6, "size": 32, "slices": 4}, "image_size": 32, "workers": 0},
    "model": {"name": "resnet18"},
    "train": {"batch_size": 4},
}


def test_lr_find_command_writes_curve_and_leaves_no_run(tmp_path: Path) -> None:
    config = json.loads(json.dumps(TINY))
    config["data"]["cache_dir"] = str(tmp_path / "cache")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "lr"
    result = CliRunner().invoke(
        app,
        ["lr-find", "--config", str(path), "--out", str(out), "--steps", "12", "--end-lr", "1"],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.csv", "lr_find.json", "lr_find.png"]
    record = json.loads((out / "lr_find.json").read_text())
    assert record["start_lr"] <= record["suggested_lr"] <= record["end_lr"] == 1.0
    assert f"suggested lr: {record['suggested_lr']:.2e}" in result.output
    assert f"--set train.lr={record['suggested_lr']:.2e}" in result.output
    with open(out / "lr_find.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == record["steps_run"] <= 12
    lrs = np.array([float(r["lr"]) for r in rows])
    np.testing.assert_allclose(lrs, np.geomspace(1e-7, 1.0, 12)[: len(rows)], rtol=1e-9)
    assert record["suggested_lr"] in lrs
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert (out / "lr_find.png").stat().st_size > 1000
    # Nothing of a training run anywhere: no checkpoint, history or split file.
    leftovers = [p for p in tmp_path.rglob("*") if p.suffix == ".pt" or p.name == "splits.json"]
    assert not leftovers


def _tiny_config(tmp_path: Path, **train):
    from ichseg.config import load_config

    config = json.loads(json.dumps(TINY))
    config["data"]["phantom"]["studies"] = 8
    config["data"]["cache_dir"] = str(tmp_path / "cache")
    config["train"] |= {"epochs": 2, "early_stopping_patience": None, "augment": True} | train
    return load_config(extra=config)


def test_onecycle_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ichseg.engine.checkpoint import load_checkpoint
    from ichseg.engine.loop import state_digest
    from ichseg.engine.train import ClassifierTask, train

    config = _tiny_config(tmp_path, scheduler="onecycle", lr=1e-3)
    train(config, tmp_path / "full", progress=False, evaluate=False)

    start_epoch, loss = ClassifierTask.start_epoch, ClassifierTask.loss

    def record_epoch(self, epoch: int) -> None:
        self.epoch_now, self.batch_now = epoch, 0
        start_epoch(self, epoch)

    def interrupted(self, model, batch, device):
        self.batch_now += 1
        if self.epoch_now == 1 and self.batch_now == 2:
            raise KeyboardInterrupt  # mid-epoch: optimiser and schedule moved on unsaved
        return loss(self, model, batch, device)

    monkeypatch.setattr(ClassifierTask, "start_epoch", record_epoch)
    monkeypatch.setattr(ClassifierTask, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", progress=False, evaluate=False)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 0
    train(config, tmp_path / "killed", resume=True, progress=False, evaluate=False)

    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1
    assert state_digest(a["state_dict"]) == state_digest(b["state_dict"])
    assert a["scheduler"] == b["scheduler"]
    lrs = [row["lr"] for row in a["history"]]
    assert lrs == pytest.approx([row["lr"] for row in b["history"]])
    # It was one cycle, stepped once per batch to its end: up from lr/25 to the peak at 30 %
    # of the steps, then annealed.
    assert a["scheduler"]["total_steps"] == a["scheduler"]["last_epoch"] > 3
    assert a["scheduler"]["_schedule_phases"][0]["end_lr"] == "max_lr"
    assert lrs[0] > 1e-3 / 25 and lrs[0] > lrs[1]

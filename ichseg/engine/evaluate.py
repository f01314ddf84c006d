"""Evaluate a trained run on its held-out split: thresholds from validation, metrics on test."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import RunConfig, validate_config
from ichseg.engine.data import SliceDataset, SliceSet, build_slices, split_by_group
from ichseg.errors import InputError
from ichseg.fileio import atomic_path, write_json


def load_run(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """The config and best checkpoint of a training run folder."""
    from ichseg.engine.train import BEST, load_checkpoint

    run_dir = Path(run_dir)
    checkpoint = run_dir / BEST
    if not checkpoint.exists():
        raise InputError(run_dir, f"not a training run: {BEST} missing")
    state = load_checkpoint(checkpoint)
    return validate_config(state["config"], str(checkpoint)), state


def _predict(model, slices: SliceSet, indices: np.ndarray, targets, config: RunConfig, device):
    from torch.utils.data import DataLoader

    from ichseg.engine.train import predict_probabilities

    loader = DataLoader(SliceDataset(slices, indices, targets), batch_size=64)
    return predict_probabilities(model, loader, device, config.train.amp, config.task.mode)


def evaluate_run(
    run_dir: str | Path,
    *,
    slices: SliceSet | None = None,
    splits: dict[str, np.ndarray] | None = None,
    config: RunConfig | None = None,
    split: str = "test",
    masker=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of the run's best checkpoint on ``split``, written to ``run_dir/eval``.

    Thresholds are chosen on the validation split and stored in ``thresholds.json`` beside the
    checkpoint, so inference uses the same operating point.
    """
    import torch

    from ichseg.engine.metrics import choose_thresholds, evaluate_multiclass, evaluate_multilabel
    from ichseg.engine.report import write_report
    from ichseg.engine.train import build_model

    run_dir = Path(run_dir)
    saved_config, state = load_run(run_dir)
    config = config or saved_config
    if slices is None:
        slices = build_slices(config, masker, progress=progress)
    if splits is None:
        s = config.data.split
        splits = split_by_group(
            slices.groups,
            slices.labels[:, 0] > 0.5,
            s.val_fraction,
            s.test_fraction,
            s.seed,
            s.folds,
            s.fold,
        )
    if len(splits[split]) == 0:
        raise InputError(run_dir, f"the {split} split is empty")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config)
    model.load_state_dict(state["state_dict"])
    model.to(device)
    targets = slices.targets(config.task)
    val_prob = _predict(model, slices, splits["val"], targets, config, device)
    prob = _predict(model, slices, splits[split], targets, config, device)
    idx = splits[split]
    groups = slices.groups[idx]
    series = slices.series[idx]
    names = config.task.class_names
    n_boot, seed = config.eval.n_boot, config.seed
    if config.task.mode == "multilabel":
        thresholds = choose_thresholds(targets[splits["val"]], val_prob, config.eval.threshold_rule)
        metrics = evaluate_multilabel(
            targets[idx],
            prob,
            groups=groups,
            series_ids=series,
            thresholds=thresholds,
            n_boot=n_boot,
            seed=seed,
        )
    else:
        thresholds = np.full(len(names), np.nan)
        metrics = evaluate_multiclass(
            targets[idx], prob, names, groups=groups, n_boot=n_boot, seed=seed
        )
    metrics["split"] = split
    metrics["num_slices"] = int(len(idx))
    metrics["num_patients"] = int(len(np.unique(groups)))
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    write_report(metrics, out, targets[idx], prob, names, config.task.mode)
    _write_predictions(out / f"predictions_{split}.csv", slices, idx, prob, names)
    write_json(
        run_dir / "thresholds.json", dict(zip(names, [float(t) for t in thresholds], strict=True))
    )
    return metrics


def _write_predictions(path: Path, slices: SliceSet, idx: np.ndarray, prob, names) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "patient_id",
                "series_uid",
                "sop_uid",
                "slice_index",
                *names,
                *[f"true_{n}" for n in names],
            ]
        )
        for row, i in enumerate(idx):
            label = slices.labels[i] if len(names) == slices.labels.shape[1] else []
            writer.writerow(
                [
                    slices.groups[i],
                    slices.series[i],
                    slices.sop_uids[i],
                    int(slices.slice_index[i]),
                    *[f"{p:.6f}" for p in prob[row]],
                    *[int(v) for v in label],
                ]
            )

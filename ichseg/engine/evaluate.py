"""Evaluate a trained run: thresholds from validation, then metrics on one split.

The run's own ``splits.json`` decides which patients are in which split, the run's own
preprocessing record and segmenter decide the input, and the best checkpoint is scored through
the same forward path as ``predict``. Thresholds (slice and series) are always chosen on the
validation split and written to ``thresholds.json``; the evaluated split's figures go to
``eval/<split>/``, so a validation report never overwrites the test report. The report ends
with a subgroup analysis (age band, sex, scanner, kernel, slice thickness) read from the scan
attributes the slice cache keeps.

Calibration (``eval.calibration``) is fitted on the validation probabilities and saved as
``calibration.json``; thresholds are chosen on the calibrated validation probabilities, and the
report shows Brier score, expected calibration error and reliability diagrams before and after.
With test-time augmentation (``tta``) the probabilities are averaged over the views, the
thresholds and calibration fitted on them go to ``tta-<name>/`` and the report to
``eval/<split>_<name>/``, so the plain run's files are never replaced by TTA ones.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import RunConfig
from ichseg.engine.cache import SliceSet, build_slices
from ichseg.engine.checkpoint import (
    ARGMAX_RULE,
    BEST,
    CALIBRATION_FILE,
    EVAL_DIR,
    SEGMENTER_FILE,
    SPLITS_FILE,
    THRESHOLDS_FILE,
    Thresholds,
    load_classifier,
    save_thresholds,
    serving_dir,
)
from ichseg.engine.predict import (
    ForwardTimer,
    TestTimeAugmentation,
    default_device,
    precision_used,
)
from ichseg.engine.splits import load_splits
from ichseg.errors import InputError
from ichseg.fileio import atomic_path
from ichseg.volume import SUBTYPES

EVAL_SPLITS = ("val", "test")


def load_run(run_dir: str | Path) -> tuple[RunConfig, Any]:
    """The config and best model of a training run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / BEST).is_file():
        raise InputError(run_dir, f"not a training run ({BEST} missing)")
    config, model, _ = load_classifier(run_dir / BEST)
    return config, model


def run_preprocessor(run_dir: Path, config: RunConfig, segmenter: str | Path | None = None):
    """The run's preprocessor: its own segmenter copy unless another is given."""
    from ichseg.preprocess.pipeline import Preprocessor

    carried = run_dir / SEGMENTER_FILE
    return Preprocessor.from_config(config, segmenter or (carried if carried.is_file() else None))


def split_rows(run_dir: Path, slices: SliceSet) -> dict[str, np.ndarray]:
    """Cache rows of each split, from the run's saved ``splits.json``."""
    usable = slices.usable()
    rows = load_splits(run_dir / SPLITS_FILE, slices.groups[usable])
    return {name: usable[idx] for name, idx in rows.items()}


def predict_rows(
    model,
    slices: SliceSet,
    rows: np.ndarray,
    config: RunConfig,
    tta: TestTimeAugmentation | None = None,
    timer: ForwardTimer | None = None,
) -> np.ndarray:
    """Probabilities of cache rows through the shared forward path (TTA-averaged with ``tta``)."""
    import torch
    from torch.utils.data import DataLoader

    from ichseg.engine.dataset import SliceDataset
    from ichseg.engine.predict import predict_probabilities

    device = default_device()
    model.to(device, memory_format=torch.channels_last)
    dummy = np.zeros(len(slices), dtype=np.float32)
    loader = DataLoader(SliceDataset(slices, rows, dummy), batch_size=64)
    return predict_probabilities(
        model, loader, device, config.train.amp, config.task.mode, tta, timer
    )


@dataclass
class ClassifierScorer:
    """Probabilities of slice-cache rows from a classifier run's best checkpoint."""

    config: RunConfig
    model: Any

    def probabilities(
        self,
        slices: SliceSet,
        rows: np.ndarray,
        tta: TestTimeAugmentation | None = None,
        timer: ForwardTimer | None = None,
    ) -> np.ndarray:
        return predict_rows(self.model, slices, rows, self.config, tta, timer)


def load_scorer(run_dir: str | Path):
    """A classifier or sequence run folder as something that scores slice-cache rows."""
    from ichseg.engine.sequence import is_sequence_run, load_sequence_run

    if is_sequence_run(run_dir):
        return load_sequence_run(run_dir)
    return ClassifierScorer(*load_run(run_dir))


def eval_folder(split: str, tta: TestTimeAugmentation | None) -> str:
    """``<split>`` or ``<split>_<tta name>``: the report folder under ``eval/``."""
    return split if tta is None else f"{split}_{tta.name}"


def choose_run_thresholds(
    config: RunConfig,
    slices: SliceSet,
    rows: np.ndarray,
    prob: np.ndarray,
    calibration: str = "none",
) -> Thresholds:
    """Slice and series thresholds chosen on validation rows (NaN where no rule applies).

    Args:
        config: the run config (rule, aggregation, classes).
        slices: the slice cache.
        rows: validation rows.
        prob: their probabilities, calibrated when the run calibrates (the thresholds then
            apply to calibrated probabilities).
        calibration: the method ``prob`` was calibrated with, recorded in the thresholds.
    """
    from ichseg.metrics import aggregate_by_series, choose_thresholds

    names = config.task.class_names
    truth = slices.labels[rows]
    rule, aggregation = config.eval.threshold_rule, config.eval.aggregation
    slice_thr = (
        choose_thresholds(truth, prob, rule)
        if slices.label_level == "slice"
        else np.full(len(names), np.nan)
    )
    _, series_truth, series_prob = aggregate_by_series(
        truth, prob, slices.series[rows], aggregation
    )
    series_thr = choose_thresholds(series_truth, series_prob, rule)

    def as_dict(values: np.ndarray) -> dict[str, float | None]:
        return {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, values, strict=True)}

    return Thresholds(as_dict(slice_thr), as_dict(series_thr), aggregation, rule, calibration)


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    slices: SliceSet | None = None,
    preprocessor=None,
    segmenter: str | Path | None = None,
    cache_root: Path | None = None,
    progress: bool = True,
    tta: TestTimeAugmentation | None = None,
) -> dict[str, Any]:
    """Metrics of the run's best checkpoint on ``split``, written to ``run_dir/eval/<split>``.

    Args:
        run_dir: a training run folder.
        split: ``"val"`` or ``"test"``.
        slices: the run's cached slices (built from its config when None).
        preprocessor: the run's preprocessor (rebuilt from the run when None).
        segmenter: another U-Net checkpoint than the run's own (changes the input; recorded).
        cache_root: where the slice cache lives.
        progress: progress output while caching.
        tta: average the probabilities (sequence runs: the embeddings) over these views.
    """
    from ichseg.engine.calibrate import calibration_summary, save_calibration
    from ichseg.engine.report import write_report, write_subgroups

    if split not in EVAL_SPLITS:
        raise InputError(None, f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    run_dir = Path(run_dir)
    scorer = load_scorer(run_dir)
    config = scorer.config
    preprocessor = preprocessor or run_preprocessor(run_dir, config, segmenter)
    slices = (
        slices if slices is not None else build_slices(config, preprocessor, cache_root, progress)
    )
    rows = split_rows(run_dir, slices)
    if len(rows[split]) == 0:
        raise InputError(run_dir, f"the {split} split is empty")
    names = config.task.class_names
    timer, started = ForwardTimer(), time.perf_counter()
    val_raw = scorer.probabilities(slices, rows["val"], tta, timer)
    raw = val_raw if split == "val" else scorer.probabilities(slices, rows[split], tta, timer)
    seconds = time.perf_counter() - started
    idx = rows[split]
    calibration, val_prob, prob = _calibrate(config, slices, rows["val"], val_raw, raw, tta)
    metrics, truth, thresholds = score_rows(
        config, slices, rows["val"], val_prob, idx, prob, calibration.method
    )
    serving = thresholds or Thresholds(  # multiclass: labels are the most probable class
        {}, {}, config.eval.aggregation, ARGMAX_RULE, calibration.method
    )
    serving.calibrator = calibration.calibrator.to_dict()
    # Written together, after everything is fitted: predict refuses a calibration that does
    # not match the thresholds beside it.
    folder = serving_dir(run_dir, tta and tta.name)
    save_calibration(calibration, folder / CALIBRATION_FILE)
    save_thresholds(serving, folder / THRESHOLDS_FILE)
    metrics["split"] = split
    metrics["scored_on"] = (
        "test split (held out; scored once)"
        if split == "test"
        else ("validation split (used to choose thresholds and for early stopping: optimistic)")
    )
    series = slices.series[idx]
    evidence = _evidence(config, slices, truth, raw, prob, series, slices.groups[idx])
    metrics["calibration"] = calibration_summary(calibration, evidence, config.eval.n_boot, split)
    metrics["tta"] = _tta_record(tta, timer, seconds)
    # The classifier's (a sequence run's backbone's); "precision" alone is the PPV here.
    metrics["compute_precision"] = precision_used(default_device(), config.train.amp)
    out = run_dir / EVAL_DIR / eval_folder(split, tta)
    sections = []
    if config.eval.subgroups:
        result = split_subgroups(config, slices, idx, truth, prob, thresholds)
        sections.append(write_subgroups(result, out)[1])
    write_report(
        metrics, out, truth, prob, names, config.task.mode, series_ids=series, sections=sections
    )
    write_predictions(out / "predictions.csv", slices, idx, prob, names)
    _write_extras(out, metrics, evidence)
    return metrics


def _calibrate(
    config: RunConfig,
    slices: SliceSet,
    val_rows: np.ndarray,
    val_raw: np.ndarray,
    raw: np.ndarray,
    tta: TestTimeAugmentation | None,
):
    """Fit calibration on validation; return it with the calibrated probabilities."""
    from ichseg.engine.calibrate import fit_run_calibration

    labels = (
        slices.labels[val_rows]
        if config.task.mode == "multilabel"
        else slices.targets(config.task)[val_rows]
    )
    calibration = fit_run_calibration(
        config,
        labels,
        val_raw,
        slices.series[val_rows],
        slices.label_level,
        tta.name if tta is not None else "none",
    )
    return calibration, calibration.apply(val_raw), calibration.apply(raw)


def _evidence(config, slices, truth, raw, prob, series, groups):
    from ichseg.engine.calibrate import CalibrationEvidence

    return CalibrationEvidence(
        truth,
        raw,
        prob,
        series,
        config.task.class_names,
        config.task.mode,
        config.eval.aggregation,
        slices.label_level,
        groups,
    )


def _tta_record(
    tta: TestTimeAugmentation | None, timer: ForwardTimer, seconds: float
) -> dict[str, Any]:
    return {
        **(tta.to_dict() if tta is not None else {"name": "none", "views": 1}),
        **timer.to_dict(),
        "scoring_s": round(seconds, 3),
    }


def _write_extras(out: Path, metrics: dict[str, Any], evidence) -> None:
    """Reliability diagrams, and the calibration and TTA sections appended to report.md."""
    from ichseg.engine.calibrate import calibration_markdown, write_reliability
    from ichseg.fileio import write_text

    names = evidence.names
    write_reliability(out, evidence)
    tta = metrics["tta"]
    if tta["name"] == "none":
        tta_text = "Test-time augmentation: none.\n"
    else:
        tta_text = (
            f"Test-time augmentation: {tta['name']} ({tta['views']} views averaged). Forward "
            f"passes: {tta['forward_plain_s']:.2f} s plain + {tta['forward_tta_added_s']:.2f} s "
            "added by TTA (0 when the embeddings came from the cache).\n"
        )
    report = out / "report.md"
    text = report.read_text() if report.is_file() else ""
    write_text(
        report,
        text.rstrip("\n")
        + "\n\n"
        + calibration_markdown(metrics["calibration"], names)
        + "\n## Test-time augmentation\n\n"
        + tta_text,
    )


def score_rows(
    config: RunConfig,
    slices: SliceSet,
    val_rows: np.ndarray,
    val_prob: np.ndarray,
    rows: np.ndarray,
    prob: np.ndarray,
    calibration: str = "none",
) -> tuple[dict[str, Any], np.ndarray, Thresholds | None]:
    """The ladder's metrics of ``rows``, with thresholds chosen on the validation rows.

    Args:
        config: the run config (task, eval settings, seed of the bootstrap).
        slices: the cached slices.
        val_rows: validation rows and ``val_prob`` their probabilities (thresholds).
        val_prob: see ``val_rows``.
        rows: the scored rows and ``prob`` their probabilities.
        prob: see ``rows``.
        calibration: the method ``val_prob`` and ``prob`` were calibrated with (recorded in
            the thresholds).

    Returns:
        The metrics, the truth of ``rows`` (labels or classes) and the thresholds (None for
        multiclass tasks, which use the most probable class).
    """
    from ichseg.metrics import evaluate_multiclass, evaluate_multilabel

    names = config.task.class_names
    groups, series = slices.groups[rows], slices.series[rows]
    n_boot, seed = config.eval.n_boot, config.seed
    if config.task.mode == "multiclass":
        truth = slices.targets(config.task)[rows]
        metrics = evaluate_multiclass(truth, prob, names, groups=groups, n_boot=n_boot, seed=seed)
        return metrics, truth, None
    thresholds = choose_run_thresholds(config, slices, val_rows, val_prob, calibration)
    metrics = evaluate_multilabel(
        slices.labels[rows],
        prob,
        class_names=names,
        groups=groups,
        series_ids=series,
        thresholds=[_nan(thresholds.slice[n]) for n in names],
        series_thresholds=[_nan(thresholds.series[n]) for n in names],
        aggregation=config.eval.aggregation,
        label_level=slices.label_level,
        n_boot=n_boot,
        seed=seed,
    )
    return metrics, slices.labels[rows], thresholds


def split_subgroups(
    config: RunConfig,
    slices: SliceSet,
    idx: np.ndarray,
    truth: np.ndarray,
    prob: np.ndarray,
    thresholds: Thresholds | None,
) -> dict[str, Any]:
    """Subgroup analysis of the rows ``idx`` (hemorrhage: any) as the config asks for.

    Args:
        config: the run config (``eval.subgroups``, ``eval.subgroup_min_patients``).
        slices: the cached slices with their scan attributes.
        idx: the evaluated rows.
        truth: their labels (multilabel) or classes (multiclass).
        prob: their probabilities.
        thresholds: validation thresholds (multilabel), for sensitivity and specificity.
    """
    from ichseg.metrics.subgroups import (
        SUBGROUP_ATTRIBUTES,
        binary_any,
        subgroup_analysis,
        subgroup_labels,
    )

    names = config.task.class_names
    y, score = binary_any(truth, prob, config.task.mode, names)
    labels = {
        name: subgroup_labels(name, slices.attribute(SUBGROUP_ATTRIBUTES[name])[idx])
        for name in config.eval.subgroups
    }
    return subgroup_analysis(
        y,
        score,
        slices.groups[idx],
        labels,
        series_ids=slices.series[idx],
        label_level=slices.label_level,
        aggregation=config.eval.aggregation,
        threshold=None if thresholds is None else _nan(thresholds.slice.get("any")),
        series_threshold=None if thresholds is None else _nan(thresholds.series.get("any")),
        min_patients=config.eval.subgroup_min_patients,
        n_boot=config.eval.n_boot,
        seed=config.seed,
    )


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def write_predictions(path: Path, slices: SliceSet, idx: np.ndarray, prob, names) -> None:
    """One CSV row per evaluated slice: ids, probabilities and true labels."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["patient_id", "series_uid", "sop_uid", "slice_index", *names]
            + [f"true_{n}" for n in SUBTYPES]
        )
        for row, i in enumerate(idx):
            labels = ["" if np.isnan(v) else int(v) for v in slices.labels[i]]
            writer.writerow(
                [
                    slices.groups[i],
                    slices.series[i],
                    slices.sop_uids[i],
                    int(slices.slice_index[i]),
                    *[f"{p:.6f}" for p in prob[row]],
                    *labels,
                ]
            )

"""Metadata-only baseline: a random forest on scan attributes, never on the image content.

If a forest that sees only who was scanned, where and how (age, sex, manufacturer, kernel,
kVp, slice thickness, ...) predicts hemorrhage well, a CNN can reach the same score through
the same shortcut, and the ladder's numbers say less than they seem to. The baseline uses the
ladder's rows, patient split, metrics and patient-bootstrap intervals: the forest is fitted on
the training split, its hyperparameters are chosen by the validation loss, thresholds come
from validation, and the test split is scored once.

What the features may hold is a judgement about leakage, stated in every report
(:data:`LEAKAGE_NOTE`): only attributes that are constant over a series (or a picture) and
carry no anatomy. The slice's position in its series, the number of slices and any per-slice
pixel statistic are left out: hemorrhage prevalence depends on the level of the slice, and the
fraction of air or bone in a slice locates that level and measures the head, while HU
percentiles see the blood itself. The one image statistic kept is the HU mean and standard
deviation of the series' air voxels: calibration and noise (dose, kernel, scanner).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import RunConfig
from ichseg.engine.cache import SliceSet
from ichseg.errors import InputError
from ichseg.fileio import write_text
from ichseg.metrics import to_jsonable

log = logging.getLogger(__name__)

NUMERIC_FEATURES: tuple[str, ...] = (
    "age",
    "slice_thickness",
    "kvp",
    "tube_current",
    "exposure",
    "window_center",
    "window_width",
    "pixel_spacing",
    "rows",
    "columns",
    "air_hu_mean",
    "air_hu_std",
)
CATEGORICAL_FEATURES: tuple[str, ...] = (
    "sex",
    "manufacturer",
    "model",
    "site",
    "kernel",
    "patient_position",
)
MISSING = "(missing)"

LEAKAGE_NOTE = (
    "Features are scan attributes that are the same for every slice of a series (for pictures: "
    "the demographics table's row): demographics (age, sex), scanner and protocol "
    "(manufacturer, model, site, kernel, kVp, tube current and exposure as the series header "
    "gives them, slice thickness, pixel spacing, matrix size, patient position, the stored "
    "display window) and the HU mean and standard deviation of the series' air voxels "
    "(calibration and noise, no anatomy). Left out because they carry anatomy or the label: "
    "the slice's index or position in its series (hemorrhage prevalence depends on the level), "
    "the number of slices, every per-slice pixel statistic (air or bone fractions locate the "
    "level and measure the head; HU percentiles see blood), per-slice tube current (automatic "
    "exposure control follows each slice's attenuation), and dates, UIDs and ids. Borderline "
    "and kept: stored window centre/width (some scanners derive it from the image) and the "
    "series tube current (it follows head size)."
)

GRID: tuple[dict[str, Any], ...] = tuple(
    {"max_depth": depth, "min_weight_fraction_leaf": leaf}
    for depth in (2, 4, None)
    for leaf in (0.05, 0.01, 0.0)
)
"""Hyperparameters tried, simplest first; ties keep the simpler."""

BASELINE_FILE = "baseline.json"


@dataclass
class Features:
    """The encoded feature matrix of some cache rows.

    Attributes:
        matrix: ``(N, F)`` float64, NaN where a number is missing.
        names: ``F`` column names (``manufacturer=SIEMENS`` for one-hot columns).
        used: attributes that vary on the training rows.
        constant: attributes with one value (or none) on the training rows: left out.
    """

    matrix: np.ndarray
    names: list[str]
    used: list[str]
    constant: list[str]


def _numbers(values: np.ndarray) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _categories(values: np.ndarray) -> np.ndarray:
    return np.array([MISSING if v in (None, "") else str(v) for v in values], dtype=object)


def encode_features(slices: SliceSet, rows: np.ndarray, train: np.ndarray) -> Features:
    """Encode the scan attributes of ``rows``; which attributes and categories from ``train``.

    Args:
        slices: cached slices with their attributes.
        rows: cache rows to encode.
        train: the training rows (decide constant attributes and the one-hot categories).
    """
    columns: list[np.ndarray] = []
    names: list[str] = []
    used: list[str] = []
    constant: list[str] = []
    for name in NUMERIC_FEATURES:
        values = slices.attribute(name)
        train_values = _numbers(values[train])
        distinct = np.unique(np.where(np.isnan(train_values), np.inf, train_values))
        if distinct.size < 2:
            constant.append(name)
            continue
        used.append(name)
        names.append(name)
        columns.append(_numbers(values[rows]))
    for name in CATEGORICAL_FEATURES:
        values = slices.attribute(name)
        categories = sorted(set(_categories(values[train])))
        if len(categories) < 2:
            constant.append(name)
            continue
        used.append(name)
        encoded = _categories(values[rows])
        for category in categories:
            names.append(f"{name}={category}")
            columns.append((encoded == category).astype(np.float64))
    matrix = np.column_stack(columns) if columns else np.zeros((rows.size, 0))
    return Features(matrix, names, used, constant)


class _Constant:
    """The training prevalence for every row (one label only, or no feature varies)."""

    def __init__(self, probability: np.ndarray) -> None:
        self.probability = probability
        self.classes_ = np.arange(probability.size)
        self.feature_importances_ = None

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.tile(self.probability, (len(x), 1))


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of ``x`` (NaN equal to NaN) and the index of each row among them."""
    key = np.where(np.isnan(x), np.inf, x)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return x[first], inverse.ravel()


def fit_forest(
    x: np.ndarray, y: np.ndarray, params: dict[str, Any], n_estimators: int, seed: int
) -> Any:
    """A random forest on ``(x, y)``, with identical rows collapsed into sample weights.

    Every slice of a series has the same features, so a cache of a million slices holds a
    few thousand distinct rows; weighting them by their counts fits the same trees far faster.

    Args:
        x: ``(N, F)`` features (NaN missing).
        y: ``(N,)`` integer labels.
        params: forest hyperparameters (``max_depth``, ``min_weight_fraction_leaf``).
        n_estimators: trees.
        seed: forest seed.
    """
    from sklearn.ensemble import RandomForestClassifier

    classes = np.unique(y)
    if classes.size < 2 or x.shape[1] == 0:
        counts = np.bincount(y.astype(np.int64), minlength=int(y.max()) + 1)
        return _Constant(counts / counts.sum())
    key = np.column_stack([np.where(np.isnan(x), np.inf, x), y])
    _, first, counts = np.unique(key, axis=0, return_index=True, return_counts=True)
    forest = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, **params)
    forest.fit(x[first], y[first], sample_weight=counts.astype(np.float64))
    return forest


def predict_forest(model: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    """``(N, num_classes)`` probabilities; classes the model never saw get 0."""
    distinct, inverse = _unique_rows(x) if len(x) else (x, np.zeros(0, dtype=np.int64))
    out = np.zeros((len(distinct), num_classes))
    if len(distinct):
        out[:, np.asarray(model.classes_, dtype=np.int64)] = model.predict_proba(distinct)
    return out[inverse]


@dataclass
class BaselineResult:
    """What the baseline wrote and found."""

    out_dir: Path
    metrics: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)


def _fit_task(
    x_train: np.ndarray,
    targets: np.ndarray,
    mode: str,
    num_outputs: int,
    params: dict[str, Any],
    n_estimators: int,
    seed: int,
) -> list[Any]:
    """One forest per label (multilabel; rows with an unknown label left out) or one in all."""
    if mode == "multiclass":
        return [fit_forest(x_train, targets.astype(np.int64), params, n_estimators, seed)]
    models = []
    for k in range(num_outputs):
        known = ~np.isnan(targets[:, k])
        if not known.any():
            models.append(_Constant(np.array([0.5, 0.5])))
            continue
        labels = targets[known, k].astype(np.int64)
        models.append(fit_forest(x_train[known], labels, params, n_estimators, seed))
    return models


def _predict_task(models: list[Any], x: np.ndarray, mode: str, num_outputs: int) -> np.ndarray:
    if mode == "multiclass":
        return predict_forest(models[0], x, num_outputs)
    return np.column_stack([predict_forest(m, x, 2)[:, 1] for m in models])


def _validation_loss(truth: np.ndarray, prob: np.ndarray, mode: str) -> float:
    from ichseg.metrics import multiclass_log_loss, rsna_weighted_log_loss

    if mode == "multiclass":
        return multiclass_log_loss(truth.astype(np.int64), prob)
    return rsna_weighted_log_loss(truth, prob)


def metadata_baseline(
    config: RunConfig,
    out_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    segmenter: str | Path | None = None,
    cache_root: Path | None = None,
    n_estimators: int = 300,
    progress: bool = True,
) -> BaselineResult:
    """Fit the metadata forest and score it on the test split; write the report to ``out_dir``.

    Args:
        config: the config whose data, preprocessing (which slices are usable) and split
            define the rows.
        out_dir: output folder: metrics.json, report.md, ROC and confusion PNGs, baseline.json,
            predictions.csv, splits.json.
        run_dir: a training run whose ``splits.json`` (and segmenter) to use; the comparison
            with that run is then on the same patients.
        segmenter: U-Net checkpoint for ``masking.method: unet`` configs.
        cache_root: where the slice cache lives.
        n_estimators: trees per forest.
        progress: progress output while caching.
    """
    from ichseg.engine.cache import build_slices
    from ichseg.engine.evaluate import run_preprocessor, score_rows, write_predictions
    from ichseg.engine.report import write_report
    from ichseg.engine.splits import save_splits
    from ichseg.engine.train import make_splits

    out = Path(out_dir)
    run = Path(run_dir) if run_dir is not None else None
    if run is not None:
        preprocessor = run_preprocessor(run, config, segmenter)
    else:
        from ichseg.preprocess.pipeline import Preprocessor

        preprocessor = Preprocessor.from_config(config, segmenter)
    slices = build_slices(config, preprocessor, cache_root, progress)
    splits = make_splits(config, slices, run)
    for name in ("train", "val", "test"):
        if len(splits[name]) == 0:
            raise InputError(run or out, f"the {name} split is empty")
    mode, names = config.task.mode, config.task.class_names
    targets = slices.targets(config.task)
    order = ("train", "val", "test")
    features = encode_features(slices, np.concatenate([splits[n] for n in order]), splits["train"])
    bounds = np.cumsum([0, *(len(splits[n]) for n in order)])
    encoded = {n: features.matrix[bounds[i] : bounds[i + 1]] for i, n in enumerate(order)}
    train_truth, val_truth = targets[splits["train"]], targets[splits["val"]]

    search = []
    best: tuple[float, int, list[Any], np.ndarray] | None = None
    for i, params in enumerate(GRID):
        models = _fit_task(
            encoded["train"], train_truth, mode, len(names), params, n_estimators, config.seed
        )
        val_prob = _predict_task(models, encoded["val"], mode, len(names))
        loss = _validation_loss(val_truth, val_prob, mode)
        search.append({**params, "val_loss": loss})
        if best is None or (math.isfinite(loss) and loss < best[0] - 1e-9):
            best = (loss, i, models, val_prob)
    assert best is not None
    _, chosen, models, val_prob = best
    test_rows = splits["test"]
    prob = _predict_task(models, encoded["test"], mode, len(names))
    metrics, truth, _ = score_rows(config, slices, splits["val"], val_prob, test_rows, prob)
    metrics["split"] = "test"
    metrics["scored_on"] = (
        "test split (held out; scored once) by a random forest on scan attributes only"
    )
    importances = _importances(models[0], features.names)
    record = {
        "model": "random forest on scan attributes (scikit-learn)",
        "n_estimators": n_estimators,
        "features_used": features.used,
        "features_constant": features.constant,
        "encoded_columns": features.names,
        "grid": search,
        "chosen": {**GRID[chosen], "val_loss": search[chosen]["val_loss"]},
        "selection": "validation loss (RSNA weighted log loss; multiclass: log loss)",
        "importances": importances,
        "importances_of": names[0] if mode == "multilabel" else "all classes",
        "splits_from": str(run / "splits.json") if run is not None else "config data.split",
        "n_rows": {name: int(len(rows)) for name, rows in splits.items()},
        "leakage": LEAKAGE_NOTE,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_splits(splits, slices.groups, out / "splits.json")
    write_text(out / BASELINE_FILE, json.dumps(to_jsonable(record), indent=1) + "\n")
    write_report(
        metrics,
        out,
        truth,
        prob,
        names,
        mode,
        series_ids=slices.series[test_rows],
        sections=[baseline_markdown(record)],
    )
    write_predictions(out / "predictions.csv", slices, test_rows, prob, names)
    return BaselineResult(out, metrics, record)


def _importances(model: Any, names: list[str]) -> dict[str, float]:
    values = getattr(model, "feature_importances_", None)
    if values is None:
        return {}
    order = np.argsort(values)[::-1]
    return {names[i]: float(values[i]) for i in order if values[i] > 0}


def baseline_markdown(record: dict[str, Any]) -> str:
    """The baseline's section of report.md: features, the search, importances, leakage."""
    from ichseg.engine.report import _fmt, _table

    chosen = record["chosen"]
    lines = [
        "## Metadata-only baseline",
        "",
        f"Random forest ({record['n_estimators']} trees) on scan attributes only, fitted on the "
        f"training split; hyperparameters chosen by the {record['selection']} on validation: "
        f"max_depth {chosen['max_depth']}, min_weight_fraction_leaf "
        f"{chosen['min_weight_fraction_leaf']}. Splits: {record['splits_from']}.",
        "",
        f"Features that vary on the training split: {', '.join(record['features_used']) or 'none'}"
        f". Constant (left out): {', '.join(record['features_constant']) or 'none'}.",
        "",
        record["leakage"],
        "",
        "### Hyperparameter search (validation)",
        "",
    ]
    rows = [
        [str(r["max_depth"]), str(r["min_weight_fraction_leaf"]), _fmt(r["val_loss"], 4)]
        for r in record["grid"]
    ]
    lines += _table(["max_depth", "min_weight_fraction_leaf", "val loss"], rows) + [""]
    if record["importances"]:
        top = list(record["importances"].items())[:10]
        lines += [f"### Feature importances ({record['importances_of']})", ""]
        lines += _table(["column", "importance"], [[k, _fmt(v)] for k, v in top]) + [""]
    return "\n".join(lines)

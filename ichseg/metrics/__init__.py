"""Evaluation metrics as pure functions over numpy arrays, one concept per module.

``auroc`` / ``average_precision`` / ``roc_curve`` (:mod:`.auroc`), ``rsna_weighted_log_loss``
(:mod:`.logloss`), thresholds (:mod:`.thresholds`), series aggregation (:mod:`.series`),
multiclass metrics (:mod:`.multiclass`), patient-level bootstrap (:mod:`.bootstrap`), paired
comparisons (:mod:`.compare`), calibration (:mod:`.calibration`) and the full evaluations that
combine them (:mod:`.evaluation`).
"""

from ichseg.metrics._base import nanmean, to_jsonable
from ichseg.metrics.auroc import auroc, average_precision, roc_curve
from ichseg.metrics.bootstrap import bootstrap_ci, bootstrap_distribution, mean_ci
from ichseg.metrics.evaluation import evaluate_multiclass, evaluate_multilabel
from ichseg.metrics.logloss import LOG_LOSS_EPS, multiclass_log_loss, rsna_weighted_log_loss
from ichseg.metrics.multiclass import multiclass_confusion, multiclass_metrics
from ichseg.metrics.series import aggregate_by_series, aggregate_probabilities
from ichseg.metrics.thresholds import (
    choose_thresholds,
    classification_report,
    confusion_matrices,
    threshold_metrics,
)

__all__ = [
    "LOG_LOSS_EPS",
    "aggregate_by_series",
    "aggregate_probabilities",
    "auroc",
    "average_precision",
    "bootstrap_ci",
    "bootstrap_distribution",
    "choose_thresholds",
    "classification_report",
    "confusion_matrices",
    "evaluate_multiclass",
    "evaluate_multilabel",
    "mean_ci",
    "multiclass_confusion",
    "multiclass_log_loss",
    "multiclass_metrics",
    "nanmean",
    "roc_curve",
    "rsna_weighted_log_loss",
    "threshold_metrics",
    "to_jsonable",
]

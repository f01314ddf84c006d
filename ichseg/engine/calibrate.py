"""A run's probability calibration: fitted on validation, saved as ``calibration.json``, applied
by ``evaluate``, ``predict`` and the bundle, and measured before and after.

One map (:class:`~ichseg.metrics.calibration.Calibrator`: a temperature per class, or isotonic)
is applied to slice probabilities; a series probability is then aggregated from the calibrated
slices by the run's rule. The map is fitted on what the labels describe:

- slice labels: on the validation slices;
- scan-level labels (copied to every slice): on the validation series probabilities
  (aggregated by ``max``) against the series labels. Applying a monotone per-class map to the
  slices and then taking the maximum equals applying it to the maximum, so the series output is
  exactly the calibrated series probability. With ``mean``/``topK`` this does not hold, and no
  calibration is fitted (the file says why).

Operating thresholds are chosen on the calibrated validation probabilities. Temperature
scaling and isotonic maps are monotone, so rankings (AUROC) within a class do not change
(isotonic maps may tie nearby scores); the log loss, Brier score and calibration error do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import RunConfig
from ichseg.errors import InputError
from ichseg.fileio import save_figure, write_json
from ichseg.metrics.calibration import (
    Calibrator,
    brier_score,
    expected_calibration_error,
    reliability_curve,
    reliability_figure,
)
from ichseg.metrics.series import aggregate_by_series

ECE_BINS = 15
"""Equal-width bins of every reported expected calibration error."""


@dataclass
class RunCalibration:
    """The calibration map of a run and where it came from.

    Attributes:
        calibrator: the fitted map (``method`` ``"none"`` is the identity).
        level: ``"slice"`` or ``"series"``: the labels it was fitted on.
        fitted_on: description of the data, e.g. ``"validation split (412 slices)"``.
        tta: name of the test-time augmentation the validation probabilities were made with.
        note: why no map was fitted, when none was.
    """

    calibrator: Calibrator
    level: str = "slice"
    fitted_on: str = "validation split"
    tta: str = "none"
    note: str = ""

    @property
    def method(self) -> str:
        return self.calibrator.method

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """Calibrated slice probabilities ``(N, K)`` float32 (NaN rows stay NaN)."""
        p = np.asarray(probabilities, dtype=np.float64)
        if self.calibrator.method == "none" or p.size == 0:
            return p.astype(np.float32)
        out = np.full_like(p, np.nan)
        finite = np.isfinite(p).all(axis=1)
        if finite.any():
            out[finite] = self.calibrator.apply(p[finite])
        return out.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.calibrator.method,
            "level": self.level,
            "fitted_on": self.fitted_on,
            "tta": self.tta,
            "note": self.note,
            "applied_to": "slice probabilities; series probabilities aggregate calibrated slices",
            "calibrator": self.calibrator.to_dict(),
        }

    @classmethod
    def identity(cls, n_classes: int, task: str, note: str = "") -> RunCalibration:
        return cls(Calibrator.identity(n_classes, task), note=note)


def fit_run_calibration(
    config: RunConfig,
    labels: np.ndarray,
    probabilities: np.ndarray,
    series_ids: np.ndarray,
    label_level: str,
    tta: str = "none",
) -> RunCalibration:
    """Fit ``config.eval.calibration`` on validation probabilities.

    Args:
        config: the run config (task mode, aggregation, method).
        labels: validation targets: ``(N, K)`` 0/1/NaN (multilabel) or ``(N,)`` class indices.
        probabilities: ``(N, K)`` uncalibrated validation probabilities.
        series_ids: ``(N,)`` series of each row (for scan-level labels).
        label_level: ``"slice"`` or ``"series"``.
        tta: name of the TTA the probabilities were made with (recorded).
    """
    method = config.eval.calibration
    task = config.task.mode
    k = probabilities.shape[1]
    if method == "none":
        return RunCalibration(Calibrator.identity(k, task), tta=tta, note="eval.calibration none")
    if task == "multilabel" and label_level == "series":
        if config.eval.aggregation != "max":
            return RunCalibration(
                Calibrator.identity(k, task),
                level="series",
                tta=tta,
                note=(
                    "scan-level labels with aggregation "
                    f"{config.eval.aggregation!r}: a slice map is exact for series only with max"
                ),
            )
        _, series_labels, series_prob = aggregate_by_series(
            labels, probabilities, series_ids, "max"
        )
        calibrator = Calibrator.fit(series_labels, series_prob, method, task)
        return RunCalibration(
            calibrator,
            level="series",
            fitted_on=f"validation split ({len(series_labels)} series, maximum over slices)",
            tta=tta,
        )
    calibrator = Calibrator.fit(labels, probabilities, method, task)
    return RunCalibration(
        calibrator, fitted_on=f"validation split ({len(probabilities)} slices)", tta=tta
    )


def save_calibration(calibration: RunCalibration, path: str | Path) -> Path:
    return write_json(path, calibration.to_dict())


def load_calibration(path: str | Path, class_names: list[str], task: str) -> RunCalibration:
    """Read ``calibration.json``; the identity when the file does not exist (older runs).

    Raises:
        InputError: a malformed file, or one fitted for other classes, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        return RunCalibration.identity(len(class_names), task, note=f"no {path.name}")
    try:
        data = json.loads(path.read_text())
        calibrator = Calibrator.from_dict(data["calibrator"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(path, f"not a valid calibration file ({reason})") from None
    if calibrator.n_classes != len(class_names) or calibrator.task != task:
        raise InputError(
            path,
            f"calibration for {calibrator.n_classes} {calibrator.task} classes does not fit "
            f"the model's {len(class_names)} {task} classes",
        )
    return RunCalibration(
        calibrator,
        level=str(data.get("level", "slice")),
        fitted_on=str(data.get("fitted_on", "validation split")),
        tta=str(data.get("tta", "none")),
        note=str(data.get("note", "")),
    )


def serving_calibration(
    path: str | Path, thresholds: Any, class_names: list[str], task: str
) -> RunCalibration:
    """The calibration that goes with a model's thresholds.

    ``calibration.json`` when present; else the copy the thresholds carry; else the identity
    (runs evaluated before calibration existed, whose thresholds are on raw probabilities).

    Args:
        path: the ``calibration.json`` beside the thresholds.
        thresholds: the loaded :class:`~ichseg.engine.checkpoint.Thresholds`.
        class_names: the model's classes.
        task: ``"multilabel"`` or ``"multiclass"``.

    Raises:
        InputError: a malformed file, or thresholds chosen under another calibration.
    """
    path = Path(path)
    if path.is_file():
        calibration = load_calibration(path, class_names, task)
    elif thresholds.calibrator is not None:
        try:
            calibrator = Calibrator.from_dict(thresholds.calibrator)
        except ValueError as error:
            raise InputError(
                path.with_name("thresholds.json"), f"bad calibrator ({error})"
            ) from None
        calibration = RunCalibration(calibrator, note=f"from thresholds.json ({path.name} missing)")
    else:
        calibration = RunCalibration.identity(len(class_names), task, note=f"no {path.name}")
    same_map = (
        thresholds.calibrator is None or thresholds.calibrator == calibration.calibrator.to_dict()
    )
    if thresholds.calibration != calibration.method or not same_map:
        raise InputError(
            path,
            f"does not match the thresholds beside it (chosen on {thresholds.calibration}-"
            f"calibrated probabilities, this is {calibration.method!r}); re-run `ichseg evaluate`",
        )
    return calibration


def _measures(labels: np.ndarray, probabilities: np.ndarray, names: list[str]) -> dict[str, Any]:
    brier = brier_score(labels, probabilities)
    ece = expected_calibration_error(labels, probabilities, ECE_BINS)

    def per_class(values: np.ndarray) -> dict[str, float | None]:
        return {
            n: (None if not math.isfinite(v) else float(v))
            for n, v in zip(names, values, strict=True)
        }

    def mean(values: np.ndarray) -> float | None:
        value = _finite_mean(values)
        return value if math.isfinite(value) else None

    return {
        "brier": per_class(brier),
        "ece": per_class(ece),
        "mean_brier": mean(brier),
        "mean_ece": mean(ece),
    }


def _finite_mean(values: np.ndarray) -> float:
    """Mean over the classes that have a value (NaN when none has)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


@dataclass
class CalibrationEvidence:
    """Probabilities of evaluated rows before and after calibration, with their labels.

    Attributes:
        labels: targets (layout as :func:`fit_run_calibration`).
        raw: ``(N, K)`` uncalibrated probabilities.
        calibrated: ``(N, K)`` calibrated probabilities.
        series_ids: ``(N,)`` series of each row.
        names: class names.
        task: ``"multilabel"`` or ``"multiclass"``.
        aggregation: the run's series rule.
        label_level: ``"slice"`` or ``"series"`` (slice measures only for slice labels).
        groups: ``(N,)`` patient of each row: the units the interval of the ECE change
            resamples (slices of one patient are correlated); None: no interval.
    """

    labels: np.ndarray
    raw: np.ndarray
    calibrated: np.ndarray
    series_ids: np.ndarray
    names: list[str]
    task: str
    aggregation: str
    label_level: str
    groups: np.ndarray | None = None

    def levels(self) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
        """``(level, labels, before, after)`` for slices (slice labels) and series (multilabel)."""
        return [level[:4] for level in self.levels_with_groups()]

    def levels_with_groups(
        self,
    ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        """:meth:`levels` with the patient of each row (None when ``groups`` is)."""
        out = []
        if self.task == "multiclass" or self.label_level == "slice":
            out.append(("slices", self.labels, self.raw, self.calibrated, self.groups))
        if self.task == "multilabel":
            rule, ids = self.aggregation, self.series_ids
            series, labels, before = aggregate_by_series(self.labels, self.raw, ids, rule)
            _, _, after = aggregate_by_series(self.labels, self.calibrated, ids, rule)
            groups = None
            if self.groups is not None:
                patient_of = dict(zip(ids, self.groups, strict=True))
                groups = np.array([patient_of[s] for s in series])
            out.append(("series", labels, before, after, groups))
        return out


def mean_ece_change(
    labels: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    groups: np.ndarray | None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean ECE over classes after calibration minus before, on the same rows, with a 95 %
    interval from the paired patient-level bootstrap of ``ichseg.metrics.compare`` (both ECEs
    on each resample).

    The interval is the basic (reflected) bootstrap interval: ECE is biased upwards on
    resamples, whose duplicated patients behave like a smaller sample, and more so for the
    better calibrated probabilities, so the resampled changes sit above the estimate and their
    plain percentile interval is shifted by that bias; reflecting them about the estimate
    shifts it back (when the bias exceeds the spread, neither interval holds the raw estimate,
    itself biased). The calibration map is held fixed: the interval covers the sampling of the
    scored patients, not the fit on validation.

    Args:
        labels: the rows' labels (any layout of :func:`expected_calibration_error`).
        before: ``(N, K)`` probabilities before calibration.
        after: ``(N, K)`` probabilities after calibration.
        groups: ``(N,)`` patient of each row; None gives no interval.
        n_boot: bootstrap resamples (0: no interval).
        seed: random seed.
    """
    from ichseg.metrics.compare import paired_bootstrap

    value = _mean_ece(labels, after) - _mean_ece(labels, before)
    record: dict[str, Any] = {
        "value": value if math.isfinite(value) else None,
        "ci_low": None,
        "ci_high": None,
        "p_value": None,
        "interval": None,
        "resampled": None,
        "n_boot": 0,
        "n_valid": 0,
    }
    if groups is None or n_boot < 1 or not math.isfinite(value):
        return record
    paired = paired_bootstrap(_mean_ece, labels, before, after, groups, n_boot, seed, 0.05, "basic")

    def finite(number: float) -> float | None:
        return float(number) if math.isfinite(number) else None

    return record | {
        "ci_low": finite(paired.ci_low),
        "ci_high": finite(paired.ci_high),
        "p_value": finite(paired.p_value),
        "interval": "basic bootstrap",
        "resampled": "patients",
        "n_boot": paired.n_boot,
        "n_valid": paired.n_valid,
    }


def _mean_ece(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return _finite_mean(expected_calibration_error(labels, probabilities, ECE_BINS))


def calibration_summary(
    calibration: RunCalibration,
    evidence: CalibrationEvidence,
    n_boot: int = 1000,
    split: str = "test",
) -> dict[str, Any]:
    """Brier score and ECE per class before and after calibration, slices and series, and the
    paired change of the mean ECE with its patient-level interval (:func:`mean_ece_change`).

    Args:
        calibration: the run's calibration (method and provenance are recorded).
        evidence: the evaluated rows' labels and probabilities.
        n_boot: bootstrap resamples of the ECE change's interval.
        split: the split the evidence comes from (``"val"``: the map was fitted on these very
            patients, which the report says).
    """
    summary: dict[str, Any] = {
        "method": calibration.method,
        "level": calibration.level,
        "fitted_on": calibration.fitted_on,
        "tta": calibration.tta,
        "note": calibration.note,
        "ece_bins": ECE_BINS,
        "scored_split": split,
    }
    for level, labels, before, after, groups in evidence.levels_with_groups():
        summary[level] = {
            "before": _measures(labels, before, evidence.names),
            "after": _measures(labels, after, evidence.names),
            "mean_ece_change": mean_ece_change(labels, before, after, groups, n_boot),
        }
    if "series" in summary:
        summary["series"]["aggregation"] = evidence.aggregation
    return summary


def write_reliability(out_dir: Path, evidence: CalibrationEvidence) -> list[Path]:
    """``reliability.png`` (slices) and ``reliability_series.png``: before and after, per class."""
    paths = []
    for level, labels, before, after in evidence.levels():
        figure = reliability_figure(
            reliability_curve(labels, before, ECE_BINS),
            reliability_curve(labels, after, ECE_BINS),
            evidence.names,
        )
        name = "reliability.png" if level == "slices" else "reliability_series.png"
        paths.append(save_figure(figure, out_dir / name))
    return paths


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def calibration_markdown(summary: dict[str, Any], names: list[str]) -> str:
    """A report section: Brier score and ECE per class, before and after calibration."""
    lines = [
        "## Calibration",
        "",
        f"Method: {summary['method']} (fitted on the {summary['fitted_on']}, "
        f"{summary['level']} labels, TTA {summary['tta']}); applied to slice probabilities, "
        "series probabilities aggregate the calibrated slices. Operating thresholds were chosen "
        "on the calibrated validation probabilities."
        + (f" Note: {summary['note']}." if summary.get("note") else ""),
        f"ECE: expected calibration error, {summary['ece_bins']} equal-width bins "
        "(lower is better; biased upwards on small samples). Brier: mean squared error.",
        "",
    ]
    for level in ("slices", "series"):
        part = summary.get(level)
        if not part:
            continue
        before, after = part["before"], part["after"]
        lines += [
            f"### {level.capitalize()}",
            "",
            "| class | Brier before | Brier after | ECE before | ECE after |",
            "|---|---|---|---|---|",
        ]
        for name in names:
            lines.append(
                f"| {name} | {_fmt(before['brier'][name])} | {_fmt(after['brier'][name])} | "
                f"{_fmt(before['ece'][name])} | {_fmt(after['ece'][name])} |"
            )
        lines.append(
            f"| mean | {_fmt(before['mean_brier'])} | {_fmt(after['mean_brier'])} | "
            f"{_fmt(before['mean_ece'])} | {_fmt(after['mean_ece'])} |"
        )
        change = _ece_change_sentence(part.get("mean_ece_change"), summary.get("scored_split"))
        lines += ["", change, ""]
    return "\n".join(lines) + "\n"


def _ece_change_sentence(change: dict[str, Any] | None, split: str | None) -> str:
    if not change or change.get("value") is None:
        return "Mean ECE change: n/a."
    text = f"Mean ECE change (after - before, same rows): {change['value']:+.4f}"
    if change.get("ci_low") is None:
        return text + " (no interval)."
    p_value = change.get("p_value")
    split_name = {"val": "validation", "test": "test"}.get(split or "", split or "scored")
    in_sample = (
        " In-sample: the calibration was fitted on these validation patients."
        if split == "val"
        else ""
    )
    return (
        text
        + f", 95 % CI [{change['ci_low']:+.4f}, {change['ci_high']:+.4f}]"
        + (f", p = {p_value:.3g}" if p_value is not None else "")
        + f" ({change.get('interval') or 'bootstrap'} interval, {change['n_valid']} of "
        f"{change['n_boot']} resamples of the {split_name} {change['resampled']}; the "
        f"calibration map is held fixed).{in_sample}"
    )

"""Evaluation reports on disk: metrics.json, report.md, ROC curves and confusion matrices.

Figures come from :func:`ichseg.fileio.new_figure` (no pyplot state, no display). Every file is
written to a temporary sibling and moved into place, so a crash never leaves a half-written
report next to a valid one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.fileio import atomic_path, new_figure, save_figure
from ichseg.metrics import aggregate_by_series, roc_curve, to_jsonable
from ichseg.metrics._base import has_both_labels
from ichseg.metrics.auroc import SCORE_INTERVAL, score_mark

TASKS: tuple[str, ...] = ("multilabel", "multiclass")


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def _fmt_ci(value: Any, ci: Sequence[Any] | None) -> str:
    text = _fmt(value)
    if ci and all(c is not None for c in ci):
        text += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _class_table(per_class: dict[str, Any]) -> list[str]:
    header = ["class", "n+", "n known", "AUROC", "AP", "sens", "spec", "F1", "threshold"]
    rows = [
        [
            name,
            _fmt(m.get("n_positive")),
            _fmt(m.get("n_known")),
            _fmt(m.get("auroc")),
            _fmt(m.get("ap")),
            _fmt(m.get("sensitivity")),
            _fmt(m.get("specificity")),
            _fmt(m.get("f1")),
            _fmt(m.get("threshold")),
        ]
        for name, m in per_class.items()
    ]
    return _table(header, rows)


def _markdown(metrics: dict[str, Any], task: str) -> str:
    ci = metrics.get("ci", {})
    boot = metrics.get("bootstrap", {})
    level = int(round(100 * (1 - boot.get("alpha", 0.05))))
    split = metrics.get("split", "n/a")
    lines = [f"# Evaluation report: {split} split ({task})", ""]
    if metrics.get("scored_on"):
        lines += [f"Scored on: {metrics['scored_on']}.", ""]
    lines += [
        f"Slices: {metrics.get('n_slices', 'n/a')}; series: {metrics.get('n_series', 'n/a')}; "
        f"patients: {metrics.get('n_patients', 'n/a')}.",
        "",
    ]
    if boot:
        dropped = {k: v for k, v in boot.get("dropped", {}).items() if v}
        note = f" Resamples without a value (dropped): {dropped}." if dropped else ""
        if boot.get("score_intervals"):
            note += (
                f" {', '.join(boot['score_intervals'])}: the bootstrap interval reached 1 (or "
                "0), where a percentile bootstrap is unreliable; shown is its union with "
                "Newcombe's score interval over the patients."
            )
        lines += [
            f"Intervals: {level} % percentile bootstrap over {boot.get('n_units')} patients "
            f"({boot.get('n_boot')} resamples, seed {boot.get('seed')}); they cover test-patient "
            f"sampling for this one trained model, not training-seed variation.{note}",
            "",
        ]
    if task == "multilabel":
        lines += [
            "Macro averages are over a fixed class set: "
            f"{', '.join(metrics.get('macro_classes') or []) or 'none'} "
            "(the classes with both labels on this split).",
            (
                "Thresholds: chosen on the validation split; series probability = "
                f"{metrics.get('aggregation', 'max')} over slices, with its own thresholds "
                "chosen on validation series."
                if metrics.get("threshold_source") == "validation"
                else "Thresholds: 0.5, none chosen on validation data; series probability = "
                f"{metrics.get('aggregation', 'max')} over slices."
            ),
            "",
        ]
        summary = []
        if metrics.get("label_level") == "slice":
            lines += ["## Slices", ""] + _class_table(metrics.get("per_class") or {}) + [""]
            summary += [
                ["AUROC (any)", _fmt_ci(metrics.get("auroc_any"), ci.get("auroc_any"))],
                ["macro AUROC", _fmt_ci(metrics.get("macro_auroc"), ci.get("macro_auroc"))],
                [
                    "weighted log loss",
                    _fmt_ci(metrics.get("weighted_log_loss"), ci.get("weighted_log_loss")),
                ],
                ["accuracy (any)", _fmt(metrics.get("accuracy"))],
            ]
        else:
            lines += [
                "Labels are per scan (copied to every slice), so slice metrics are not reported.",
                "",
            ]
        lines += ["## Series", ""] + _class_table(metrics.get("series_per_class") or {}) + [""]
        summary += [
            [
                "series AUROC (any)",
                _fmt_ci(metrics.get("series_auroc_any"), ci.get("series_auroc_any")),
            ],
            [
                "series macro AUROC",
                _fmt_ci(metrics.get("series_macro_auroc"), ci.get("series_macro_auroc")),
            ],
            [
                "series weighted log loss",
                _fmt_ci(
                    metrics.get("series_weighted_log_loss"), ci.get("series_weighted_log_loss")
                ),
            ],
        ]
        lines += ["## Summary", ""]
    else:
        header = ["class", "support", "AUROC", "precision", "recall", "F1"]
        rows = [
            [
                name,
                _fmt(m.get("support")),
                _fmt(m.get("auroc")),
                _fmt(m.get("precision")),
                _fmt(m.get("recall")),
                _fmt(m.get("f1")),
            ]
            for name, m in metrics.get("per_class", {}).items()
        ]
        lines += _table(header, rows) + ["", "## Summary", ""]
        summary = [
            ["accuracy", _fmt_ci(metrics.get("accuracy"), ci.get("accuracy"))],
            ["macro AUROC", _fmt_ci(metrics.get("macro_auroc"), ci.get("macro_auroc"))],
            ["log loss", _fmt_ci(metrics.get("log_loss"), ci.get("log_loss"))],
            ["macro F1", _fmt(metrics.get("macro_f1"))],
        ]
    lines += _table(["metric", f"value [{level} % CI]"], summary)
    return "\n".join(lines) + "\n"


def _roc_figure(
    y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str], aucs: Sequence[Any]
) -> Any:
    fig = new_figure(figsize=(6, 6))
    ax = fig.add_subplot()
    for k, name in enumerate(class_names):
        if not has_both_labels(y_true[:, k]):
            continue  # no ROC curve without both label values
        fpr, tpr, _ = roc_curve(y_true[:, k], y_prob[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {_fmt(aucs[k])})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("ROC curves")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _draw_matrix(ax: Any, matrix: np.ndarray, labels: Sequence[str], title: str) -> None:
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(ticks, labels, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize="medium")
    high = matrix.max() if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if high and count > high / 2 else "black"
        ax.text(j, i, str(int(count)), ha="center", va="center", color=color, fontsize="small")


def _confusion_figure(metrics: dict[str, Any], class_names: Sequence[str], task: str) -> Any:
    if task == "multiclass":
        k = len(class_names)
        fig = new_figure(figsize=(1.0 + 0.8 * k, 1.0 + 0.8 * k))
        matrix = np.asarray(metrics.get("confusion", np.zeros((k, k))), dtype=np.int64)
        _draw_matrix(fig.add_subplot(), matrix, class_names, "confusion matrix")
        return fig
    cols = min(3, len(class_names))
    rows = math.ceil(len(class_names) / cols)
    fig = new_figure(figsize=(3.2 * cols, 3.0 * rows), layout="constrained")
    per_class = metrics.get("per_class") or metrics.get("series_per_class") or {}
    for k, name in enumerate(class_names):
        m = per_class.get(name, {})
        matrix = np.asarray(m.get("confusion", np.zeros((2, 2))), dtype=np.int64)
        title = f"{name} (t={_fmt(m.get('threshold'), 2)})"
        _draw_matrix(fig.add_subplot(rows, cols, k + 1), matrix, ["neg", "pos"], title)
    return fig


def write_report(
    metrics: dict[str, Any],
    out_dir: str | Path,
    y_true: Any,
    y_prob: Any,
    class_names: Sequence[str],
    task: str,
    series_ids: Any = None,
    sections: Sequence[str] = (),
) -> list[Path]:
    """Write metrics.json, report.md, roc_curves.png and confusion_matrices.png.

    Args:
        metrics: output of ``evaluate_multilabel`` or ``evaluate_multiclass``.
        out_dir: folder, created when missing.
        y_true: ``(N, K)`` labels (multilabel; NaN unknown) or ``(N,)`` class indices.
        y_prob: ``(N, K)`` probabilities.
        class_names: ``K`` names.
        task: ``"multilabel"`` or ``"multiclass"``.
        series_ids: ``(N,)`` series of each row; with scan-level labels the ROC curves are
            drawn for series (aggregated as the metrics say).
        sections: further markdown sections appended to report.md (subgroups, baselines).

    Returns:
        The written paths, in the order above.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prob = np.asarray(y_prob, dtype=np.float64)
    if task == "multiclass":
        truth = np.eye(prob.shape[1])[np.asarray(y_true, dtype=np.int64)]
    else:
        truth = np.asarray(y_true, dtype=np.float64).reshape(prob.shape)
    names = list(class_names)
    per_class = metrics.get("per_class") or {}
    if task == "multilabel" and metrics.get("label_level") == "series" and series_ids is not None:
        _, truth, prob = aggregate_by_series(
            truth, prob, series_ids, metrics.get("aggregation", "max")
        )
        per_class = metrics.get("series_per_class") or {}
    aucs = [per_class.get(name, {}).get("auroc") for name in names]

    paths = [out / n for n in ("metrics.json", "report.md", "roc_curves.png")]
    paths.append(out / "confusion_matrices.png")
    text = json.dumps(to_jsonable(metrics), indent=2, allow_nan=False)
    _atomic_write(paths[0], (text + "\n").encode())
    text_md = "\n".join([_markdown(metrics, task), *sections])
    _atomic_write(paths[1], text_md.encode())
    save_figure(_roc_figure(truth, prob, names, aucs), paths[2], dpi=120, bbox_inches="tight")
    save_figure(_confusion_figure(metrics, names, task), paths[3], dpi=120, bbox_inches="tight")
    return paths


def _group_label(variable: str, entry: dict[str, Any]) -> str:
    return f"{variable.replace('_', ' ')}: {entry['group']}"


def subgroup_markdown(result: dict[str, Any]) -> str:
    """The subgroup section of report.md from :func:`ichseg.metrics.subgroups.subgroup_analysis`."""
    boot = result.get("bootstrap", {})
    level = _ci_level(result)
    headline = "slice" if result.get("level") == "slice" else "series"
    lines = [
        "## Subgroups",
        "",
        f"AUROC (any) per {headline} in each subgroup, with {level} % percentile bootstrap "
        f"intervals over the subgroup's patients ({boot.get('n_boot')} resamples); sensitivity "
        "and specificity at the validation threshold. Groups with fewer than "
        f"{result.get('min_patients')} patients are listed as too small, without figures. "
        "Intervals are per group, not corrected for the number of groups compared; a patient "
        "with scans in two groups counts in both. Where the bootstrap interval reaches 1 (or "
        "0), as for a perfectly separated group, the interval is its union with Newcombe's "
        "score interval over the group's patients (marked †). Figure: subgroups.png.",
        "",
    ]
    overall = result.get("overall", {})
    lines += [
        f"All patients: AUROC {_subgroup_ci(overall)}, {overall.get('n_patients')} patients.",
        "",
    ]
    header = ["group", "patients (+)", "slices", "AUROC [CI]", "sens", "spec", "status"]
    with_series = headline == "slice" and any(
        "series" in entry for entries in result.get("variables", {}).values() for entry in entries
    )
    if with_series:
        header.insert(4, "series AUROC [CI]")
    for variable, entries in result.get("variables", {}).items():
        rows = []
        for entry in entries:
            scored = entry.get("status") != "too small"
            row = [
                str(entry["group"]),
                f"{entry['n_patients']} ({entry['n_positive_patients']})",
                str(entry["n_slices"]),
                _subgroup_ci(entry) if scored else "",
                _fmt(entry.get("sensitivity")) if scored else "",
                _fmt(entry.get("specificity")) if scored else "",
                str(entry.get("status")),
            ]
            if with_series:
                series = entry.get("series") or {}
                row.insert(4, _subgroup_ci(series) if scored else "")
            rows.append(row)
        lines += [f"### {variable.replace('_', ' ')}", ""] + _table(header, rows) + [""]
    return "\n".join(lines)


def _subgroup_ci(entry: dict[str, Any]) -> str:
    return _fmt_ci(entry.get("auroc"), entry.get("ci")) + score_mark(entry.get("ci_method"))


def forest_figure(result: dict[str, Any]) -> Any:
    """AUROC (any) with its interval per subgroup; the whole split as a reference line."""
    entries = [
        (variable, entry)
        for variable, group in result.get("variables", {}).items()
        for entry in group
    ]
    overall = result.get("overall", {}).get("auroc")
    lows = [
        entry["ci"][0]
        for _, entry in entries
        if entry.get("status") == "ok" and (entry.get("ci") or [None])[0] is not None
    ]
    left = min([0.5, *lows, *([overall] if overall is not None else [])]) - 0.02
    fig = new_figure(figsize=(7.5, 1.4 + 0.32 * max(len(entries), 1)))
    ax = fig.add_subplot()
    labels, previous = [], None
    for row, (variable, entry) in enumerate(entries):
        y = len(entries) - 1 - row
        if previous is not None and variable != previous:
            ax.axhline(y + 0.5, color="lightgrey", linewidth=0.6)
        previous = variable
        mark = score_mark(entry.get("ci_method"))
        labels.append(f"{_group_label(variable, entry)} (n={entry['n_patients']}){mark}")
        value, ci = entry.get("auroc"), entry.get("ci") or [None, None]
        if entry.get("status") != "ok" or value is None:
            status = entry.get("status", "n/a")
            ax.text(left + 0.01, y, status, va="center", fontsize="small", color="grey")
            continue
        if ci[0] is not None and ci[1] is not None:
            ax.plot([ci[0], ci[1]], [y, y], color="tab:blue", linewidth=1.5)
        ax.plot([value], [y], marker="s", color="tab:blue")
    if overall is not None:
        ax.axvline(
            overall,
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"all patients {overall:.3f}",
        )
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=0.8, label="chance")
    ax.set_yticks(range(len(entries)), labels[::-1], fontsize="small")
    ax.set_ylim(-0.6, len(entries) - 0.4)
    ax.set_xlim(left, 1.01)
    scored = any(entry.get("ci_method") == SCORE_INTERVAL for _, entry in entries)
    ax.set_xlabel(
        f"AUROC (any) per {result.get('level', 'slice')}, {_ci_level(result)} % CI"
        + ("; † with the score interval" if scored else "")
    )
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize="small")
    fig.tight_layout()
    return fig


def _ci_level(result: dict[str, Any]) -> int:
    return int(round(100 * (1 - result.get("bootstrap", {}).get("alpha", 0.05))))


def write_subgroups(result: dict[str, Any], out_dir: str | Path) -> tuple[list[Path], str]:
    """Write subgroups.json and the forest plot subgroups.png; return them and the markdown.

    Args:
        result: output of :func:`ichseg.metrics.subgroups.subgroup_analysis`.
        out_dir: the evaluation folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "subgroups.json", out / "subgroups.png"]
    text = json.dumps(to_jsonable(result), indent=2, allow_nan=False)
    _atomic_write(paths[0], (text + "\n").encode())
    save_figure(forest_figure(result), paths[1], dpi=120, bbox_inches="tight")
    return paths, subgroup_markdown(result)

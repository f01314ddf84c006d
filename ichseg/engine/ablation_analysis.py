"""The ablation ladder's statistics, tables and plot, from the runs' test predictions.

Per rung: the mean over seeds with a 95 % interval that resamples both test patients and seeds
(:func:`ichseg.metrics.compare.seed_patient_bootstrap`); per rung, its difference from the
previous rung on the same patients (a paired patient-and-seed bootstrap) and DeLong's test on
series (one case per series, seed-averaged probabilities). Validation figures are listed
separately and labelled as such. :mod:`ichseg.engine.ablation` runs the ladder.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.engine.checkpoint import EVAL_DIR, HISTORY_JSONL
from ichseg.errors import ConfigError, InputError
from ichseg.fileio import new_figure, save_figure, write_csv, write_text
from ichseg.metrics import nanmean
from ichseg.metrics.auroc import SCORE_INTERVAL, score_mark
from ichseg.volume import SUBTYPES


@dataclass
class RungPredictions:
    """Test predictions of every seed of one rung, aligned on the same slices."""

    rung: str
    model: str
    masked: bool
    seeds: list[int]
    keys: list[tuple[str, str, str]]
    groups: np.ndarray
    series: np.ndarray
    labels: np.ndarray
    probs: list[np.ndarray]
    aggregation: str
    validation: dict[str, float]


def _read_predictions(
    run_dir: Path,
) -> tuple[list[tuple[str, str, str]], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    path = run_dir / EVAL_DIR / "test" / "predictions.csv"
    if not path.exists():
        raise InputError(run_dir, "the run has no test predictions (eval/test/predictions.csv)")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    keys = [(r["series_uid"], r["sop_uid"], r["slice_index"]) for r in rows]
    groups = np.array([r["patient_id"] for r in rows])
    series = np.array([r["series_uid"] for r in rows])
    probs = np.array([[float(r[n]) for n in SUBTYPES] for r in rows], dtype=np.float64)
    labels = np.array(
        [
            [float(r[f"true_{n}"]) if r[f"true_{n}"] != "" else np.nan for n in SUBTYPES]
            for r in rows
        ]
    )
    return keys, groups, series, labels, probs


def _validation_summary(run_dir: Path) -> dict[str, float]:
    path = run_dir / HISTORY_JSONL
    if not path.exists():
        return {}
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    best = min(history, key=lambda row: row.get("val_loss", math.inf))
    return {
        "val_loss": best.get("val_loss", math.nan),
        "val_auroc": best.get("val_auroc", math.nan),
    }


def _collect(runs: list[dict[str, Any]]) -> list[RungPredictions]:
    rungs: list[RungPredictions] = []
    for name in dict.fromkeys(r["rung"] for r in runs):
        members = [r for r in runs if r["rung"] == name]
        first = members[0]["config"]
        if first.task.mode != "multilabel":
            raise ConfigError(f"{name}: the ladder compares multilabel rungs only")
        keys, groups, series, labels, probs = _read_predictions(members[0]["dir"])
        order = {k: i for i, k in enumerate(keys)}
        all_probs = [probs]
        for member in members[1:]:
            other_keys, _, _, _, other = _read_predictions(member["dir"])
            if set(other_keys) != set(keys):
                raise InputError(member["dir"], "tested on other slices than the rung's first seed")
            aligned = np.empty_like(other)
            aligned[[order[k] for k in other_keys]] = other
            all_probs.append(aligned)
        validation = [_validation_summary(m["dir"]) for m in members]
        rungs.append(
            RungPredictions(
                rung=name,
                model=first.model.name
                + (f"+{first.sequence.kind}" if first.sequence.enabled else ""),
                masked=first.masking.enabled,
                seeds=[m["seed"] for m in members],
                keys=keys,
                groups=groups,
                series=series,
                labels=labels,
                probs=all_probs,
                aggregation=first.eval.aggregation,
                validation={
                    k: nanmean([v.get(k, np.nan) for v in validation])
                    for k in ("val_loss", "val_auroc")
                },
            )
        )
    reference = rungs[0]
    for rung in rungs[1:]:
        if set(rung.keys) != set(reference.keys):
            raise InputError(
                None,
                f"rungs {reference.rung} and {rung.rung} were tested on different slices; "
                "paired comparisons need the same test patients",
            )
        order = {k: i for i, k in enumerate(rung.keys)}
        picks = [order[k] for k in reference.keys]
        rung.probs = [p[picks] for p in rung.probs]
        rung.keys, rung.groups, rung.series = reference.keys, reference.groups, reference.series
        rung.labels = reference.labels
    return rungs


def _metric_fns(macro_columns: list[int]) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    from ichseg.metrics import auroc, rsna_weighted_log_loss

    def any_auroc(y: np.ndarray, p: np.ndarray) -> float:
        return float(auroc(y[:, 0], p[:, 0])[0])

    def macro(y: np.ndarray, p: np.ndarray) -> float:
        values = auroc(y[:, macro_columns], p[:, macro_columns])
        return math.nan if not macro_columns or np.isnan(values).any() else float(values.mean())

    fns = {
        "auroc_any": any_auroc,
        "macro_auroc": macro,
        "weighted_log_loss": lambda y, p: rsna_weighted_log_loss(y, p),
    }
    for k, name in enumerate(SUBTYPES[1:], start=1):
        fns[f"auroc_{name}"] = lambda y, p, k=k: float(auroc(y[:, k], p[:, k])[0])
    return fns


HEADLINE = (
    "auroc_any",
    "macro_auroc",
    "weighted_log_loss",
    "series_auroc_any",
    "series_weighted_log_loss",
)
COMPARED = ("auroc_any", "weighted_log_loss", "series_auroc_any", "series_weighted_log_loss")
LOWER_IS_BETTER = ("weighted_log_loss", "series_weighted_log_loss")
SCORE_NOTE = (
    "† the bootstrap interval reached 1 (or 0), where a percentile bootstrap is unreliable (a "
    "perfectly separated test set is perfectly separated in every resample): the interval "
    "shown is its union with Newcombe's score interval over the test patients."
)


def analyse(runs: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Cells with patient-and-seed intervals and paired comparisons of consecutive rungs."""
    from ichseg.metrics import aggregate_by_series, to_jsonable
    from ichseg.metrics._base import has_both_labels
    from ichseg.metrics.auroc import auroc_interval_at_bound
    from ichseg.metrics.compare import (
        delong_test,
        paired_seed_patient_bootstrap,
        seed_patient_bootstrap,
    )

    rungs = _collect(runs)
    ref = rungs[0]
    metrics_path = Path(runs[0]["dir"]) / EVAL_DIR / "test" / "metrics.json"
    label_level = json.loads(metrics_path.read_text()).get("label_level", "slice")
    macro_columns = [k for k in range(len(SUBTYPES)) if has_both_labels(ref.labels[:, k])]
    fns = _metric_fns(macro_columns)
    series_ids, series_labels, _ = aggregate_by_series(
        ref.labels, ref.probs[0], ref.series, ref.aggregation
    )
    first_row = {s: i for i, s in reversed(list(enumerate(ref.series)))}
    series_groups = np.array([ref.groups[first_row[s]] for s in series_ids])

    def series_probs(rung: RungPredictions) -> list[np.ndarray]:
        return [
            aggregate_by_series(rung.labels, p, rung.series, rung.aggregation)[2]
            for p in rung.probs
        ]

    scopes: dict[
        str, tuple[np.ndarray, np.ndarray, Callable[[RungPredictions], list[np.ndarray]]]
    ] = {
        "series_": (series_labels, series_groups, series_probs),
    }
    if label_level == "slice":
        # Scan-level labels copied to slices would score the copy: series metrics only.
        scopes[""] = (ref.labels, ref.groups, lambda r: r.probs)
    table: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    for index, rung in enumerate(rungs):
        row: dict[str, Any] = {
            "rung": rung.rung,
            "model": rung.model,
            "masked": rung.masked,
            "seeds": len(rung.seeds),
            "test_patients": int(np.unique(ref.groups).size),
            "test_series": int(series_ids.size),
            "test_slices": int(len(ref.keys)),
        }
        for prefix, (y, groups, probs_of) in scopes.items():
            for key, fn in fns.items():
                if prefix and key.startswith("auroc_") and key != "auroc_any":
                    continue
                cell = seed_patient_bootstrap(
                    fn, y, probs_of(rung), groups, n_boot=n_boot, seed=seed
                )
                row[f"{prefix}{key}_mean"] = cell.mean
                row[f"{prefix}{key}_ci_low"] = cell.ci_low
                row[f"{prefix}{key}_ci_high"] = cell.ci_high
                if key.startswith("auroc_"):
                    column = y[:, SUBTYPES.index(key.removeprefix("auroc_"))]
                    at_bound = auroc_interval_at_bound(
                        cell.mean, (cell.ci_low, cell.ci_high), column, groups
                    )
                    if at_bound is not None:
                        row[f"{prefix}{key}_ci_low"], row[f"{prefix}{key}_ci_high"] = at_bound
                        row[f"{prefix}{key}_ci_method"] = SCORE_INTERVAL
        row["val_loss"] = rung.validation.get("val_loss", math.nan)
        row["val_auroc_any"] = rung.validation.get("val_auroc", math.nan)
        table.append(row)
        if index == 0:
            continue
        previous = rungs[index - 1]
        comparison: dict[str, Any] = {"rung": rung.rung, "versus": previous.rung}
        for name in COMPARED:
            prefix = "series_" if name.startswith("series_") else ""
            if prefix not in scopes:
                continue
            y, groups, probs_of = scopes[prefix]
            result = paired_seed_patient_bootstrap(
                fns[name.removeprefix("series_")],
                y,
                probs_of(previous),
                probs_of(rung),
                groups,
                n_boot=n_boot,
                seed=seed,
            )
            comparison[f"delta_{name}"] = result.delta
            comparison[f"delta_{name}_ci_low"] = result.ci_low
            comparison[f"delta_{name}_ci_high"] = result.ci_high
            comparison[f"delta_{name}_p"] = result.p_value
            row[f"delta_{name}"] = result.delta
            row[f"delta_{name}_ci_low"] = result.ci_low
            row[f"delta_{name}_ci_high"] = result.ci_high
            row[f"delta_{name}_p"] = result.p_value
        known = ~np.isnan(series_labels[:, 0])
        delong = delong_test(
            series_labels[known, 0],
            np.mean(series_probs(previous), axis=0)[known, 0],
            np.mean(series_probs(rung), axis=0)[known, 0],
        )
        comparison["delong_series_auroc_any"] = delong.to_dict()
        row["delong_series_auroc_any_p"] = delong.p_value
        comparisons.append(comparison)
    return to_jsonable(
        {
            "table": table,
            "comparisons": comparisons,
            "macro_classes": [SUBTYPES[k] for k in macro_columns],
            "n_boot": n_boot,
            "label_level": label_level,
            "runs": [{"rung": r["rung"], "seed": r["seed"], "dir": str(r["dir"])} for r in runs],
        }
    )


# ---------------------------------------------------------------------------------------------
# Writers


def _cell(row: dict[str, Any], key: str) -> str:
    mean = row.get(f"{key}_mean")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if low is None or high is None:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]{score_mark(row.get(f'{key}_ci_method'))}"


def _score_note(table: list[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """The footnote of the † cells among ``keys`` (after a blank line, which ends a markdown
    table), if there are any."""
    marked = any(row.get(f"{key}_ci_method") == SCORE_INTERVAL for row in table for key in keys)
    return ["", SCORE_NOTE] if marked else []


def _delta(row: dict[str, Any], key: str) -> str:
    delta = row.get(f"delta_{key}")
    if delta is None:
        return ""
    low, high, p = (row.get(f"delta_{key}_{s}") for s in ("ci_low", "ci_high", "p"))
    if low is None or high is None:
        return f"{delta:+.3f}"
    return f"{delta:+.3f} [{low:+.3f}, {high:+.3f}] p={p:.3f}"


def format_table(table: list[dict[str, Any]]) -> str:
    """Markdown table of the headline metrics as ``mean [low, high]``."""
    header = ["rung", "model", "masked", "seeds", *HEADLINE]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = [row["rung"], row["model"], "yes" if row["masked"] else "no", str(row["seeds"])]
        cells += [_cell(row, key) for key in HEADLINE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _score_note(table, HEADLINE))


def format_comparisons(table: list[dict[str, Any]]) -> str:
    """Markdown table of each rung minus the previous rung, on the same test patients."""
    header = ["rung", *[f"Δ {key}" for key in COMPARED], "DeLong p (series any)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table[1:]:
        p = row.get("delong_series_auroc_any_p")
        cells = [
            row["rung"],
            *[_delta(row, key) for key in COMPARED],
            "" if p is None else f"{p:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_ablation_csv(table: list[dict[str, Any]], path: Path) -> Path:
    """``ablation.csv``: one row per rung, floats to four decimals.

    Args:
        table: ``analyse(...)["table"]``.
        path: the file to write.
    """
    columns = list(dict.fromkeys(key for row in table for key in row))
    rows = [
        {
            k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v))
            for k, v in row.items()
        }
        for row in table
    ]
    return write_csv(path, rows, columns)


def write_ablation_markdown(report: dict[str, Any], path: Path) -> Path:
    """``ablation.md``: the headline, per-class and comparison tables with how to read them.

    Args:
        report: the result of :func:`analyse`.
        path: the file to write.
    """
    table = report["table"]
    per_class = ["rung", *[f"auroc_{n}" for n in SUBTYPES[1:]]]
    lines = [
        "# Ablation ladder",
        "",
        f"Test split: {table[0]['test_patients']} patients, {table[0]['test_series']} series, "
        f"{table[0]['test_slices']} slices, the same for every rung and seed, each scored once.",
        "",
        "Each cell is the mean over training seeds of the metric on the test patients, with a "
        f"95 % interval from {report['n_boot']} bootstrap resamples that draw both the test "
        "patients (whole patients, with replacement) and the seeds; it covers test-patient "
        "sampling and seed-to-seed variation, not the choice of training patients or other "
        "sites and scanners. AUROC: higher is better; weighted log loss (RSNA weights, `any` "
        "x2, probabilities clipped at 1e-15): lower is better. Series values aggregate slice "
        "probabilities by the runs' rule and take a series as positive when any slice is. "
        f"Macro AUROC is over the fixed class set {', '.join(report['macro_classes'])}.",
        "",
        *(
            [
                "**One training seed per rung**: the intervals cover test-patient sampling "
                "only, not seed-to-seed variation; run three or more seeds for that.",
                "",
            ]
            if min(row["seeds"] for row in table) < 2
            else []
        ),
        format_table(table),
        "",
        "## Each rung against the previous one (same test patients)",
        "",
        "Δ = this rung minus the previous rung: the mean over seeds, a 95 % interval and a "
        "two-sided p-value from a paired bootstrap (one patient resample shared by both rungs, "
        "seeds drawn independently per rung). DeLong's test compares the series AUROC(any) of the "
        "seed-averaged probabilities, one case per series (it does not see seed variation).",
        "",
        format_comparisons(table),
        "",
        "## AUROC per class (slices)",
        "",
        "| " + " | ".join(per_class) + " |",
        "|" + "---|" * len(per_class),
    ]
    for row in table:
        lines.append(
            "| " + " | ".join([row["rung"], *[_cell(row, key) for key in per_class[1:]]]) + " |"
        )
    lines += _score_note(table, per_class[1:])
    lines += [
        "",
        "## Validation (used for early stopping and thresholds: optimistic)",
        "",
        "| rung | best val loss | val AUROC(any) at that epoch |",
        "|---|---|---|",
    ]
    for row in table:
        loss, auc = row.get("val_loss"), row.get("val_auroc_any")
        lines.append(
            f"| {row['rung']} | {'n/a' if loss is None else f'{loss:.4f}'} | "
            f"{'n/a' if auc is None else f'{auc:.3f}'} |"
        )
    return write_text(path, "\n".join(lines) + "\n")


def plot_ablation(report: dict[str, Any], path: Path) -> Path:
    """``ablation.png``: three metrics per rung with intervals, and the differences between rungs.

    Args:
        report: the result of :func:`analyse`.
        path: the file to write.
    """
    table = report["table"]
    keys = ("auroc_any", "series_auroc_any", "weighted_log_loss")
    fig = new_figure(figsize=(4.2 * (len(keys) + 1), 3.8))
    axes = fig.subplots(1, len(keys) + 1)
    x = np.arange(len(table))
    labels = [r["rung"] for r in table]
    for ax, key in zip(axes, keys, strict=False):
        means = np.array(
            [np.nan if r.get(f"{key}_mean") is None else r[f"{key}_mean"] for r in table]
        )
        low = np.array(
            [np.nan if r.get(f"{key}_ci_low") is None else r[f"{key}_ci_low"] for r in table]
        )
        high = np.array(
            [np.nan if r.get(f"{key}_ci_high") is None else r[f"{key}_ci_high"] for r in table]
        )
        err = np.nan_to_num(np.stack([means - low, high - means]))
        ax.bar(x, np.nan_to_num(means), yerr=err, capsize=4, color="tab:blue")
        marked = [
            label + score_mark(r.get(f"{key}_ci_method"))
            for label, r in zip(labels, table, strict=True)
        ]
        ax.set_xticks(x, marked, rotation=30, ha="right", fontsize=8)
        ax.set_title(key.replace("_", " "))
    ax = axes[-1]
    deltas = [r for r in table[1:]]
    for offset, key, color in (
        (-0.15, "auroc_any", "tab:blue"),
        (0.15, "series_auroc_any", "tab:orange"),
    ):
        d = np.array(
            [np.nan if r.get(f"delta_{key}") is None else r[f"delta_{key}"] for r in deltas]
        )
        lo = np.array(
            [
                np.nan if r.get(f"delta_{key}_ci_low") is None else r[f"delta_{key}_ci_low"]
                for r in deltas
            ]
        )
        hi = np.array(
            [
                np.nan if r.get(f"delta_{key}_ci_high") is None else r[f"delta_{key}_ci_high"]
                for r in deltas
            ]
        )
        xs = np.arange(len(deltas)) + offset
        ax.errorbar(
            xs,
            d,
            yerr=np.nan_to_num(np.stack([d - lo, hi - d])),
            fmt="o",
            capsize=4,
            color=color,
            label=key.replace("_", " "),
        )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(np.arange(len(deltas)), [f"{r['rung']}\nvs previous" for r in deltas], fontsize=7)
    ax.set_title("Δ vs previous rung (paired, 95 % CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)

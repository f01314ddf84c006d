"""The ablation ladder: each rung config x each seed, aggregated with confidence intervals.

Every rung is trained and tested on the same patient-level split (the split seed is part of
the config, not of the run seed), so rungs differ only by what the configs change; the run
seed varies initialisation, augmentation and sampling. Each metric is reported as the mean over
seeds with a Student-t 95 % interval; per-run bootstrap intervals are in each run's report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import (
    RunConfig,
    deep_merge,
    load_raw,
    packaged_config,
    parse_override,
    validate_config,
)
from ichseg.errors import ConfigError
from ichseg.fileio import save_figure, write_csv, write_text

log = logging.getLogger(__name__)

LADDER = (
    "ablation/01_vgg16.yaml",
    "ablation/02_resnet50.yaml",
    "ablation/03_seresnet50.yaml",
    "ablation/04_seresnet50_unet.yaml",
)
PROFILES = ("quick",)
# Metrics of the ablation table: (key in the evaluation dict, column name, higher is better).
TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("auroc_any", "auroc_any"),
    ("macro_auroc", "macro_auroc"),
    ("weighted_log_loss", "weighted_log_loss"),
    ("series_auroc_any", "series_auroc_any"),
)

METRIC_RANGES: dict[str, tuple[float, float]] = {
    "auroc_any": (0.0, 1.0),
    "macro_auroc": (0.0, 1.0),
    "series_auroc_any": (0.0, 1.0),
    "weighted_log_loss": (0.0, np.inf),
}


@dataclass
class AblationResult:
    out_dir: Path
    table: list[dict[str, Any]]
    csv_path: Path
    markdown_path: Path
    plot_path: Path


def resolve_rung(
    path: str | Path,
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Load a rung config (file path or packaged name) with a profile and overrides on top."""
    path = Path(path)
    if not path.exists():
        path = packaged_config(str(path))
    data = load_raw(path)
    if profile:
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
        data = deep_merge(data, load_raw(packaged_config(f"profiles/{profile}.yaml")))
    for override in overrides or []:
        data = deep_merge(data, parse_override(override))
    return validate_config(data, str(path))


def masker_for_config(config: RunConfig, segmenter: Path | None):
    if not config.masking.enabled:
        return None
    from ichseg.segmentation.masking import make_masker

    masking = config.masking
    if masking.method == "unet":
        checkpoint = segmenter or masking.checkpoint
        if checkpoint is None:
            raise ConfigError(
                f"{config.name}: masking.method 'unet' needs masking.checkpoint or --segmenter"
            )
        masking = masking.model_copy(update={"checkpoint": Path(checkpoint).resolve()})
        config.masking = masking
    return make_masker(masking)


def run_ablation(
    configs: list[str | Path] | None,
    out_dir: str | Path,
    *,
    seeds: int = 3,
    profile: str | None = None,
    overrides: list[str] | None = None,
    segmenter: Path | None = None,
    cache_root: Path | None = None,
    progress: bool = True,
) -> AblationResult:
    """Train and evaluate every rung for ``seeds`` seeds; write ablation.csv/.md/.png."""
    from ichseg.engine.train import train

    if seeds < 1:
        raise ConfigError("seeds must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rungs = [resolve_rung(p, profile, overrides) for p in (configs or LADDER)]
    names = [r.name for r in rungs]
    if len(set(names)) != len(names):
        raise ConfigError(f"rung names must be unique, got {names}")
    per_run: list[dict[str, Any]] = []
    for rung in rungs:
        masker = masker_for_config(rung, segmenter)
        for seed_index in range(seeds):
            config = rung.model_copy(update={"seed": rung.seed + seed_index}, deep=True)
            run_dir = out_dir / config.name / f"seed{config.seed}"
            done = run_dir / "eval" / "metrics.json"
            if done.exists():
                metrics = json.loads(done.read_text())
            else:
                result = train(
                    config,
                    run_dir,
                    resume=True,
                    masker=masker,
                    cache_root=cache_root,
                    progress=progress,
                )
                metrics = result.test_metrics or {}
            per_run.append(
                {
                    "rung": config.name,
                    "seed": config.seed,
                    "model": config.model.name,
                    "masked": config.masking.enabled,
                    "metrics": metrics,
                }
            )
    table = aggregate(per_run)
    return AblationResult(
        out_dir,
        table,
        _write_csv(table, out_dir / "ablation.csv"),
        _write_markdown(table, per_run, out_dir / "ablation.md"),
        _plot(table, out_dir / "ablation.png"),
    )


def aggregate(per_run: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rung: mean and 95 % t-interval over seeds for each table metric."""
    from ichseg.engine.metrics import mean_ci

    table = []
    for rung in dict.fromkeys(r["rung"] for r in per_run):
        runs = [r for r in per_run if r["rung"] == rung]
        row: dict[str, Any] = {
            "rung": rung,
            "model": runs[0]["model"],
            "masked": runs[0]["masked"],
            "seeds": len(runs),
        }
        for key, column in TABLE_METRICS:
            values = np.array([float(r["metrics"].get(key, np.nan)) for r in runs])
            mean, low, high = mean_ci(values)
            # A t-interval over three seeds can cross the metric's range; clip it there.
            bounds = METRIC_RANGES.get(key, (-np.inf, np.inf))
            low, high = float(np.clip(low, *bounds)), float(np.clip(high, *bounds))
            row[f"{column}_mean"], row[f"{column}_ci_low"], row[f"{column}_ci_high"] = (
                mean,
                low,
                high,
            )
        table.append(row)
    return table


def _write_csv(table: list[dict[str, Any]], path: Path) -> Path:
    rows = [{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()} for row in table]
    return write_csv(path, rows, list(table[0]))


def format_table(table: list[dict[str, Any]]) -> str:
    """Markdown table: each metric as ``mean [low, high]``."""
    header = ["rung", "model", "masked", "seeds"] + [c for _, c in TABLE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = [row["rung"], row["model"], "yes" if row["masked"] else "no", str(row["seeds"])]
        for _, column in TABLE_METRICS:
            mean, low, high = (
                row[f"{column}_mean"],
                row[f"{column}_ci_low"],
                row[f"{column}_ci_high"],
            )
            cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_markdown(table, per_run, path: Path) -> Path:
    text = [
        "# Ablation ladder",
        "",
        "Mean over seeds with a Student-t 95 % confidence interval. AUROC: higher is better; "
        "weighted log loss (RSNA weighting, `any` x2): lower is better. Series AUROC takes the "
        "maximum slice probability per series.",
        "",
        format_table(table),
        "",
        "## Runs",
        "",
        "| rung | seed | auroc_any | macro_auroc | weighted_log_loss |",
        "|---|---|---|---|---|",
    ]
    for r in per_run:
        m = r["metrics"]
        text.append(
            f"| {r['rung']} | {r['seed']} | {m.get('auroc_any', float('nan')):.3f} | "
            f"{m.get('macro_auroc', float('nan')):.3f} | "
            f"{m.get('weighted_log_loss', float('nan')):.3f} |"
        )
    return write_text(path, "\n".join(text) + "\n")


def _plot(table: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TABLE_METRICS), figsize=(4 * len(TABLE_METRICS), 3.8))
    x = np.arange(len(table))
    for ax, (_, column) in zip(axes, TABLE_METRICS, strict=True):
        means = np.array([r[f"{column}_mean"] for r in table])
        low = means - np.array([r[f"{column}_ci_low"] for r in table])
        high = np.array([r[f"{column}_ci_high"] for r in table]) - means
        ax.bar(x, means, yerr=np.nan_to_num(np.stack([low, high])), capsize=4, color="tab:blue")
        ax.set_xticks(x, [r["rung"] for r in table], rotation=30, ha="right", fontsize=8)
        ax.set_title(column)
    fig.tight_layout()
    return save_figure(fig, path)

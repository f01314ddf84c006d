"""The ablation ladder: each rung config x each seed, compared with honest statistics.

Every rung is trained and tested on the same patient-level split: the first run's
``splits.json`` is given to every other run, so all rungs and seeds are scored on exactly the
same test patients. Each test split is scored once per run (by ``train``); the ladder then reads
the runs' test predictions and reports, per rung, the mean over seeds with a 95 % interval that
resamples both test patients and seeds (:func:`ichseg.metrics.compare.seed_patient_bootstrap`),
and, per rung, its difference from the previous rung on the same patients: a paired
patient-and-seed bootstrap of the difference and DeLong's test on series (one case per series,
seed-averaged probabilities). Validation figures (used for early stopping) are listed
separately and labelled as such.

A sequence rung (``sequence.enabled``, rung 06) embeds slices with a classifier: seed ``s``
reuses the finished run of seed ``s`` of an earlier rung whose config is exactly its backbone
config (rung 05), and otherwise trains its own backbone inside its run folder.

The statistics, tables and plot are in ``ichseg.engine.ablation_analysis``; its public names
are importable from here too.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ichseg.config import (
    RunConfig,
    deep_merge,
    load_raw,
    packaged_config,
    parse_override,
    validate_config,
)
from ichseg.engine.ablation_analysis import (
    COMPARED,
    HEADLINE,
    LOWER_IS_BETTER,
    RungPredictions,
    analyse,
    format_comparisons,
    format_table,
    plot_ablation,
    write_ablation_csv,
    write_ablation_markdown,
)
from ichseg.engine.checkpoint import (
    BACKBONE_DIR,
    CONFIG_FILE,
    EVAL_DIR,
    LAST,
    SPLITS_FILE,
)
from ichseg.errors import ConfigError
from ichseg.fileio import write_json
from ichseg.options import look_up_option

__all__ = [
    "COMPARED",
    "FULL_LADDER",
    "HEADLINE",
    "LADDER",
    "LOWER_IS_BETTER",
    "PROFILES",
    "SEQUENCE_RUNGS",
    "AblationResult",
    "RungPredictions",
    "analyse",
    "format_comparisons",
    "format_table",
    "resolve_rung",
    "reuse_backbone",
    "run_ablation",
]

log = logging.getLogger(__name__)

LADDER = (
    "ablation/01_vgg16.yaml",
    "ablation/02_resnet50.yaml",
    "ablation/03_seresnet50.yaml",
    "ablation/04_seresnet50_unet.yaml",
)
SEQUENCE_RUNGS = (
    "ablation/05_seresnet50_unet_2p5d.yaml",
    "ablation/06_seresnet50_unet_2p5d_sequence.yaml",
)
"""Rung 05: rung 04 with neighbour slices as channels; rung 06: a sequence head over rung 05's
slice embeddings. Not in :data:`LADDER` (the default demo's time budget); ``--full`` adds them."""
FULL_LADDER = LADDER + SEQUENCE_RUNGS
PROFILES = ("quick",)


@dataclass
class AblationResult:
    out_dir: Path
    table: list[dict[str, Any]]
    csv_path: Path
    markdown_path: Path
    plot_path: Path
    json_path: Path


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
        look_up_option("profile", profile, PROFILES)
        data = deep_merge(data, load_raw(packaged_config(f"profiles/{profile}.yaml")))
    for override in overrides or []:
        data = deep_merge(data, parse_override(override))
    return validate_config(data, str(path))


# ---------------------------------------------------------------------------------------------
# Runs


def _finished(run_dir: Path, config: RunConfig) -> bool:
    """Whether ``run_dir`` holds this exact config's evaluated run (else it must be (re)run)."""
    from ichseg.config import load_config
    from ichseg.engine.loop import config_differences

    metrics = run_dir / EVAL_DIR / "test" / "predictions.csv"
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        return False
    differences = config_differences(
        load_config(config_path).model_dump(mode="json"), config.model_dump(mode="json")
    )
    if differences:
        raise ConfigError(
            f"{run_dir}: holds a run of another config ({'; '.join(differences[:3])}); "
            "choose another --out or remove that run"
        )
    return metrics.exists()


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
    """Train and test every rung for ``seeds`` seeds; write ablation.csv/.md/.json/.png."""
    from ichseg.engine.train import train
    from ichseg.preprocess.pipeline import Preprocessor

    if seeds < 1:
        raise ConfigError("seeds must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rungs = [resolve_rung(p, profile, overrides) for p in (configs or LADDER)]
    names = [r.name for r in rungs]
    if len(set(names)) != len(names):
        raise ConfigError(f"rung names must be unique, got {names}")
    shared_split: Path | None = None
    runs: list[dict[str, Any]] = []
    for rung in rungs:
        preprocessor = Preprocessor.from_config(rung, segmenter)
        for seed_index in range(seeds):
            config = rung.model_copy(update={"seed": rung.seed + seed_index}, deep=True)
            config = reuse_backbone(config, runs)
            run_dir = out_dir / config.name / f"seed{config.seed}"
            if not _finished(run_dir, config):
                if shared_split is not None and not (run_dir / SPLITS_FILE).exists():
                    run_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(shared_split, run_dir / SPLITS_FILE)
                train(
                    config,
                    run_dir,
                    resume=(run_dir / LAST).exists() or (run_dir / BACKBONE_DIR / LAST).exists(),
                    preprocessor=preprocessor,
                    cache_root=cache_root,
                    progress=progress,
                )
            shared_split = shared_split or run_dir / SPLITS_FILE
            runs.append(
                {"rung": config.name, "seed": config.seed, "dir": run_dir, "config": config}
            )
    report = analyse(runs, n_boot=rungs[0].eval.n_boot)
    table = report["table"]
    return AblationResult(
        out_dir,
        table,
        write_ablation_csv(table, out_dir / "ablation.csv"),
        write_ablation_markdown(report, out_dir / "ablation.md"),
        plot_ablation(report, out_dir / "ablation.png"),
        write_json(out_dir / "ablation.json", report),
    )


def reuse_backbone(config: RunConfig, runs: list[dict[str, Any]]) -> RunConfig:
    """A sequence rung's config with ``backbone_run`` set to an earlier rung's run of the same
    seed whose config is the backbone this rung needs (else unchanged: it trains its own).

    Args:
        config: the rung config of one seed.
        runs: the runs made so far (``rung``, ``seed``, ``dir``, ``config``).
    """
    from ichseg.engine.sequence import backbone_differences

    if not config.sequence.enabled or config.sequence.backbone_run is not None:
        return config
    for run in runs:
        candidate = run["config"]
        if (
            run["seed"] == config.seed
            and not candidate.sequence.enabled
            and not backbone_differences(candidate, config)
        ):
            sequence = config.sequence.model_copy(update={"backbone_run": Path(run["dir"])})
            return config.model_copy(update={"sequence": sequence}, deep=True)
    return config

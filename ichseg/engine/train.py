"""Classifier training: the classifier family as a client of the one loop (:mod:`.loop`).

``train`` reads as the story of a run: decide the preprocessing once, cache the slices, split
by patient, fit, evaluate the best checkpoint on validation (thresholds, calibration) and then
on the test split, once.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import RunConfig, save_config
from ichseg.engine.cache import SliceSet, build_slices
from ichseg.engine.checkpoint import (
    BACKBONE_DIR,
    BEST,
    CONFIG_FILE,
    EVAL_DIR,
    SEGMENTER_FILE,
    SPLITS_FILE,
    build_model,
    load_classifier,
)
from ichseg.engine.dataset import SliceDataset, build_augmentation
from ichseg.engine.distributed import DistInfo, barrier, cleanup, init_distributed
from ichseg.engine.loop import LoopSettings, epoch_seed, fit, seed_everything
from ichseg.engine.losses import TaskLoss
from ichseg.engine.splits import load_splits, save_splits, split_by_group
from ichseg.errors import ConfigError, InputError
from ichseg.fileio import write_json

log = logging.getLogger(__name__)

PREPROCESSING_FILE = "preprocessing.json"


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    test_metrics: dict[str, Any] | None = None


def settings_of(config: RunConfig) -> LoopSettings:
    train = config.train
    return LoopSettings(
        epochs=train.epochs,
        lr=train.lr,
        weight_decay=train.weight_decay,
        optimizer=train.optimizer,
        scheduler=train.scheduler,
        warmup_epochs=train.warmup_epochs,
        amp=train.amp,
        grad_clip=train.grad_clip,
        patience=train.early_stopping_patience,
        monitor="val_loss",
        mode="min",
        seed=config.seed,
    )


def _mixup(images, targets, alpha: float, num_classes: int, mode: str):
    import torch

    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(images.shape[0])
    if mode == "multiclass":
        targets = torch.nn.functional.one_hot(targets, num_classes).float()
    targets = targets.float()
    return lam * images + (1 - lam) * images[perm], lam * targets + (1 - lam) * targets[perm]


class ClassifierTask:
    """The classifier family for :func:`ichseg.engine.loop.fit`."""

    kind = "classifier"

    def __init__(
        self, config: RunConfig, slices: SliceSet, splits: dict[str, np.ndarray], info: DistInfo
    ) -> None:
        import torch
        from torch.utils.data import DataLoader

        self.config = config
        self.name = config.name
        self.info = info
        self.targets = slices.targets(config.task)
        self.loss_fn = TaskLoss(config)
        train = config.train
        augmentation = build_augmentation(config.seed) if train.augment else None
        self.train_set = SliceDataset(slices, splits["train"], self.targets, augmentation)
        self.val_set = SliceDataset(slices, splits["val"], self.targets)
        self.generator = torch.Generator()
        self.sampler = self._sampler(self.targets[splits["train"]])
        self.train_loader = DataLoader(
            self.train_set,
            batch_size=train.batch_size,
            sampler=self.sampler,
            shuffle=self.sampler is None,
            generator=self.generator if self.sampler is None else None,
            num_workers=train.num_workers,
            drop_last=len(self.train_set) > train.batch_size * max(1, info.world_size),
            persistent_workers=False,
        )
        self.val_loader = DataLoader(
            self.val_set, batch_size=max(train.batch_size, 64), num_workers=0
        )

    def _sampler(self, train_targets: np.ndarray):
        import torch
        from torch.utils.data import DistributedSampler, WeightedRandomSampler

        if self.info.enabled:
            return DistributedSampler(
                self.train_set,
                num_replicas=self.info.world_size,
                rank=self.info.rank,
                shuffle=True,
                seed=self.config.seed,
            )
        if self.config.train.balanced_sampling:
            positive = train_targets[:, 0] > 0.5 if train_targets.ndim == 2 else train_targets > 0
            share = max(positive.mean(), 1e-6)
            weights = np.where(positive, 0.5 / share, 0.5 / max(1 - share, 1e-6))
            return WeightedRandomSampler(
                torch.as_tensor(weights, dtype=torch.double),
                num_samples=len(weights),
                replacement=True,
                generator=self.generator,
            )
        return None

    def build_model(self):
        return build_model(self.config)

    def config_dict(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    def canonical_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        from ichseg.config import validate_config

        return validate_config(saved, "checkpoint").model_dump(mode="json")

    def start_epoch(self, epoch: int) -> None:
        seed = epoch_seed(self.config.seed, epoch)
        self.generator.manual_seed(seed)
        self.train_set.reseed(seed % (2**31))
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def train_batches(self):
        return self.train_loader

    def num_batches(self) -> int:
        return len(self.train_loader)

    def loss(self, model, batch, device):
        import torch

        images, targets = batch
        images = images.to(device, memory_format=torch.channels_last)
        targets = targets.to(device)
        if self.config.train.mixup_alpha > 0:
            images, targets = _mixup(
                images,
                targets,
                self.config.train.mixup_alpha,
                self.config.task.num_outputs,
                self.config.task.mode,
            )
        return self.loss_fn(model(images), targets), len(images)

    def validate(self, model, device) -> dict[str, float]:
        import torch

        from ichseg.engine.predict import autocast, probabilities
        from ichseg.metrics import auroc

        model.eval()
        losses, counts, probs = [], 0, []
        with torch.inference_mode():
            for images, targets in self.val_loader:
                images = images.to(device, memory_format=torch.channels_last)
                with autocast(device, self.config.train.amp):
                    logits = model(images)
                losses.append(float(self.loss_fn(logits, targets.to(device))) * len(images))
                counts += len(images)
                probs.append(probabilities(logits, self.config.task.mode).cpu().numpy())
        prob = np.concatenate(probs)
        truth = self.val_set.targets[self.val_set.indices]
        if self.config.task.mode == "multilabel":
            score = auroc(truth[:, 0], prob[:, 0])[0]
        else:
            score = auroc((truth > 0).astype(np.float64), 1.0 - prob[:, 0])[0]
        return {"val_loss": sum(losses) / max(counts, 1), "val_auroc": float(score)}


def make_splits(config: RunConfig, slices: SliceSet, run_dir: Path | None) -> dict[str, np.ndarray]:
    """The run's patient-level split: read from ``splits.json`` when the run has one.

    Args:
        config: the config (``data.split``) that decides the split otherwise.
        slices: the cached slices.
        run_dir: a run folder whose ``splits.json`` is used when present; None: the config's.
    """
    usable = slices.usable()
    path = run_dir / SPLITS_FILE if run_dir is not None else None
    if path is not None and path.exists():
        rows = load_splits(path, slices.groups[usable])
        return {name: usable[idx] for name, idx in rows.items()}
    s = config.data.split
    labels = slices.labels[usable]
    positive = np.nan_to_num(labels[:, 0]) > 0.5
    rows = split_by_group(
        slices.groups[usable], positive, s.val_fraction, s.test_fraction, s.seed, s.folds, s.fold
    )
    splits = {name: usable[idx] for name, idx in rows.items()}
    for name in ("train", "val"):
        if len(splits[name]) == 0:
            raise InputError(
                None,
                f"the {name} split is empty: {len(np.unique(slices.groups[usable]))} patient(s) "
                "are too few for the configured split fractions",
            )
    return splits


def _prepare_run_dir(config: RunConfig, run_dir: Path, resume: bool, preprocessor) -> None:
    """Write the run's config, preprocessing record and segmenter copy; refuse a clash."""
    from ichseg.config import load_config
    from ichseg.engine.loop import config_differences

    config_path = run_dir / CONFIG_FILE
    if config_path.exists() and (run_dir / BEST).exists():
        saved = load_config(config_path).model_dump(mode="json")
        differences = config_differences(saved, config.model_dump(mode="json"))
        if differences:
            raise ConfigError(
                f"{run_dir}: holds a run with another config ({'; '.join(differences[:3])}); "
                "use a new run folder"
            )
        if not resume:
            raise ConfigError(f"{run_dir}: holds a finished or partial run; pass --resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, config_path)
    write_json(run_dir / PREPROCESSING_FILE, preprocessor.describe())
    source = preprocessor.segmenter_path
    if source is not None and Path(source).resolve() != (run_dir / SEGMENTER_FILE).resolve():
        # The run carries the exact segmenter its input was masked with, so evaluate, predict
        # and the bundle serve the model with the same masks.
        shutil.copyfile(source, run_dir / SEGMENTER_FILE)


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    segmenter: str | Path | None = None,
    preprocessor=None,
    cache_root: Path | None = None,
    progress: bool = True,
    evaluate: bool = True,
) -> TrainResult:
    """Train a classifier as configured, then evaluate its best checkpoint.

    A config with ``sequence.enabled`` trains a sequence run instead (:func:`train_sequence`).

    Args:
        config: the resolved run config (saved as ``config.yaml`` in ``run_dir``).
        run_dir: output folder: checkpoints, history, splits, curves and the eval reports.
        resume: continue from ``run_dir/last.pt`` (the config must be the run's own).
        segmenter: U-Net checkpoint for ``masking.method: unet`` (default the config's).
        preprocessor: an already built preprocessor for this config (saves reloading).
        cache_root: where preprocessed slices are cached.
        progress: progress output.
        evaluate: choose thresholds on validation and score the test split at the end.
    """
    from ichseg.preprocess.pipeline import Preprocessor

    if config.sequence.enabled:
        return train_sequence(
            config,
            run_dir,
            resume=resume,
            segmenter=segmenter,
            preprocessor=preprocessor,
            cache_root=cache_root,
            progress=progress,
            evaluate=evaluate,
        )
    info = init_distributed()
    run_dir = Path(run_dir)
    seed_everything(config.seed)
    preprocessor = preprocessor or Preprocessor.from_config(config, segmenter)
    if info.is_main:
        _prepare_run_dir(config, run_dir, resume, preprocessor)
        slices = build_slices(config, preprocessor, cache_root, progress)
    barrier(info)
    if not info.is_main:
        slices = build_slices(config, preprocessor, cache_root, progress=False)
    splits = make_splits(config, slices, run_dir)
    if info.is_main:
        save_splits(splits, slices.groups, run_dir / SPLITS_FILE)
    task = ClassifierTask(config, slices, splits, info)
    fitted = fit(
        task,
        run_dir,
        settings_of(config),
        resume=resume,
        progress=progress,
        info=info,
        wrap_ddp=True,
    )
    if info.enabled:
        _write_rank_record(run_dir, info, task, fitted.model)
    barrier(info)
    result = TrainResult(run_dir, fitted.best_checkpoint, fitted.history)
    if info.is_main and evaluate:
        from ichseg.engine.evaluate import evaluate_run

        result.test_metrics = evaluate_run(
            run_dir,
            split="test",
            slices=slices,
            preprocessor=preprocessor,
            cache_root=cache_root,
            progress=progress,
        )
    cleanup(info)
    return result


def _write_rank_record(run_dir: Path, info: DistInfo, task: ClassifierTask, model) -> None:
    """Per-rank audit: the training samples this rank drew (epoch 0) and its final weights."""
    from ichseg.engine.loop import state_digest

    task.sampler.set_epoch(0)
    positions = list(iter(task.sampler))
    record = {
        "rank": info.rank,
        "world_size": info.world_size,
        "train_indices": [int(task.train_set.indices[p]) for p in positions],
        "state_sha1": state_digest(model.state_dict()),
    }
    write_json(run_dir / "ddp" / f"rank{info.rank}.json", record)


# ---------------------------------------------------------------------------------------------
# Sequence runs: a backbone classifier, its cached slice embeddings, a head over each series


def train_sequence(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    segmenter: str | Path | None = None,
    preprocessor=None,
    cache_root: Path | None = None,
    progress: bool = True,
    evaluate: bool = True,
) -> TrainResult:
    """Train a sequence head over a backbone's slice embeddings, then evaluate it.

    The backbone is ``sequence.backbone_run`` (a finished classifier run of the same config
    with the sequence disabled, copied into ``<run>/backbone/``) or, without one, trained into
    ``<run>/backbone/`` first. The head trains on the backbone's split (``splits.json``), on
    embeddings computed once per backbone and slice cache (:mod:`ichseg.engine.embeddings`),
    through :func:`ichseg.engine.loop.fit`, so it resumes and saves like any run.

    Args:
        config: the resolved run config with ``sequence.enabled``.
        run_dir: the sequence run folder (``backbone/``, the head's checkpoints, eval reports).
        resume: continue the backbone and the head from their ``last.pt``.
        segmenter: U-Net checkpoint for ``masking.method: unet``.
        preprocessor: an already built preprocessor for this config.
        cache_root: where preprocessed slices and embeddings are cached.
        progress: progress output.
        evaluate: choose thresholds and calibration on validation and score the test split.

    Raises:
        ConfigError: a backbone run of another config, another split than the run's, or torchrun.
    """
    from ichseg.engine.embeddings import embed_slices
    from ichseg.engine.sequence import SequenceTask, sequence_settings
    from ichseg.preprocess.pipeline import Preprocessor, file_digest

    if init_distributed().enabled:
        raise ConfigError(
            f"{config.name}: sequence runs train on one process; train the backbone with "
            "torchrun as its own run and give it as sequence.backbone_run"
        )
    run_dir = Path(run_dir)
    seed_everything(config.seed)
    preprocessor = preprocessor or Preprocessor.from_config(config, segmenter)
    _prepare_run_dir(config, run_dir, resume, preprocessor)
    backbone_path = _sequence_backbone(config, run_dir, resume, preprocessor, cache_root, progress)
    slices = build_slices(config, preprocessor, cache_root, progress)
    splits = make_splits(config, slices, run_dir)
    _, backbone, _ = load_classifier(backbone_path)
    digest = file_digest(backbone_path)
    table = embed_slices(
        backbone, slices, slices.usable(), backbone_sha1=digest, amp=config.train.amp
    )
    write_json(
        run_dir / "backbone.json",
        {
            "source": str(config.sequence.backbone_run or run_dir / BACKBONE_DIR),
            "trained_here": config.sequence.backbone_run is None,
            "sha1": digest,
            "num_features": table.num_features,
            "embeddings": str(table.folder),
            "embeddings_precision": table.precision,
        },
    )
    task = SequenceTask(config, slices, splits, table, digest)
    fitted = fit(task, run_dir, sequence_settings(config), resume=resume, progress=progress)
    result = TrainResult(run_dir, fitted.best_checkpoint, fitted.history)
    if evaluate:
        from ichseg.engine.evaluate import evaluate_run

        result.test_metrics = evaluate_run(
            run_dir,
            split="test",
            slices=slices,
            preprocessor=preprocessor,
            cache_root=cache_root,
            progress=progress,
        )
    return result


def _sequence_backbone(
    config: RunConfig,
    run_dir: Path,
    resume: bool,
    preprocessor,
    cache_root: Path | None,
    progress: bool,
) -> Path:
    """The backbone checkpoint of a sequence run, in ``<run>/backbone/``; the run's split set."""
    from ichseg.engine.sequence import backbone_config

    folder = run_dir / BACKBONE_DIR
    source = config.sequence.backbone_run
    if source is not None:
        _copy_backbone_run(config, Path(source), folder, preprocessor.describe())
    else:
        finished = (folder / EVAL_DIR / "test" / "predictions.csv").is_file()
        if (run_dir / SPLITS_FILE).is_file() and not (folder / SPLITS_FILE).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / SPLITS_FILE, folder / SPLITS_FILE)
        if not finished:
            train(
                backbone_config(config),
                folder,
                resume=resume,
                preprocessor=preprocessor,
                cache_root=cache_root,
                progress=progress,
            )
    _adopt_splits(folder / SPLITS_FILE, run_dir / SPLITS_FILE)
    return folder / BEST


def _copy_backbone_run(
    config: RunConfig, source: Path, folder: Path, preprocessing: dict[str, Any]
) -> None:
    """Check a finished classifier run against the config and copy what the head needs."""
    import json
    import os

    from ichseg.engine.sequence import backbone_differences, is_sequence_run
    from ichseg.preprocess.pipeline import file_digest

    if not (source / BEST).is_file():
        raise InputError(source, f"sequence.backbone_run is not a finished run ({BEST} missing)")
    if is_sequence_run(source):
        raise InputError(source, "sequence.backbone_run must be a classifier run, not a sequence")
    if not (source / SPLITS_FILE).is_file():
        raise InputError(source, f"sequence.backbone_run has no {SPLITS_FILE}")
    other, _, _ = load_classifier(source / BEST)
    differences = backbone_differences(other, config)
    if differences:
        shown = "; ".join(differences[:3]) + (" ..." if len(differences) > 3 else "")
        raise ConfigError(
            f"{source}: sequence.backbone_run was trained with another config ({shown}); "
            "its config must equal this one with the sequence disabled"
        )
    record = source / PREPROCESSING_FILE
    if record.is_file() and json.loads(record.read_text()) != json.loads(json.dumps(preprocessing)):
        raise ConfigError(
            f"{record}: sequence.backbone_run was trained on other input than this run's "
            "(another segmenter or preprocessing); its embeddings would not match"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for name in (BEST, CONFIG_FILE, SPLITS_FILE, SEGMENTER_FILE, PREPROCESSING_FILE):
        src, dst = source / name, folder / name
        if not src.is_file() or (dst.is_file() and file_digest(dst) == file_digest(src)):
            continue
        tmp = dst.with_name(f".{name}.copy")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)  # checkpoints are replaced by rename, so a link never changes
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _adopt_splits(backbone_splits: Path, run_splits: Path) -> None:
    """The run uses its backbone's split; a different split already in the run is refused."""
    import json

    if run_splits.is_file():
        mine = {k: sorted(v) for k, v in json.loads(run_splits.read_text()).items()}
        theirs = {k: sorted(v) for k, v in json.loads(backbone_splits.read_text()).items()}
        if mine != theirs:
            raise ConfigError(
                f"{run_splits}: differs from the backbone's split {backbone_splits}; the head "
                "must be trained and tested on the backbone's patients"
            )
        return
    shutil.copyfile(backbone_splits, run_splits)

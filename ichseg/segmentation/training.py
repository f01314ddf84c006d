"""U-Net training as a client of the one training loop (:func:`ichseg.engine.loop.fit`).

The segmenter trains, resumes and saves its run exactly like the classifier: a patient-level
split written to ``splits.json``, ``config.yaml`` with the data source, ``best.pt`` (best
validation Dice) and ``last.pt`` after every epoch, ``metrics.csv``/``.jsonl``, ``curves.png``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.engine.checkpoint import CONFIG_FILE, SPLITS_FILE
from ichseg.engine.loop import LoopSettings, fit
from ichseg.engine.predict import default_device
from ichseg.engine.splits import load_splits, save_splits, split_by_group
from ichseg.errors import InputError
from ichseg.fileio import write_text
from ichseg.segmentation.cases import SegmentationCase, as_case
from ichseg.segmentation.unet import Segmenter, SegmenterConfig, build_unet, prepare_slices


def _augment(images, masks, generator):
    """Random flips, a small rotation and scale; the same warp for image and target."""
    import torch
    import torch.nn.functional as F

    n = images.shape[0]
    flip_x = torch.rand(n, generator=generator) < 0.5
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(15.0)
    scale = 1.0 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.05
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    sign = torch.where(flip_x, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * sign
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * sign
    theta[:, 1, 1] = cos
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Zero padding is air in every window (all standard windows start above -1000 HU).
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return images, masks


def mean_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    """Dice of a binary mask, or the mean Dice over foreground classes present in either map."""
    from ichseg.metrics.overlap import dice

    if num_classes == 2:
        return dice(pred, ref)
    scores = [
        dice(pred == c, ref == c)
        for c in range(1, num_classes)
        if (pred == c).any() or (ref == c).any()
    ]
    return float(np.mean(scores)) if scores else 1.0


class SegmenterTask:
    """The U-Net family for :func:`ichseg.engine.loop.fit`."""

    kind = "segmenter"

    def __init__(
        self,
        cases: list[SegmentationCase],
        config: SegmenterConfig,
        splits: dict[str, np.ndarray],
        run_config: dict[str, Any],
    ) -> None:
        import torch

        self.config = config
        self.name = f"segmenter-{config.target}"
        self.cases = cases
        self.run_config = run_config
        self.val_ids = [int(i) for i in splits["val"]]
        size = (config.image_size, config.image_size)
        stacks, targets, indices, offset = [], [], [], 0
        from ichseg.preprocess.windowing import neighbour_index

        for i in splits["train"]:
            case = cases[int(i)]
            stacks.append(prepare_slices(case.hu, config))
            targets.append(resize_slices_nearest(case.target, size))
            indices.append(neighbour_index(case.hu.shape[0], config.context) + offset)
            offset += case.hu.shape[0]
        # Half precision and uint8 halve and quarter the memory of full-resolution stacks;
        # batches are cast back to float32.
        self.images = torch.from_numpy(np.concatenate(stacks).astype(np.float16))
        target_stack = np.concatenate(targets).astype(np.uint8)
        self.targets = torch.from_numpy(target_stack)
        self.index = np.concatenate(indices)
        # Training slices holding each foreground class, for oversampling small targets: a draw
        # picks a class first, so a rare subtype is seen as often as a common one.
        flat = target_stack.reshape(len(target_stack), -1)
        rows = [(c, np.flatnonzero((flat == c).any(1))) for c in range(1, config.num_classes)]
        self.class_codes = [c for c, r in rows if len(r)]
        self.class_rows = [r for _, r in rows if len(r)]
        self.foreground_rows = np.flatnonzero(flat.any(1))
        self.epoch = 0
        self.generator = torch.Generator()
        self.rng = np.random.default_rng(config.seed)
        from monai.losses import DiceCELoss

        weight = None if config.class_weights is None else torch.tensor(config.class_weights)
        self.loss_fn = DiceCELoss(
            to_onehot_y=True, softmax=True, batch=config.batch_dice, weight=weight
        )

    def build_model(self):
        return build_unet(self.config)

    def config_dict(self) -> dict[str, Any]:
        return self.run_config

    def canonical_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        from ichseg.segmentation.recipes import SegmenterDataConfig

        model = SegmenterConfig.model_validate(saved.get("model", {})).model_dump(mode="json")
        data = saved.get("data") or {}
        if data:
            data = SegmenterDataConfig.model_validate(data).model_dump(mode="json")
        return {"data": data, "model": model}

    def start_epoch(self, epoch: int) -> None:
        from ichseg.engine.loop import epoch_seed

        self.epoch = epoch
        seed = epoch_seed(self.config.seed, epoch)
        self.generator.manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    def samples_per_epoch(self) -> int:
        return self.config.samples_per_epoch or self.index.shape[0]

    def num_batches(self) -> int:
        return math.ceil(self.samples_per_epoch() / self.config.batch_size)

    def epoch_order(self) -> np.ndarray:
        """Rows of the training slices for one epoch (see :meth:`epoch_plan`)."""
        return self.epoch_plan()[0]

    def epoch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the training slices for one epoch, foreground oversampled when configured,
        and the class code each row was drawn for (0: drawn from all slices).

        Without ``foreground_fraction`` and ``samples_per_epoch`` every slice comes once.
        Otherwise ``round(fraction x samples)`` rows hold foreground: each draw picks one of
        the foreground classes present in the training set at random, then a slice holding
        it. The rest come from all slices (with replacement where a pool is too small), and
        the two are mixed.
        """
        total, wanted = self.index.shape[0], self.samples_per_epoch()
        fraction = self.config.foreground_fraction
        if fraction is None or not len(self.foreground_rows):
            if wanted <= total:
                rows = self.rng.permutation(total)[:wanted]
            else:
                rows = self.rng.choice(total, size=wanted, replace=True)
            return rows, np.zeros(len(rows), np.uint8)
        count = int(round(fraction * wanted))
        per_class = np.bincount(
            self.rng.integers(len(self.class_rows), size=count), minlength=len(self.class_rows)
        )
        chosen = [
            self.rng.choice(pool, size=n, replace=n > len(pool))
            for pool, n in zip(self.class_rows, per_class, strict=True)
        ]
        rest = self.rng.choice(total, size=wanted - count, replace=wanted - count > total)
        rows = np.concatenate([*chosen, rest])
        focus = np.concatenate(
            [np.full(n, c, np.uint8) for c, n in zip(self.class_codes, per_class, strict=True)]
            + [np.zeros(len(rest), np.uint8)]
        )
        mixed = self.rng.permutation(len(rows))
        return rows[mixed], focus[mixed]

    def _crop(self, images, targets, focus: np.ndarray):
        """``patch_size`` squares of a batch: around a pixel of the drawn class (jittered by up
        to a quarter patch) for oversampled rows, anywhere for the others."""
        import torch

        size, full = self.config.patch_size, images.shape[-1]
        crops, crop_targets = [], []
        for i, code in enumerate(focus):
            y0, x0 = self.rng.integers(0, full - size + 1, size=2)
            if code:
                ys, xs = np.nonzero(targets[i, 0].numpy() == code)
                if len(ys):
                    k = self.rng.integers(len(ys))
                    jitter = self.rng.integers(-size // 4, size // 4 + 1, size=2)
                    y0 = np.clip(ys[k] + jitter[0] - size // 2, 0, full - size)
                    x0 = np.clip(xs[k] + jitter[1] - size // 2, 0, full - size)
            crops.append(images[i, :, y0 : y0 + size, x0 : x0 + size])
            crop_targets.append(targets[i, :, y0 : y0 + size, x0 : x0 + size])
        return torch.stack(crops), torch.stack(crop_targets)

    def train_batches(self):
        import torch

        order, focus = self.epoch_plan()
        size = self.config.batch_size
        for step in range(self.num_batches()):
            batch = slice(step * size, (step + 1) * size)
            rows = self.index[order[batch]]
            images = self.images[torch.from_numpy(rows)].flatten(1, 2).float()
            centre = torch.from_numpy(rows[:, self.config.context])
            targets = self.targets[centre][:, None].float()
            if self.config.augment:
                images, targets = _augment(images, targets, self.generator)
            if self.config.patch_size is not None and self.config.patch_size < images.shape[-1]:
                images, targets = self._crop(images, targets, focus[batch])
            yield images.contiguous(), targets.contiguous()

    def loss(self, model, batch, device):
        import torch

        images, targets = batch
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        logits = model(images)
        self.loss_fn.to(device)  # class weights live on the model's device
        return self.loss_fn(logits.float(), targets.to(device)), len(images)

    def validate(self, model, device) -> dict[str, float]:
        last = self.epoch == self.config.epochs - 1
        if not self.val_ids or ((self.epoch + 1) % self.config.val_every and not last):
            return {"val_dice": math.nan}
        segmenter = Segmenter(model, self.config, str(device))
        predictions = [
            (segmenter.predict(self.cases[i].hu), self.cases[i].target) for i in self.val_ids
        ]
        model.train()
        if self.config.target == "hemorrhage":
            return pooled_dice(predictions)
        scores = [mean_dice(pred, ref, self.config.num_classes) for pred, ref in predictions]
        return {"val_dice": float(np.mean(scores))}


def pooled_dice(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Dice per hemorrhage subtype over all validation voxels, and their mean.

    Pooling the voxels of every case keeps a few stray voxels of a subtype that a case lacks
    from counting as a Dice of 0 for that case: small bleeds make per-case means erratic.

    Returns:
        ``val_dice`` (mean over the subtypes present in the references) and
        ``val_dice_<subtype>`` for each of them.
    """
    from ichseg.volume import HEMORRHAGE_CODES

    overlap = dict.fromkeys(HEMORRHAGE_CODES, 0)
    total = dict.fromkeys(HEMORRHAGE_CODES, 0)
    reference = dict.fromkeys(HEMORRHAGE_CODES, 0)
    for pred, ref in pairs:
        for code in HEMORRHAGE_CODES:
            p, r = pred == code, ref == code
            overlap[code] += int((p & r).sum())
            reference[code] += int(r.sum())
            total[code] += int(p.sum()) + int(r.sum())
    figures = {
        f"val_dice_{HEMORRHAGE_CODES[code]}": 2.0 * overlap[code] / total[code]
        for code in HEMORRHAGE_CODES
        if reference[code]
    }
    values = list(figures.values())
    return {"val_dice": float(np.mean(values)) if values else math.nan, **figures}


def resize_slices_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from ichseg.preprocess.windowing import resize_slices

    return resize_slices(labels, size, order=0)


def _split_cases(
    cases: list[SegmentationCase], config: SegmenterConfig, run_dir: Path
) -> dict[str, np.ndarray]:
    groups = np.array([c.group for c in cases])
    path = run_dir / SPLITS_FILE
    if path.exists():
        return load_splits(path, groups)
    if len(cases) < 2 or config.val_fraction <= 0:
        return {"train": np.arange(len(cases)), "val": np.array([], int), "test": np.array([], int)}
    positive = np.array([bool(c.target.any()) for c in cases])
    splits = split_by_group(groups, positive, config.val_fraction, 0.0, config.seed)
    if len(splits["val"]) == 0:  # too few patients for the fraction: hold out one
        last = splits["train"][-1:]
        splits = {"train": splits["train"][:-1], "val": last, "test": splits["test"]}
    return splits


def train_segmenter(
    cases: Sequence[Any],
    config: SegmenterConfig | None = None,
    run_dir: str | Path = "runs/segmenter",
    *,
    data: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """Train the U-Net on the shared loop and return the path of the best checkpoint.

    Args:
        cases: :class:`SegmentationCase` items, ``(hu, target)`` pairs or phantom studies.
            ``config.val_fraction`` of the patients are held out for the validation Dice.
        config: hyper-parameters and target; defaults to ``SegmenterConfig()``.
        run_dir: the run folder (same files as a classifier run).
        data: the data section of the training config, recorded in ``config.yaml``.
        resume: continue from ``run_dir/last.pt`` (same config only).
        progress: progress output.
        device: torch device; default CUDA when available, else CPU.

    Returns:
        Path of ``best.pt`` (highest validation Dice; the last epoch when nothing is held out).
    """
    import torch
    import yaml

    config = config or SegmenterConfig()
    items = [as_case(item, i, config.target) for i, item in enumerate(cases)]
    if not items:
        raise InputError(None, "no training volumes for the segmenter")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = {"data": data or {}, "model": config.model_dump(mode="json")}
    write_text(run_dir / CONFIG_FILE, yaml.safe_dump(run_config, sort_keys=False))
    splits = _split_cases(items, config, run_dir)
    save_splits(splits, np.array([c.group for c in items]), run_dir / SPLITS_FILE)
    task = SegmenterTask(items, config, splits, run_config)
    has_val = len(splits["val"]) > 0
    settings = LoopSettings(
        epochs=config.epochs,
        lr=config.lr,
        weight_decay=config.weight_decay,
        optimizer="adam",
        scheduler="cosine",
        amp=config.amp,
        patience=config.patience,
        # Nothing held out: the last epoch is the best there is.
        monitor="val_dice" if has_val else None,
        mode="max",
        seed=config.seed,
    )
    dev = default_device(device)
    torch.manual_seed(config.seed)
    result = fit(task, run_dir, settings, resume=resume, progress=progress, device=dev)
    return result.best_checkpoint

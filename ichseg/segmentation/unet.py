"""A 2D (or 2.5D) MONAI U-Net for the intracranial mask: training, checkpoints and inference.

Slices are resized to a square ``image_size``, windowed into channels (optionally with ``k``
neighbouring slices each side), and segmented into background / intracranial. Predictions are
resized back to the native slice size as probabilities, so the mask lies voxel for voxel on the
input grid.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ichseg.fileio import torch_save, write_text
from ichseg.preprocess.windowing import (
    STANDARD_WINDOWS,
    neighbour_indices,
    resize_slices,
    resolve_window,
    stack_windows,
)
from ichseg.segmentation.classical import (
    classical_intracranial_mask,
    fill_holes_per_slice,
    largest_component,
    partial_volume_rim,
)

# Boundary voxels the network gives at least this probability may join the mask when they are
# tissue next to it (see partial_volume_rim); keeps blood against the inner table inside.
RIM_MIN_PROBABILITY = 0.05


class WindowSpec(BaseModel):
    """An explicit display window."""

    model_config = ConfigDict(extra="forbid")

    center: float
    width: float = Field(gt=0.0)


class SegmenterConfig(BaseModel):
    """Everything needed to rebuild and retrain the U-Net; stored in every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(128, ge=16)
    windows: list[str | WindowSpec] = ["brain", "subdural", "bone"]
    context: int = Field(0, ge=0, le=4)
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = Field(1, ge=0, le=4)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    amp: bool = True
    augment: bool = True
    seed: int = 0
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)

    @field_validator("windows")
    @classmethod
    def _known_windows(cls, windows: list[str | WindowSpec]) -> list[str | WindowSpec]:
        if not windows:
            raise ValueError("at least one window is needed")
        for item in windows:
            if isinstance(item, str) and item not in STANDARD_WINDOWS:
                valid = ", ".join(sorted(STANDARD_WINDOWS))
                raise ValueError(f"unknown window {item!r}; valid: {valid}")
        return windows

    @model_validator(mode="after")
    def _consistent_shape(self) -> SegmenterConfig:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides needs len(channels) - 1 = {len(self.channels) - 1} entries, "
                f"got {len(self.strides)}"
            )
        factor = math.prod(self.strides)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by {factor}")
        return self

    @property
    def in_channels(self) -> int:
        return len(self.windows) * (2 * self.context + 1)

    def resolved_windows(self) -> list[Any]:
        return [resolve_window(w if isinstance(w, str) else w.model_dump()) for w in self.windows]


def build_unet(config: SegmenterConfig):
    """The MONAI U-Net described by ``config`` (2 output classes)."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=config.in_channels,
        out_channels=2,
        channels=tuple(config.channels),
        strides=tuple(config.strides),
        num_res_units=config.num_res_units,
    )


def _as_pair(item: Any) -> tuple[np.ndarray, np.ndarray]:
    """(hu, mask) from a pair or from an object with ``hu`` and ``intracranial_mask``/``mask``."""
    if isinstance(item, tuple | list) and len(item) == 2:
        hu, mask = item
    elif hasattr(item, "hu") and hasattr(item, "intracranial_mask"):
        hu, mask = item.hu, item.intracranial_mask
    elif hasattr(item, "hu") and hasattr(item, "mask"):
        hu, mask = item.hu, item.mask
    else:
        raise TypeError(
            "training items must be (hu, mask) pairs or objects with .hu and .intracranial_mask"
        )
    hu = np.asarray(hu, dtype=np.float32)
    mask = np.asarray(mask)
    if hu.ndim != 3 or hu.shape != mask.shape:
        raise ValueError(f"hu {hu.shape} and mask {mask.shape} must be equal 3D (z, y, x) shapes")
    return hu, (mask > 0).astype(np.uint8)


def pseudo_labels(volumes: Iterable[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Classical intracranial masks as training targets for volumes without reference masks.

    Args:
        volumes: CTVolume objects (their spacing is used) or plain ``(z, y, x)`` HU arrays
            (1 mm voxels assumed).

    Returns:
        ``(hu, mask)`` pairs that :func:`train_segmenter` accepts like any reference masks.
    """
    pairs = []
    for volume in volumes:
        if hasattr(volume, "hu"):
            hu = np.asarray(volume.hu, dtype=np.float32)
            spacing = getattr(volume, "spacing", (1.0, 1.0, 1.0))
        else:
            hu, spacing = np.asarray(volume, dtype=np.float32), (1.0, 1.0, 1.0)
        pairs.append((hu, classical_intracranial_mask(hu, spacing)))
    return pairs


def _prepare_slices(hu: np.ndarray, config: SegmenterConfig) -> np.ndarray:
    """``(z, y, x)`` HU -> ``(z, windows, S, S)`` float32 at the model's resolution."""
    size = (config.image_size, config.image_size)
    small = resize_slices(np.asarray(hu, dtype=np.float32), size, order=1)
    return stack_windows(small, config.resolved_windows())


def _context_index(num_slices: int, context: int, offset: int = 0) -> np.ndarray:
    """``(z, 2k+1)`` indices of each slice's neighbours (edges repeated), shifted by offset."""
    return offset + np.array(
        [neighbour_indices(num_slices, z, context) for z in range(num_slices)], dtype=np.int64
    ).reshape(num_slices, 2 * context + 1)


def _autocast(device_type: str, enabled: bool):
    import torch

    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)


def _foreground_probability(
    model, stack: np.ndarray, config: SegmenterConfig, device: str, amp: bool, batch_size: int
):
    """Foreground probability ``(z, S, S)`` (torch, float32, on ``device``) for a windowed stack."""
    import torch

    index = _context_index(stack.shape[0], config.context)
    data = torch.from_numpy(stack)
    outputs = []
    with torch.inference_mode(), _autocast(device.split(":")[0], amp):
        for start in range(0, stack.shape[0], batch_size):
            rows = index[start : start + batch_size]
            batch = data[torch.from_numpy(rows)].flatten(1, 2).to(device)
            logits = model(batch).float()
            outputs.append(torch.softmax(logits, dim=1)[:, 1])
    return torch.cat(outputs)


def postprocess_mask(mask: np.ndarray) -> np.ndarray:
    """Largest 3D component, then holes filled slice by slice; uint8."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.astype(np.uint8)
    return fill_holes_per_slice(largest_component(mask)).astype(np.uint8)


class Segmenter:
    """A trained U-Net that turns a HU volume into an intracranial mask on the same grid."""

    def __init__(self, model, config: SegmenterConfig, device: str = "cpu") -> None:
        import torch

        # channels_last: faster convolution kernels on CPU (oneDNN) and GPU (cuDNN).
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        self.config = config
        self.device = device

    def predict_proba(
        self, hu: np.ndarray, batch_size: int = 32, amp: bool | None = None
    ) -> np.ndarray:
        """Intracranial probability, float32 ``(z, y, x)`` at the native size of ``hu``.

        Args:
            hu: ``(z, y, x)`` HU volume.
            batch_size: slices per forward pass.
            amp: bf16 autocast (default: the training config's ``amp``).
        """
        import torch
        import torch.nn.functional as F

        hu = np.asarray(hu, dtype=np.float32)
        if hu.ndim != 3:
            raise ValueError(f"hu must be 3D (z, y, x), got shape {hu.shape}")
        amp = self.config.amp if amp is None else amp
        stack = _prepare_slices(hu, self.config)
        prob = _foreground_probability(self.model, stack, self.config, self.device, amp, batch_size)
        with torch.inference_mode():
            # Probabilities, not labels, are resized so the boundary falls between pixels.
            prob = F.interpolate(
                prob[:, None], size=hu.shape[1:], mode="bilinear", align_corners=False
            )[:, 0]
        return prob.cpu().numpy().astype(np.float32, copy=False)

    def predict(self, hu: np.ndarray, batch_size: int = 32, amp: bool | None = None) -> np.ndarray:
        """uint8 intracranial mask ``(z, y, x)`` at the native size of ``hu``.

        The probabilities are thresholded at 0.5 (argmax of two classes), the largest 3D
        component kept, holes filled per slice, and the edge snapped to the inner table.

        Args:
            hu: ``(z, y, x)`` HU volume.
            batch_size: slices per forward pass.
            amp: bf16 autocast (default: the training config's ``amp``).
        """
        hu = np.asarray(hu, dtype=np.float32)
        prob = self.predict_proba(hu, batch_size, amp)
        mask = postprocess_mask(prob > 0.5).astype(bool)
        # The network's edge can stop a pixel short of the inner table; snap it to the bone.
        mask |= partial_volume_rim(mask, hu) & (prob > RIM_MIN_PROBABILITY)
        return mask.astype(np.uint8)

    def __call__(self, volume) -> np.ndarray:
        """Masker interface: a CTVolume (or anything with ``.hu``) -> uint8 mask."""
        return self.predict(volume.hu)


def load_segmenter(path: str | Path, device: str = "cpu") -> Segmenter:
    """Rebuild the U-Net from a checkpoint written by :func:`train_segmenter`."""
    import torch

    checkpoint = torch.load(Path(path), map_location=device, weights_only=True)
    config = SegmenterConfig.model_validate(checkpoint["config"])
    model = build_unet(config)
    model.load_state_dict(checkpoint["state_dict"])
    return Segmenter(model, config, device)


def _augment(images, masks, generator):
    """Random flips, a small rotation and scale; the same warp for image and mask."""
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


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = pred > 0, ref > 0
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total


def _split(num: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Volume-level split: never slices of one volume on both sides."""
    order = np.random.default_rng(seed).permutation(num).tolist()
    num_val = 0 if num < 2 or fraction <= 0 else min(num - 1, max(1, round(fraction * num)))
    return sorted(order[num_val:]), sorted(order[:num_val])


def train_segmenter(
    train_volumes: Sequence[Any],
    config: SegmenterConfig | None = None,
    run_dir: str | Path = "runs/segmenter",
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """Train the U-Net and return the path of the best checkpoint.

    Args:
        train_volumes: ``(hu, mask)`` pairs of ``(z, y, x)`` arrays, or objects with ``.hu`` and
            ``.intracranial_mask`` (phantom studies). ``config.val_fraction`` of the volumes are
            held out (by volume) for the per-epoch validation Dice.
        config: hyper-parameters; defaults to ``SegmenterConfig()``.
        run_dir: receives ``best.pt``, ``last.pt``, ``metrics.jsonl`` and ``config.yaml``.
        progress: show a tqdm bar.
        device: torch device; default CUDA when available, else CPU.

    Returns:
        Path of ``best.pt`` (highest validation Dice; the last epoch when nothing is held out).
    """
    import torch
    import yaml
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    config = config or SegmenterConfig()
    pairs = [_as_pair(item) for item in train_volumes]
    if not pairs:
        raise ValueError("no training volumes")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = device.split(":")[0]
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(
        run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("", encoding="utf-8")

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_ids, val_ids = _split(len(pairs), config.val_fraction, config.seed)

    size = (config.image_size, config.image_size)
    stacks, masks, indices, offset = [], [], [], 0
    for i in train_ids:
        hu, mask = pairs[i]
        stacks.append(_prepare_slices(hu, config))
        masks.append(resize_slices(mask, size, order=0))
        indices.append(_context_index(hu.shape[0], config.context, offset))
        offset += hu.shape[0]
    images_all = torch.from_numpy(np.concatenate(stacks))
    masks_all = torch.from_numpy(np.concatenate(masks).astype(np.float32))
    index_all = np.concatenate(indices)
    num_samples = index_all.shape[0]
    steps_per_epoch = math.ceil(num_samples / config.batch_size)

    model = build_unet(config).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch
    )

    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    best_dice = -1.0
    bar = tqdm(
        total=config.epochs * steps_per_epoch, desc="segmenter", unit="batch", disable=not progress
    )
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = rng.permutation(num_samples)
        losses = []
        for step in range(steps_per_epoch):
            rows = index_all[order[step * config.batch_size : (step + 1) * config.batch_size]]
            images = images_all[torch.from_numpy(rows)].flatten(1, 2)
            targets = masks_all[torch.from_numpy(rows[:, config.context])][:, None]
            if config.augment:
                images, targets = _augment(images, targets, generator)
            images, targets = images.to(device), targets.to(device)
            with _autocast(device_type, config.amp):
                logits = model(images)
            loss = loss_fn(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")

        val_dice = None
        if val_ids:
            segmenter = Segmenter(model, config, device)
            val_dice = float(
                np.mean([_dice(segmenter.predict(pairs[i][0]), pairs[i][1]) for i in val_ids])
            )
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.3f}", val_dice=f"{val_dice:.4f}")
        checkpoint = {
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": config.model_dump(mode="json"),
            "epoch": epoch,
            "val_dice": val_dice,
        }
        torch_save(checkpoint, last_path)
        score = val_dice if val_dice is not None else float(epoch)
        if score > best_dice:
            best_dice = score
            torch_save(checkpoint, best_path)
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_dice": val_dice,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "seconds": round(time.perf_counter() - start, 3),
        }
        with metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    bar.close()
    return best_path

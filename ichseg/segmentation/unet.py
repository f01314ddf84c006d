"""A 2D (or 2.5D) MONAI U-Net for the intracranial mask or a hemorrhage label map: the model,
its checkpoints and inference. Training lives in :mod:`ichseg.segmentation.training`.

Slices are resized to a square ``image_size``, windowed into channels (optionally with ``k``
neighbouring slices each side) and segmented into classes: background / intracranial, or
background plus the five hemorrhage subtypes. Class probabilities are resized back to the native
slice size before the argmax, so the mask lies voxel for voxel on the input grid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ichseg.preprocess.windowing import (
    STANDARD_WINDOWS,
    neighbour_index,
    resize_slices,
    resolve_window,
    stack_windows,
)
from ichseg.segmentation.classical import (
    fill_holes_per_slice,
    largest_component,
    partial_volume_rim,
)
from ichseg.volume import HEMORRHAGE_CODES

# Boundary voxels the network gives at least this probability may join the mask when they are
# tissue next to it (see partial_volume_rim); keeps blood against the inner table inside.
RIM_MIN_PROBABILITY = 0.05
TARGETS = ("intracranial", "hemorrhage")


class WindowSpec(BaseModel):
    """An explicit display window."""

    model_config = ConfigDict(extra="forbid")

    center: float
    width: float = Field(gt=0.0)


class SegmenterConfig(BaseModel):
    """Everything needed to rebuild and retrain the U-Net; stored in every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    target: Literal["intracranial", "hemorrhage"] = "intracranial"
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
    patience: int | None = Field(None, ge=1)

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

    @property
    def num_classes(self) -> int:
        """Background plus the foreground classes of the target."""
        return 2 if self.target == "intracranial" else 1 + len(HEMORRHAGE_CODES)

    def resolved_windows(self) -> list[Any]:
        return [resolve_window(w if isinstance(w, str) else w.model_dump()) for w in self.windows]


def build_unet(config: SegmenterConfig):
    """The MONAI U-Net described by ``config``."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=config.in_channels,
        out_channels=config.num_classes,
        channels=tuple(config.channels),
        strides=tuple(config.strides),
        num_res_units=config.num_res_units,
    )


def prepare_slices(hu: np.ndarray, config: SegmenterConfig) -> np.ndarray:
    """``(z, y, x)`` HU -> ``(z, windows, S, S)`` float32 at the model's resolution."""
    size = (config.image_size, config.image_size)
    small = resize_slices(np.asarray(hu, dtype=np.float32), size, order=1)
    return stack_windows(small, config.resolved_windows())


def _class_probabilities(
    model, stack: np.ndarray, config: SegmenterConfig, device: str, amp: bool, batch_size: int
):
    """Softmax ``(z, classes, S, S)`` (torch, float32, on ``device``) for a windowed stack."""
    import torch

    from ichseg.engine.predict import autocast

    index = neighbour_index(stack.shape[0], config.context)
    data = torch.from_numpy(stack)
    outputs = []
    with torch.inference_mode(), autocast(device, amp):
        for start in range(0, stack.shape[0], batch_size):
            rows = index[start : start + batch_size]
            batch = data[torch.from_numpy(rows)].flatten(1, 2).to(device)
            logits = model(batch.contiguous(memory_format=torch.channels_last)).float()
            outputs.append(torch.softmax(logits, dim=1))
    return torch.cat(outputs)


def postprocess_mask(mask: np.ndarray) -> np.ndarray:
    """Largest 3D component, then holes filled slice by slice; uint8."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.astype(np.uint8)
    return fill_holes_per_slice(largest_component(mask)).astype(np.uint8)


class Segmenter:
    """A trained U-Net that maps a HU volume to a mask or label map on the same grid.

    Attributes:
        checkpoint_path: the file it was loaded from (None when built in memory).
    """

    def __init__(
        self, model, config: SegmenterConfig, device: str = "cpu", checkpoint_path=None
    ) -> None:
        import torch

        # channels_last: faster convolution kernels on CPU (oneDNN) and GPU (cuDNN).
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        self.config = config
        self.device = device
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)

    def predict_proba(
        self, hu: np.ndarray, batch_size: int = 32, amp: bool | None = None
    ) -> np.ndarray:
        """Class probabilities, float32 ``(classes, z, y, x)`` at the native size of ``hu``.

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
        stack = prepare_slices(hu, self.config)
        prob = _class_probabilities(self.model, stack, self.config, self.device, amp, batch_size)
        with torch.inference_mode():
            # Probabilities, not labels, are resized so the boundary falls between pixels.
            prob = F.interpolate(prob, size=hu.shape[1:], mode="bilinear", align_corners=False)
        return prob.permute(1, 0, 2, 3).cpu().numpy().astype(np.float32, copy=False)

    def predict(self, hu: np.ndarray, batch_size: int = 32, amp: bool | None = None) -> np.ndarray:
        """uint8 ``(z, y, x)``: the intracranial mask (0/1) or the hemorrhage label map.

        Intracranial: the argmax of two classes, the largest 3D component, holes filled per
        slice, and the edge snapped to the inner table. Hemorrhage: the argmax over background
        and the subtype codes of :data:`ichseg.volume.HEMORRHAGE_CODES`.
        """
        hu = np.asarray(hu, dtype=np.float32)
        prob = self.predict_proba(hu, batch_size, amp)
        if self.config.target == "hemorrhage":
            return prob.argmax(axis=0).astype(np.uint8)
        foreground = prob[1]
        mask = postprocess_mask(foreground > 0.5).astype(bool)
        # The network's edge can stop a pixel short of the inner table; snap it to the bone.
        mask |= partial_volume_rim(mask, hu) & (foreground > RIM_MIN_PROBABILITY)
        return mask.astype(np.uint8)

    def __call__(self, volume) -> np.ndarray:
        """Masker interface: a CTVolume (or anything with ``.hu``) -> uint8 mask."""
        return self.predict(volume.hu)


def load_segmenter(path: str | Path, device: str = "cpu") -> Segmenter:
    """Rebuild a U-Net from a checkpoint written by ``train_segmenter`` (validated)."""
    from ichseg.engine.checkpoint import load_checkpoint, load_weights
    from ichseg.errors import InputError

    path = Path(path)
    state = load_checkpoint(path, kind="segmenter")
    if state.get("kind", "segmenter") != "segmenter":
        raise InputError(path, f"holds a {state.get('kind')} model, not a U-Net segmenter")
    from pydantic import ValidationError

    try:
        config = SegmenterConfig.model_validate(state["config"].get("model", state["config"]))
    except (ValidationError, AttributeError):
        raise InputError(
            path, "not a U-Net segmenter checkpoint (its config does not validate)"
        ) from None
    model = build_unet(config)
    load_weights(
        model, state["state_dict"], path, f"a U-Net of {config.in_channels} input channel(s)"
    )
    return Segmenter(model, config, device, checkpoint_path=path)

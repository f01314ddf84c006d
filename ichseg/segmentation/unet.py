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
    # Small targets: draw this fraction of each epoch from slices that hold foreground
    # (None: every training slice once per epoch, in random order).
    foreground_fraction: float | None = Field(None, ge=0.0, le=1.0)
    samples_per_epoch: int | None = Field(None, ge=1)
    # Train on square patches of the image_size slices (centred near the drawn foreground
    # class for oversampled draws): full resolution at the cost of a smaller input.
    patch_size: int | None = Field(None, ge=16)
    # Validate every n-th epoch (and the last); best.pt is chosen among those.
    val_every: int = Field(1, ge=1)
    # Per-class weights of the cross-entropy and Dice terms (background first).
    class_weights: list[float] | None = None
    # Dice over the whole batch rather than per slice: slices without a class then do not
    # turn a few false-positive pixels into a full Dice loss of 1.
    batch_dice: bool = False
    # Hemorrhage post-processing (predict_volume): labels outside the intracranial mask are
    # dropped, and connected bleeds smaller than min_component_ml are removed.
    restrict_to_intracranial: bool = False
    min_component_ml: float = Field(0.0, ge=0.0)
    # Each connected bleed takes the subtype most of its voxels have.
    component_vote: bool = False
    # Extra-axial shape rule (0: off): each connected extra-axial bleed (voxels labelled
    # epidural or subdural) becomes subdural when its volume over the cube of its thickness is
    # above this value (a wide, thin crescent along the inner table), epidural otherwise (a
    # thick biconvex lens): the radiological sign the U-Net's local view does not capture.
    extra_axial_shape: float = Field(0.0, ge=0.0)

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
        if self.patch_size is not None and (
            self.patch_size > self.image_size or self.patch_size % factor
        ):
            raise ValueError(
                f"patch_size {self.patch_size} must be at most image_size {self.image_size} "
                f"and divisible by {factor}"
            )
        if self.class_weights is not None:
            if len(self.class_weights) != self.num_classes:
                raise ValueError(
                    f"class_weights needs {self.num_classes} entries (background first), "
                    f"got {len(self.class_weights)}"
                )
            if min(self.class_weights) <= 0:
                raise ValueError("class_weights must be positive")
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


def postprocess_label_map(
    labels: np.ndarray,
    volume: Any,
    intracranial_mask: np.ndarray | None = None,
    min_component_ml: float = 0.0,
    component_vote: bool = False,
    extra_axial_shape: float = 0.0,
) -> np.ndarray:
    """A hemorrhage label map without voxels outside the intracranial space or tiny bleeds.

    Args:
        labels: uint8 ``(z, y, x)`` label map on ``volume``'s grid (0 = none).
        volume: the CT (a :class:`~ichseg.volume.CTVolume`): its affine and slice positions
            give each component's volume in ml.
        intracranial_mask: labels outside it become 0; None keeps them.
        min_component_ml: connected bleeds (26-connected, whatever their subtypes) smaller
            than this are removed; 0 keeps every one.
        component_vote: give every voxel of a connected bleed the subtype most of its voxels
            have (ties go to the lower code).
        extra_axial_shape: then relabel each connected extra-axial bleed by its flatness
            (:func:`extra_axial_by_shape`); 0 keeps the labels.

    Returns:
        A new uint8 label map.
    """
    from scipy import ndimage

    from ichseg.volumetry import pixel_area_mm2, slab_thicknesses_mm

    labels = np.array(labels, dtype=np.uint8)
    if labels.shape != volume.shape:
        raise ValueError(f"label map shape {labels.shape} differs from volume {volume.shape}")
    if intracranial_mask is not None:
        labels[np.asarray(intracranial_mask) == 0] = 0
    if not labels.any() or (min_component_ml <= 0 and not component_vote):
        return extra_axial_by_shape(labels, volume.spacing, extra_axial_shape)
    components, count = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), dtype=bool))
    if min_component_ml > 0:
        voxel_ml = slab_thicknesses_mm(volume) * pixel_area_mm2(volume) / 1000.0
        weights = np.broadcast_to(voxel_ml[:, None, None], labels.shape)
        sizes = ndimage.sum_labels(weights, components, range(1, count + 1))
        small = np.flatnonzero(np.asarray(sizes) < min_component_ml) + 1
        removed = np.isin(components, small)
        labels[removed] = 0
        components[removed] = 0
    if component_vote:
        top = int(labels.max()) + 1
        inside = components > 0
        votes = np.bincount(
            components[inside].astype(np.int64) * top + labels[inside], minlength=(count + 1) * top
        ).reshape(count + 1, top)
        votes[:, 0] = 0
        winner = votes.argmax(axis=1).astype(np.uint8)
        labels[inside] = winner[components[inside]]
    return extra_axial_by_shape(labels, volume.spacing, extra_axial_shape)


def extra_axial_by_shape(
    labels: np.ndarray, spacing: tuple[float, float, float], threshold: float
) -> np.ndarray:
    """Epidural or subdural by shape, one label per connected extra-axial bleed.

    For each 26-connected bleed of epidural and subdural voxels: its flatness ``V / T^3``, with
    ``V`` its volume (mm^3) and ``T`` its thickness, the diameter of the largest ball inside it
    (twice the largest 3D distance to its border, in mm with the voxel spacing, so that slices
    cutting a bleed obliquely near the vertex do not make it look thick). A subdural crescent
    spreads thinly along the inner table (large ``V / T^3``); an epidural lens is thick for its
    extent (small ``V / T^3``).

    The distance is to the nearest voxel centre outside, so ``T`` exceeds the true thickness by
    about one voxel: the threshold depends on the voxel spacing it was chosen at (the packaged
    recipe: 5 mm slices, 0.9 mm pixels). An epidural and a subdural bleed that touch form one
    bleed and get one label.

    Args:
        labels: uint8 ``(z, y, x)`` label map (codes of ``ichseg.volume.HEMORRHAGE_CODES``).
        spacing: ``(z, y, x)`` voxel spacing in mm.
        threshold: above it a bleed is subdural, else epidural; 0 returns ``labels``.

    Returns:
        The label map (a new array when relabelled).
    """
    from scipy import ndimage

    from ichseg.volume import HEMORRHAGE_CODES

    code_of = {name: code for code, name in HEMORRHAGE_CODES.items()}
    epidural, subdural = code_of["epidural"], code_of["subdural"]
    extra_axial = np.isin(labels, (epidural, subdural))
    if threshold <= 0 or not extra_axial.any():
        return labels
    labels = labels.copy()
    spacing = tuple(float(v) for v in spacing)
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    components, count = ndimage.label(extra_axial, structure=np.ones((3, 3, 3), dtype=bool))
    for box, code in zip(ndimage.find_objects(components), range(1, count + 1), strict=True):
        bleed = components[box] == code
        # A border of background all round, so the distance is to the bleed's own surface.
        depth = ndimage.distance_transform_edt(np.pad(bleed, 1), sampling=spacing)
        thickness = 2.0 * float(depth.max())
        if not thickness > 0:  # a degenerate affine (zero spacing): leave the labels
            continue
        flatness = float(bleed.sum()) * voxel_mm3 / thickness**3
        labels[box][bleed] = subdural if flatness > threshold else epidural
    return labels


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

    def predict_volume(
        self,
        volume,
        intracranial_mask: np.ndarray | None = None,
        *,
        batch_size: int = 32,
        restrict_to_intracranial: bool | None = None,
        min_component_ml: float | None = None,
        component_vote: bool | None = None,
        extra_axial_shape: float | None = None,
    ) -> np.ndarray:
        """uint8 ``(z, y, x)`` mask or label map of a CT volume, post-processed on its geometry.

        The intracranial target gives :meth:`predict`. The hemorrhage target then applies
        :func:`postprocess_label_map` with the config's settings (or those given here).

        Args:
            volume: a :class:`~ichseg.volume.CTVolume`.
            intracranial_mask: the mask that bounds the blood when restricting; None computes
                the classical one (:func:`~ichseg.segmentation.classical_intracranial_mask`).
            batch_size: slices per forward pass.
            restrict_to_intracranial: override of ``config.restrict_to_intracranial``.
            min_component_ml: override of ``config.min_component_ml``.
            component_vote: override of ``config.component_vote``.
            extra_axial_shape: override of ``config.extra_axial_shape``.
        """
        labels = self.predict(volume.hu, batch_size)
        if self.config.target != "hemorrhage":
            return labels
        restrict = (
            self.config.restrict_to_intracranial
            if restrict_to_intracranial is None
            else restrict_to_intracranial
        )
        minimum = self.config.min_component_ml if min_component_ml is None else min_component_ml
        if restrict and intracranial_mask is None:
            from ichseg.segmentation.classical import classical_intracranial_mask

            intracranial_mask = classical_intracranial_mask(volume.hu, volume.spacing)
        vote = self.config.component_vote if component_vote is None else component_vote
        shape = self.config.extra_axial_shape if extra_axial_shape is None else extra_axial_shape
        return postprocess_label_map(
            labels, volume, intracranial_mask if restrict else None, minimum, vote, shape
        )

    def __call__(self, volume) -> np.ndarray:
        """Masker interface: a CTVolume -> uint8 mask (or post-processed label map)."""
        return self.predict_volume(volume)


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

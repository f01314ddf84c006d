"""The torch dataset over cached slices, and the training augmentation."""

from __future__ import annotations

from typing import Any

import numpy as np

from ichseg.engine.cache import SliceSet


def build_augmentation(seed: int):
    """The training augmentation (albumentations): flip, rotate ±15°, scale, contrast, blur."""
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), p=0.7, border_mode=0, fill=0),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
            A.GaussianBlur(blur_limit=(3, 3), p=0.2),
        ],
        seed=seed,
    )


class SliceDataset:
    """Torch-style dataset over rows of a :class:`SliceSet`; returns (float image, target)."""

    def __init__(
        self,
        slices: SliceSet,
        indices: np.ndarray,
        targets: np.ndarray,
        augmentation: Any = None,
    ) -> None:
        self.slices = slices
        self.indices = np.asarray(indices)
        self.targets = targets
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.indices)

    def reseed(self, seed: int) -> None:
        """Fix the augmentation stream for an epoch, so a resumed run repeats it exactly."""
        if self.augmentation is not None:
            self.augmentation.set_random_seed(seed)

    def __getitem__(self, position: int):
        import torch

        index = int(self.indices[position])
        image = self.slices.stack(index)  # (C, H, W) uint8, a fresh array
        if self.augmentation is not None:
            image = self.augmentation(image=image.transpose(1, 2, 0))["image"].transpose(2, 0, 1)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)
        return tensor, torch.as_tensor(self.targets[index])
